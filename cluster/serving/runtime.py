"""Bring the serving side up and down: a Ray cluster (local or joined), Ray Serve, the app.

Used by `gptoss-cluster serve` and by the test session, so both run the same steps.
"""

from __future__ import annotations

import contextlib
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
    ray_notice: str = ""  # one line on where Ray listens and whether it wants its token

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
    cluster `ray start` last left on this machine. That Ray listens on the loopback interface only
    (node IP 127.0.0.1, no dashboard), so nothing off this host reaches its GCS, raylet or workers;
    Ray Serve's replicas bind their inter-deployment gRPC server to every interface regardless
    (hard-coded in Serve), guarded by Ray's token auth, which a new local Ray turns on."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage-stats prompt or upload
    verbose = config.log_level in ("debug", "info")
    ray_level = logging.INFO if config.log_level == "debug" else logging.WARNING
    if config.ray.address:
        ray.init(address=config.ray.address, logging_level=ray_level, log_to_driver=verbose)
        return False
    kwargs = {}
    if config.ray.temp_dir:
        kwargs["_temp_dir"] = str(config.ray.temp_dir)
    with _single_machine_ray():
        ray.init(address="local", num_cpus=config.ray.num_cpus or os.cpu_count() or 2, include_dashboard=False,
                 logging_level=ray_level, log_to_driver=verbose, **kwargs)
    return True


LOOPBACK = "127.0.0.1"
_SINGLE_MACHINE_VAR = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


@contextlib.contextmanager
def _single_machine_ray():
    """Start Ray in its single-machine mode (its default on macOS and Windows): the node IP is
    127.0.0.1, so the GCS, raylet, object manager, agents and workers listen on loopback only (on
    Linux Ray otherwise takes the host's routable IP, and several servers bind every interface).
    Ray reads the switch from the environment in every process it spawns (they inherit it during
    ray.init) and from a constant in this one; both are restored afterwards, so a later `ray start`
    from this process is unaffected."""
    from ray._private import ray_constants

    previous_env, previous = os.environ.get(_SINGLE_MACHINE_VAR), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[_SINGLE_MACHINE_VAR] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = previous
        if previous_env is None:
            os.environ.pop(_SINGLE_MACHINE_VAR, None)
        else:
            os.environ[_SINGLE_MACHINE_VAR] = previous_env


def ray_notice(config: ClusterConfig, started_ray: bool) -> str:
    """Where the Ray this process uses listens, and whether it requires Ray's auth token."""
    try:
        from ray._private.authentication.authentication_utils import is_token_auth_enabled

        auth = "token auth on" if is_token_auth_enabled() else "token auth OFF (RAY_AUTH_MODE)"
    except ImportError:  # a Ray without token authentication
        auth = "no token auth in this Ray"
    if started_ray:
        return (f"Ray: a local instance on {LOOPBACK} only (Serve's replica gRPC ports excepted: they bind every "
                f"interface and check Ray's token), {auth}")
    return f"Ray: joined {config.ray.address}, {auth}"


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
    return ServingRuntime(config=config, handle=handle, started_ray=started_ray,
                          ray_notice=ray_notice(config, started_ray))
