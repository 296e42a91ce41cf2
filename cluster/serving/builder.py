"""build_app: the Ray Serve application for one ClusterConfig."""

from __future__ import annotations

from ray.serve import Application

from cluster.config import ClusterConfig
from cluster.serving.replica import ModelReplica


def build_app(config: ClusterConfig) -> Application:
    """A Serve application of `config.serving.replicas` ModelReplica copies."""
    serving = config.serving
    actor_options: dict = {"num_cpus": serving.num_cpus}
    if serving.num_gpus:
        actor_options["num_gpus"] = serving.num_gpus
    return ModelReplica.options(
        num_replicas=serving.replicas,
        ray_actor_options=actor_options,
        max_ongoing_requests=serving.max_ongoing_requests,
        max_queued_requests=serving.max_queued_requests,
        graceful_shutdown_timeout_s=serving.graceful_shutdown_timeout_s,
        # Loading a large checkpoint takes a while; don't let health checks kill a loading replica.
        health_check_period_s=10,
        health_check_timeout_s=30,
    ).bind(config)


# The import path a Serve config file (KubeRay's serveConfigV2, `serve deploy`) names for this
# application; its `args` are a ClusterConfig as nested YAML (see cluster/serving/serve_config.py).
IMPORT_PATH = "cluster.serving.builder:app_builder"


def app_builder(args: dict) -> Application:
    """Serve application builder: `args` is a ClusterConfig mapping, validated by the config code."""
    from cluster.config import from_dict

    return build_app(from_dict(args))
