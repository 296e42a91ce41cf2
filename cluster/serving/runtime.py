"""Bring the serving side up and down: a Ray cluster (local or joined), Ray Serve, the app.

Used by `gptoss-cluster serve` and by the test session, so both run the same steps.

Start-up never waits without bound for a placement: when the app's replicas are still not placed
after serving.placement_timeout_s (Serve reports replicas it cannot schedule, with what each asks
for), start_serving raises PlacementError naming the resources asked for and what the cluster
has. Whatever ends start-up early (that error, a failed replica, a signal turned into an
exception) removes the app it deployed, and with it its replicas' placement groups.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
from dataclasses import dataclass

import ray
from ray import serve
from ray.serve.handle import DeploymentHandle

from cluster.config import ClusterConfig
from cluster.serving import serve_internals
from cluster.serving.builder import build_app, replica_resources

log = logging.getLogger(__name__)


@dataclass
class ServingRuntime:
    """What `start_serving` brought up, so `stop` takes down exactly that."""

    config: ClusterConfig
    handle: DeploymentHandle
    started_ray: bool
    ray_notice: str = ""  # one line on where Ray listens and whether it wants its token

    def stop(self) -> None:
        """Delete the app (its replicas stop gracefully), then disconnect; if this process started
        Ray, that also stops Ray, Serve's controller with it.

        Not serve.shutdown(): it waits on a controller task that only ends when the controller is
        killed, which Ray then reports on the terminal as a failed task. And when a signal to the
        whole process group (`timeout`, systemd) has already taken the local Ray processes down,
        there is nothing left to delete gracefully: any call would wait out Ray's timeouts.

        The routers of this process's handles are shut down first: left running, a router's next
        metrics push (every few seconds) after ray.shutdown() calls into Ray, which then starts a
        new local Ray instance of its own (Ray's auto-init) and logs a traceback about an object of
        the old session."""
        try:
            if not self.started_ray or local_ray_alive():
                serve_internals.shutdown_cached_handles()
                self.handle.shutdown()  # in that cache unless Serve evicted it (idempotent)
                serve.delete(self.config.serving.app_name)
        finally:
            ray.shutdown()

    def local_ray_going_down(self) -> bool:
        """This process started Ray and some of its processes have ended (a signal to the group)."""
        return self.started_ray and not local_ray_alive(settle_s=0.0)

    def kill_local_ray(self) -> None:
        """SIGKILL what is left of the Ray this process started (a disconnect that is stuck)."""
        node = _local_node()
        if self.started_ray and node is not None:
            node.kill_all_processes(check_alive=False, allow_graceful=False)


RAY_SIGNAL_SETTLE_S = 1.0  # how long a local Ray is watched for processes that a signal is ending


def _local_node():
    """Ray's record of the node ray.init() started in this process (None if it started none)."""
    return getattr(ray._private.worker, "_global_node", None)


def local_ray_alive(settle_s: float = RAY_SIGNAL_SETTLE_S) -> bool:
    """Whether every process of the Ray this driver started (GCS, raylet, ...) still runs, and still
    does `settle_s` later. A signal to the whole process group reaches them with this process (its
    agents end at once, the raylet and GCS take seconds), and Serve calls to a Ray that is ending can
    hang (serve bounds that: cluster/cli/serve.py, STUCK_STOP_S)."""
    node = _local_node()
    if node is None:
        return False
    deadline = time.monotonic() + settle_s
    while node.remaining_processes_alive():
        if time.monotonic() >= deadline:
            return True
        time.sleep(0.05)
    return False


class DeployFailed(RuntimeError):
    """The application did not come up; the message is the replica's own error."""


class _DropDefaultAuthNotice(logging.Filter):
    """Ray announces on every local start that it turned token authentication on by default."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Token authentication is enabled for this Ray cluster")


_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"
_auth_notice_filter = _DropDefaultAuthNotice()

# At shutdown a driver sends its last task events (the dashboard's task list) to the GCS and waits
# up to 5 s for them by default; after a SIGTERM to the whole process group the GCS is gone already.
LOCAL_RAY_SYSTEM_CONFIG = {"task_events_shutdown_flush_timeout_ms": 500}

# Ray starts every worker process (our replica actors, and so the engine processes they spawn,
# which inherit it) at nice 15 unless told otherwise, while the front door runs at 0: on a box
# where both share the cores, the engine then loses the CPU to the serving path. Workers run at
# the front door's priority instead (docs/performance.md, "Process priorities"). An explicit
# RAY_worker_niceness in the environment is the operator's choice and is left to win.
WORKER_NICENESS = 0
_WORKER_NICENESS_VAR = "RAY_worker_niceness"


def local_ray_system_config() -> dict:
    """The _system_config of a Ray that start_ray starts itself."""
    if _WORKER_NICENESS_VAR in os.environ:
        return dict(LOCAL_RAY_SYSTEM_CONFIG)
    return {**LOCAL_RAY_SYSTEM_CONFIG, "worker_niceness": WORKER_NICENESS}


def start_ray(config: ClusterConfig) -> bool:
    """Connect to config.ray.address, or start a quiet local Ray. Returns True if started here.

    Without an address this always starts a new Ray ("local"): a bare ray.init() would join whatever
    cluster `ray start` last left on this machine. That Ray listens on the loopback interface only
    (node IP 127.0.0.1, no dashboard), so nothing off this host reaches its GCS, raylet or workers;
    Ray Serve's replicas bind their inter-deployment gRPC server to every interface regardless
    (hard-coded in Serve), guarded by Ray's token auth, which a new local Ray turns on."""
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
    with _single_machine_ray():
        ray.init(address="local", num_cpus=config.ray.num_cpus or os.cpu_count() or 2, include_dashboard=False,
                 logging_level=ray_level, log_to_driver=verbose, _system_config=local_ray_system_config(), **kwargs)
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


class PlacementError(RuntimeError):
    """The app's replicas could not be placed within serving.placement_timeout_s."""


# Serve's status message for replicas it has not managed to schedule for a while.
_UNSCHEDULED = "to be scheduled"
_POLL_S = 0.25


def _app_state(app_name: str) -> tuple[str, str]:
    """(application status, the first deployment message that says something) from Serve."""
    app = serve.status().applications.get(app_name)
    if app is None:
        return "NOT_STARTED", ""
    messages = [d.message for d in app.deployments.values() if d.message]
    return str(app.status.value if hasattr(app.status, "value") else app.status), (messages[0] if messages
                                                                                   else app.message or "")


def _resources(table: dict) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in sorted(table.items()) if not k.startswith(("node:", "memory",
                                                                                           "object_store")))


def placement_report(config: ClusterConfig) -> str:
    """What one replica asks for, times how many, against what the cluster has and has free."""
    bundles = replica_resources(config)
    asked = " + ".join("{" + _resources(b) + "}" for b in bundles)
    return (f"each of {config.serving.replicas} replica(s) asks for {asked}"
            f"{' (' + config.parallel.placement_strategy + ')' if len(bundles) > 1 else ''}; "
            f"the cluster has {_resources(ray.cluster_resources())} "
            f"({_resources(ray.available_resources())} free) on {len(ray.nodes())} node(s)")


def wait_running(config: ClusterConfig) -> None:
    """Wait until the app is RUNNING; raise DeployFailed (with the replica's own error) if it fails,
    PlacementError if its replicas are still unscheduled after serving.placement_timeout_s."""
    name = config.serving.app_name
    placement_deadline = time.monotonic() + config.serving.placement_timeout_s
    while True:
        status, message = _app_state(name)
        if status == "RUNNING":
            return
        if status in ("DEPLOY_FAILED", "UNHEALTHY"):
            raise DeployFailed(replica_error(name) or message or f"the Serve application {name!r} failed")
        if time.monotonic() > placement_deadline and _UNSCHEDULED in message:
            raise PlacementError(f"the model replicas could not be placed within serving.placement_timeout_s "
                                 f"({config.serving.placement_timeout_s:g} s): {placement_report(config)}")
        time.sleep(_POLL_S)


def deploy(config: ClusterConfig) -> DeploymentHandle:
    """Start Serve without its HTTP/gRPC proxies (the front door is ours) and run the app; removes
    the app again if it does not come up (see wait_running) or anything interrupts the wait."""
    serve_level = "INFO" if config.log_level == "debug" else "WARNING"
    logging.getLogger("ray.serve").setLevel(serve_level)  # the driver-side Serve logger too
    serve.start(proxy_location="Disabled",
                logging_config={"log_level": serve_level, "enable_access_log": config.log_level == "debug"})
    try:
        (handle,) = serve.run_many([serve.RunTarget(build_app(config), name=config.serving.app_name,
                                                    route_prefix=None)], wait_for_applications_running=False)
        wait_running(config)
    except BaseException:
        remove_app(config.serving.app_name)
        raise
    return handle


def remove_app(app_name: str) -> None:
    """Delete the app (its replicas and their placement groups), quietly if it is already gone."""
    try:
        serve.delete(app_name)
    except Exception as err:  # noqa: BLE001 - cleaning up after another failure; say so and go on
        log.warning("could not delete the Serve application %r: %s", app_name, err)


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
    except BaseException:  # deploy() removed the app already; a Ray started here goes too
        if started_ray:
            ray.shutdown()  # not serve.shutdown(): see ServingRuntime.stop
        raise
    return ServingRuntime(config=config, handle=handle, started_ray=started_ray,
                          ray_notice=ray_notice(config, started_ray))
