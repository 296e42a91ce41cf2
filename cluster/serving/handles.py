"""A DeploymentHandle for an asyncio server: its router on the caller's event loop, requests
and responses sent to the replica over Serve's inter-deployment gRPC.

By default a DeploymentHandle runs its router on a loop in a thread of its own, so every
request and every streamed item crosses threads twice (a `call_soon_threadsafe` wake-up each),
and sends the call as a Ray actor task whose streamed items are Ray objects. For a front door
that makes every call with `await` / `async for` on one event loop, both are pure overhead:
`loop_handle` builds a separate handle (the caller's handle is left as it was, so synchronous
`.result()` calls on it, from tests and tools, keep working) whose router lives on the running
loop, which Serve's own proxy does with RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP=0, and whose calls
go by gRPC (`_by_reference=False`, what RAY_SERVE_USE_GRPC_BY_DEFAULT=1 sets) with plain pickle.

Such a handle must only be used from that loop, and never with a blocking `.result()`: the
router that would produce the result runs on the loop the caller is blocking.
"""

from __future__ import annotations

import asyncio

from ray.serve.handle import DeploymentHandle

# Per-call options of the returned handle: gRPC to the replica, pickle (our request and chunk
# types are plain dataclasses; cloudpickle's by-value machinery buys nothing for them).
CALL_OPTIONS = {"_by_reference": False, "request_serialization": "pickle", "response_serialization": "pickle"}


def loop_handle(handle: DeploymentHandle) -> DeploymentHandle:
    """A new handle to `handle`'s deployment, routed on the running event loop (see above).

    Anything that is not a real DeploymentHandle (a test double) is returned as it is."""
    if not isinstance(handle, DeploymentHandle):
        return handle
    asyncio.get_running_loop()  # raises when called outside the loop the handle is meant for
    own = DeploymentHandle(handle.deployment_name, handle.app_name)
    own._init(_run_router_in_separate_loop=False)  # Serve's own proxy initialises its handles this way
    return own.options(**CALL_OPTIONS)


async def close_loop_handle(handle: DeploymentHandle) -> None:
    """Shut down a `loop_handle` handle's router before its loop stops.

    Besides Serve's own shutdown, this stops the router's long-poll clients (its own and the one
    Serve shares per event loop), which otherwise log an ERROR once the loop has stopped ("Bound
    asyncio event loop is not running"). Those are Serve internals: if they change, the shutdown
    still happens and only that log line comes back."""
    if not isinstance(handle, DeploymentHandle) or not handle.is_initialized:
        return
    await handle.shutdown_async()
    router = getattr(handle._router, "_asyncio_router", None)  # CurrentLoopRouter's AsyncioRouter
    try:
        from ray.serve._private.router import SharedRouterLongPollClient

        router.long_poll_client.stop()
        SharedRouterLongPollClient.get_or_create(router._controller_handle, router._event_loop).long_poll_client.stop()
    except (AttributeError, ImportError):
        pass


def request_router(handle: DeploymentHandle):
    """The RequestRouter instance behind a `loop_handle` handle (router.GptossRouter for our
    deployment), or None: not created yet (Serve makes it once the deployment's config arrives),
    a test double, or Serve's internals changed. Callers then use the handle as it is."""
    asyncio_router = getattr(getattr(handle, "_router", None), "_asyncio_router", None)  # CurrentLoopRouter's
    try:
        return getattr(asyncio_router, "request_router", None)
    except Exception:  # noqa: BLE001 - a lazily built router that fails to build is Serve's to report
        return None


def replica_assignment(response) -> "asyncio.Future | None":
    """The future that completes once Serve's router has given a handle call (a
    DeploymentResponse or DeploymentResponseGenerator) a replica, or None where there is none to
    be had (a test double, or Serve's internals changed): the caller then cannot bound that wait."""
    import concurrent.futures

    future = getattr(response, "_replica_result_future", None)
    if isinstance(future, concurrent.futures.Future):
        return asyncio.wrap_future(future)
    return future if isinstance(future, asyncio.Future) else None
