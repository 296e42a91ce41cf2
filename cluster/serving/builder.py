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
    group_options: dict = {}
    parallel = config.parallel
    if parallel.ep_size > 1:
        # One bundle per rank; the replica (rank 0) lands in bundle 0, its workers in 1..N-1.
        bundle: dict = {"CPU": max(parallel.bundle_cpus, serving.num_cpus)}
        if serving.num_gpus:
            bundle["GPU"] = serving.num_gpus
        group_options = {"placement_group_bundles": [dict(bundle) for _ in range(parallel.ep_size)],
                         "placement_group_strategy": parallel.placement_strategy}
    return ModelReplica.options(
        **group_options,
        num_replicas=serving.replicas,
        ray_actor_options=actor_options,
        max_ongoing_requests=serving.max_ongoing_requests,
        max_queued_requests=serving.max_queued_requests,
        graceful_shutdown_timeout_s=serving.graceful_shutdown_timeout_s,
        # Loading a large checkpoint takes a while; don't let health checks kill a loading replica.
        health_check_period_s=2 if parallel.ep_size > 1 else 10,  # a dead EP worker is noticed within ~2 s
        health_check_timeout_s=30,
    ).bind(config)
