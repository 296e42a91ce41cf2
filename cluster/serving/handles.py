"""A DeploymentHandle for an asyncio server: its router on the caller's event loop, requests
and responses sent to the replica over Serve's inter-deployment gRPC.

By default a DeploymentHandle runs its router on a loop in a thread of its own, so every
request and every streamed item crosses threads twice (a `call_soon_threadsafe` wake-up each),
and sends the call as a Ray actor task whose streamed items are Ray objects. For a front door
that makes every call with `await` / `async for` on one event loop, both are pure overhead:
`loop_handle` builds a separate handle (the caller's handle is left as it was, so synchronous
`.result()` calls on it, from tests and tools, keep working) whose router lives on the running
loop, which Serve's own proxy does with RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP=0, and whose calls
go by gRPC (what RAY_SERVE_USE_GRPC_BY_DEFAULT=1 sets) with plain pickle. Both are Serve
internals, reached through serve_internals.py.

Such a handle must only be used from that loop, and never with a blocking `.result()`: the
router that would produce the result runs on the loop the caller is blocking.
"""

from __future__ import annotations

from ray.serve.handle import DeploymentHandle

from cluster.serving import serve_internals

# Per-call options of the returned handle: gRPC to the replica, pickle (our request and chunk
# types are plain dataclasses; cloudpickle's by-value machinery buys nothing for them).
CALL_OPTIONS = {**serve_internals.BY_GRPC, "request_serialization": "pickle", "response_serialization": "pickle"}


def loop_handle(handle: DeploymentHandle) -> DeploymentHandle:
    """A new handle to `handle`'s deployment, routed on the running event loop (see above)."""
    return serve_internals.bind_to_running_loop(handle).options(**CALL_OPTIONS)


async def close_loop_handle(handle: DeploymentHandle) -> None:
    """Shut down a `loop_handle` handle's router before its loop stops."""
    await serve_internals.close_bound_handle(handle)
