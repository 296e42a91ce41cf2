"""Every place gptoss-cluster reaches into Ray Serve's private API, in one room (Ray 2.60).

Each item says what it is, why no public API does it, and what happens when a Ray upgrade removes
it. tests/serving/test_serve_internals.py pins the Ray version and fails loudly when one is gone;
tests/test_layering.py keeps every other module away from `ray.serve._private` and from
underscore attributes of Serve objects.

When a lookup of the direct path's internals fails at run time, `unavailable(item)` counts it in
`gptoss_serve_internal_unavailable_total{item}` and logs one WARNING per item and process: traffic
then takes the slow handle path (correct, only slower), and that must not go unnoticed.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import ray
from ray.serve.handle import DeploymentHandle

from cluster.metrics import serve_internals_metrics

log = logging.getLogger(__name__)

# Handle call option `_by_reference=False`: send calls and streamed items to the replica over
# Serve's inter-deployment gRPC instead of as Ray actor tasks whose items are Ray objects.
# Public API: only the process-wide RAY_SERVE_USE_GRPC_BY_DEFAULT=1, which would change every
# handle in the process (tests' and tools' too). If the option disappears, `.options()` raises
# TypeError at front-door start: the version test catches it first.
BY_GRPC = {"_by_reference": False}


def bind_to_running_loop(handle: DeploymentHandle) -> DeploymentHandle:
    """A new handle to `handle`'s deployment whose router runs on the running event loop.

    Private: `DeploymentHandle._init(_run_router_in_separate_loop=False)`, what Serve's own proxy
    does (RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP=0 is the public, process-wide switch). Saves two
    thread crossings per request and per streamed item. If `_init` or the keyword disappears, this
    raises at front-door start (TypeError/AttributeError), caught by the version test.
    """
    asyncio.get_running_loop()  # raises when called outside the loop the handle is meant for
    own = DeploymentHandle(handle.deployment_name, handle.app_name)
    own._init(_run_router_in_separate_loop=False)
    return own


def _current_loop_router(handle: DeploymentHandle) -> Any:
    """`handle._router._asyncio_router`: the AsyncioRouter inside Serve's CurrentLoopRouter, or None
    when the handle has not made its router yet (or `unavailable` when the attributes are gone)."""
    router = getattr(handle, "_router", None)
    if router is None:  # not initialised yet
        return None
    asyncio_router = getattr(router, "_asyncio_router", None)
    if asyncio_router is None:
        unavailable("DeploymentHandle._router._asyncio_router")
    return asyncio_router


def request_router(handle: DeploymentHandle) -> Any:
    """The RequestRouter instance behind a `bind_to_running_loop` handle (router.GptossRouter for our
    deployment), or None: not created yet (Serve makes it once the deployment's config arrives),
    or Serve's internals changed (counted and logged by `unavailable`). Callers then use the
    handle as it is.

    Private: `handle._router._asyncio_router.request_router`. No public API returns the router
    instance a handle routes with; the front door needs it to route direct streams with the same
    policy state (router.GptossRouter.choose_direct). If it disappears, every request goes
    through the Serve handle: correct, about 1 ms slower per request (docs/performance.md).
    """
    asyncio_router = _current_loop_router(handle)
    if asyncio_router is None:
        return None
    if not hasattr(type(asyncio_router), "request_router"):
        unavailable("AsyncioRouter.request_router")
        return None
    try:
        return asyncio_router.request_router
    except Exception:  # noqa: BLE001 - a lazily built router that fails to build is Serve's to report
        return None


async def close_bound_handle(handle: DeploymentHandle) -> None:
    """Shut down a `bind_to_running_loop` handle's router before its loop stops.

    Private: the router's long-poll clients (`handle._router._asyncio_router.long_poll_client`, and
    `ray.serve._private.router.SharedRouterLongPollClient`, shared per event loop, found by the
    router's `_controller_handle` and `_event_loop`). Serve's `shutdown_async` leaves them
    running, and once the loop stops they log an ERROR ("Bound asyncio event loop is not
    running"). If they disappear, the shutdown still happens and only that log line comes back.
    """
    if not handle.is_initialized:
        return
    await handle.shutdown_async()
    router = getattr(handle._router, "_asyncio_router", None)
    try:
        from ray.serve._private.router import SharedRouterLongPollClient

        router.long_poll_client.stop()
        SharedRouterLongPollClient.get_or_create(router._controller_handle, router._event_loop).long_poll_client.stop()
    except (AttributeError, ImportError):
        unavailable("router long-poll clients")


def shutdown_cached_handles() -> None:
    """Shut down the router of every handle Serve has given this process (serve.run,
    serve.get_app_handle), the apps' deleted or not: each pushes metrics to the controller every
    few seconds, and after ray.shutdown() that push makes Ray start a new local instance.

    Private: Serve's client (`ray.serve.context._get_global_client`) and its
    `shutdown_cached_handles`, which the public serve.shutdown() calls only along with stopping
    Serve itself. If they disappear, the routers are left running as before (a stray local Ray
    after the stop, in a process that lives on) and `unavailable` says so.

    Not reached: a router that Serve made and then dropped. A new handle's first calls from several
    threads at once each make one (Serve's lazy router creation is not thread-safe) and the handle
    keeps the last; make a handle's router in one thread (`handle.options(...)` does) before
    sharing it."""
    try:
        from ray.serve.context import _get_global_client

        client = _get_global_client(raise_if_no_controller_running=False)
        if client is not None:
            client.shutdown_cached_handles()
    except (AttributeError, ImportError, TypeError):
        unavailable("Serve client's handle cache")


def replica_assignment(response) -> "asyncio.Future | None":
    """The future that completes once Serve's router has given a handle call (a DeploymentResponse
    or DeploymentResponseGenerator) a replica, or None where there is none to be had.

    Private: `DeploymentResponse._replica_result_future`. No public API says when a call has been
    assigned (as opposed to answered); the front door bounds that wait with frontdoor.replica_wait_s
    (no routable replica: UNAVAILABLE with RetryInfo). If it disappears, the wait is bounded only
    by the call's own deadline, and `unavailable` counts and logs it.
    """
    import concurrent.futures

    future = getattr(response, "_replica_result_future", None)
    if isinstance(future, concurrent.futures.Future):
        return asyncio.wrap_future(future)
    if isinstance(future, asyncio.Future):
        return future
    unavailable("DeploymentResponse._replica_result_future")
    return None


def router_deployment(router: Any) -> tuple[str, str]:
    """(application, deployment) a RequestRouter routes for.

    Private: `RequestRouter._deployment_id` (set by Serve before `initialize_state`); the public
    RequestRouter API does not expose it. The router labels its metrics with it. If it
    disappears, the labels read ("", "") and the version test fails.
    """
    deployment_id = getattr(router, "_deployment_id", None)
    if deployment_id is None:
        unavailable("RequestRouter._deployment_id")
        return "", ""
    return deployment_id.app_name, deployment_id.name


class ReplicaCounts:
    """(target, running) replica counts of one deployment, read from the Serve controller.

    Private: the controller actor (`ray.serve._private.constants.SERVE_CONTROLLER_NAME` in
    `SERVE_NAMESPACE`) and its `get_serve_instance_details()` dict. `serve.status()` is public but
    blocking and reports neither an autoscaled deployment's target nor per-replica states in a
    stable shape. If it disappears, `read` raises: the `gptoss_autoscaler_*` gauges stop updating
    (the load poll logs it at INFO and carries on) and the version test fails.
    """

    def __init__(self, app_name: str, deployment_name: str) -> None:
        self.app_name = app_name
        self.deployment_name = deployment_name
        self._controller = None

    async def read(self, timeout_s: float) -> tuple[int, int]:
        if self._controller is None:
            from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

            self._controller = await asyncio.get_running_loop().run_in_executor(
                None, lambda: ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE))
        try:
            async with asyncio.timeout(timeout_s):  # not wait_for: it can drop a cancel on 3.11 (loads.py)
                details = await self._controller.get_serve_instance_details.remote()
        except ray.exceptions.RayActorError:
            self._controller = None  # the controller restarted: look it up again next time
            raise
        deployment = details["applications"][self.app_name]["deployments"][self.deployment_name]
        running = sum(1 for r in deployment.get("replicas", ()) if r.get("state") == "RUNNING")
        return int(deployment["target_num_replicas"]), running


_warned: set[str] = set()


def unavailable(item: str) -> None:
    """Count (and, once per item, log) a Serve internal that is not where this module expects it."""
    serve_internals_metrics().unavailable_total.labels(item).inc()
    if item not in _warned:
        _warned.add(item)
        log.warning("Ray Serve internal %s is unavailable (Ray %s): the front door falls back to the Serve "
                    "handle path (slower); see cluster/serving/serve_internals.py", item, ray.__version__)
