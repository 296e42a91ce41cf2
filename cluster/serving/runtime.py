"""Bring the serving side up and down: a Ray cluster (local or joined), Ray Serve, the app.

Used by `gptoss-cluster serve` and by the test session, so both run the same steps.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import ray
from ray import serve
from ray.serve.handle import DeploymentHandle

from cluster.config import ClusterConfig
from cluster.serving.builder import build_app

log = logging.getLogger(__name__)


@dataclass
class ServingRuntime:
    """What `start_serving` brought up, so `stop` takes down exactly that."""

    config: ClusterConfig
    handle: DeploymentHandle
    started_ray: bool

    def stop(self) -> None:
        """Delete the app; if this process started Ray, shut Serve and Ray down too."""
        try:
            if self.started_ray:
                serve.shutdown()
            else:
                serve.delete(self.config.serving.app_name)
        finally:
            ray.shutdown()


def start_ray(config: ClusterConfig) -> bool:
    """Connect to config.ray.address, or start a quiet local Ray. Returns True if started here.

    Without an address this always starts a new Ray ("local"): a bare ray.init() would join whatever
    cluster `ray start` last left on this machine."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage-stats prompt or upload
    verbose = config.log_level in ("debug", "info")
    ray_level = logging.INFO if config.log_level == "debug" else logging.WARNING
    if config.ray.address:
        ray.init(address=config.ray.address, logging_level=ray_level, log_to_driver=verbose)
        return False
    kwargs = {}
    if config.ray.temp_dir:
        kwargs["_temp_dir"] = str(config.ray.temp_dir)
    ray.init(address="local", num_cpus=config.ray.num_cpus or os.cpu_count() or 2, include_dashboard=False,
             logging_level=ray_level, log_to_driver=verbose, **kwargs)
    return True


def deploy(config: ClusterConfig) -> DeploymentHandle:
    """Start Serve without its HTTP/gRPC proxies (the front door is ours) and run the app."""
    serve_level = "INFO" if config.log_level == "debug" else "WARNING"
    logging.getLogger("ray.serve").setLevel(serve_level)  # the driver-side Serve logger too
    serve.start(proxy_location="Disabled",
                logging_config={"log_level": serve_level, "enable_access_log": config.log_level == "debug"})
    return serve.run(build_app(config), name=config.serving.app_name, route_prefix=None)


def start_serving(config: ClusterConfig) -> ServingRuntime:
    started_ray = start_ray(config)
    try:
        handle = deploy(config)
    except BaseException:
        if started_ray:
            ray.shutdown()
        raise
    return ServingRuntime(config=config, handle=handle, started_ray=started_ray)
