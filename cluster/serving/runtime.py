"""Bring the serving side up and down: a Ray cluster (local or joined), Ray Serve, the app.

Used by `gptoss-cluster serve` and by the test session, so both run the same steps.
"""

from __future__ import annotations

import logging
import os
import re
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
        """Delete the app (its replicas stop gracefully), then disconnect; if this process started
        Ray, that also stops Ray, Serve's controller with it.

        Not serve.shutdown(): it waits on a controller task that only ends when the controller is
        killed, which Ray then reports on the terminal as a failed task. And when a signal to the
        whole process group (`timeout`, systemd) has already taken the local Ray processes down,
        there is nothing left to delete gracefully: any call would wait out Ray's timeouts."""
        try:
            if not self.started_ray or local_ray_alive():
                serve.delete(self.config.serving.app_name)
        finally:
            ray.shutdown()


def local_ray_alive() -> bool:
    """Whether every process of the Ray this driver started (GCS, raylet, ...) still runs."""
    node = getattr(ray._private.worker, "_global_node", None)
    return node is not None and node.remaining_processes_alive()


class DeployFailed(RuntimeError):
    """The application did not come up; the message is the replica's own error."""


class _DropDefaultAuthNotice(logging.Filter):
    """Ray announces on every local start that it turned token authentication on by default."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Token authentication is enabled for this Ray cluster")


_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"

# At shutdown a driver sends its last task events (the dashboard's task list) to the GCS and waits
# up to 5 s for them by default; after a SIGTERM to the whole process group the GCS is gone already.
LOCAL_RAY_SYSTEM_CONFIG = {"task_events_shutdown_flush_timeout_ms": 500}
_auth_notice_filter = _DropDefaultAuthNotice()


def start_ray(config: ClusterConfig) -> bool:
    """Connect to config.ray.address, or start a quiet local Ray. Returns True if started here.

    Without an address this always starts a new Ray ("local"): a bare ray.init() would join whatever
    cluster `ray start` last left on this machine."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage-stats prompt or upload
    verbose = config.log_level in ("debug", "info")
    if verbose:
        logging.getLogger(_AUTH_LOGGER).removeFilter(_auth_notice_filter)
    else:  # token auth stays on; only the notice that says so goes
        logging.getLogger(_AUTH_LOGGER).addFilter(_auth_notice_filter)
    ray_level = logging.INFO if config.log_level == "debug" else logging.WARNING
    if config.ray.address:
        ray.init(address=config.ray.address, logging_level=ray_level, log_to_driver=verbose)
        return False
    kwargs = {}
    if config.ray.temp_dir:
        kwargs["_temp_dir"] = str(config.ray.temp_dir)
    ray.init(address="local", num_cpus=config.ray.num_cpus or os.cpu_count() or 2, include_dashboard=False,
             logging_level=ray_level, log_to_driver=verbose, _system_config=LOCAL_RAY_SYSTEM_CONFIG, **kwargs)
    return True


def deploy(config: ClusterConfig) -> DeploymentHandle:
    """Start Serve without its HTTP/gRPC proxies (the front door is ours) and run the app."""
    serve_level = "INFO" if config.log_level == "debug" else "WARNING"
    logging.getLogger("ray.serve").setLevel(serve_level)  # the driver-side Serve logger too
    serve.start(proxy_location="Disabled",
                logging_config={"log_level": serve_level, "enable_access_log": config.log_level == "debug"})
    try:
        return serve.run(build_app(config), name=config.serving.app_name, route_prefix=None)
    except RuntimeError as err:  # "Deploying application ... failed": the cause is in the status
        raise DeployFailed(replica_error(config.serving.app_name) or str(err)) from None


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# The last "SomeError: message" line of a traceback: the exception the replica raised.
_EXCEPTION_LINE = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt|Failure)\b.*)$", re.MULTILINE)


def replica_error(app_name: str) -> str:
    """The error of a failed deployment of `app_name` as its replica raised it, from serve.status()
    ("ModelReplica: ModuleNotFoundError: No module named 'vllm'"); "" when there is none."""
    try:
        app = serve.status().applications.get(app_name)
    except Exception:  # noqa: BLE001 - the controller may be gone; the caller has its own message
        return ""
    if app is None:
        return ""
    for name, deployment in app.deployments.items():
        message = _ANSI.sub("", deployment.message or "")
        raised = _EXCEPTION_LINE.findall(message)
        if raised:
            return f"{name}: {raised[-1].strip()}"
        if message:
            return f"{name}: {message.splitlines()[0]}"
    return app.message or ""


def start_serving(config: ClusterConfig) -> ServingRuntime:
    started_ray = start_ray(config)
    try:
        handle = deploy(config)
    except BaseException:
        if started_ray:
            ray.shutdown()
        raise
    return ServingRuntime(config=config, handle=handle, started_ray=started_ray)
