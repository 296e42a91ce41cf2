"""build_app's Serve deployment options, read from the Application without deploying it."""

from __future__ import annotations

import pytest

from cluster.config import load_config
from cluster.parallel.workers import WORKER_ENV
from cluster.serving.builder import build_app

PUSH_INTERVAL = "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S"


def actor_options(**overrides) -> dict:
    app = build_app(load_config(env={}, overrides=overrides))
    return app._bound_deployment.ray_actor_options  # Serve keeps the bound Deployment there


def env_vars(options: dict) -> dict:
    return options.get("runtime_env", {}).get("env_vars", {})


@pytest.mark.parametrize("autoscaling", [False, True])
def test_cpu_ep2_replica_sleeps_idle_openmp_threads_like_its_workers(autoscaling):
    options = actor_options(**{"parallel.ep_size": 2, "serving.autoscaling.enabled": autoscaling})
    env = env_vars(options)
    assert WORKER_ENV and env.items() >= WORKER_ENV.items()
    assert (PUSH_INTERVAL in env) == autoscaling  # merged with, not replacing, the replica's other env vars


@pytest.mark.parametrize("autoscaling", [False, True])
def test_ep1_replica_keeps_openmp_defaults(autoscaling):
    env = env_vars(actor_options(**{"parallel.ep_size": 1, "serving.autoscaling.enabled": autoscaling}))
    assert not env.keys() & WORKER_ENV.keys()
    assert (PUSH_INTERVAL in env) == autoscaling


def test_gpu_ep2_replica_keeps_openmp_defaults():
    options = actor_options(**{"parallel.ep_size": 2, "serving.num_gpus": 1})
    assert options["num_gpus"] == 1 and not env_vars(options).keys() & WORKER_ENV.keys()


def test_max_replicas_per_node_reaches_serve_and_is_refused_with_placement_groups():
    from cluster.config import ConfigError

    app = build_app(load_config(env={}, overrides={"serving.max_replicas_per_node": 1, "serving.replicas": 3}))
    assert app._bound_deployment._replica_config.max_replicas_per_node == 1
    unlimited = build_app(load_config(env={}, overrides={"serving.replicas": 3}))
    assert unlimited._bound_deployment._replica_config.max_replicas_per_node is None
    with pytest.raises(ConfigError, match="serving.max_replicas_per_node"):
        build_app(load_config(env={}, overrides={"serving.max_replicas_per_node": 1, "parallel.ep_size": 2}))
    with pytest.raises(ConfigError, match=r"serving.max_replicas_per_node must be in \[0, 100\]"):
        load_config(env={}, overrides={"serving.max_replicas_per_node": -1})
