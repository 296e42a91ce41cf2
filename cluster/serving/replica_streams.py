"""How the front door streams one generate request from a replica.

The Serve router chooses the replica either way (router.GptossRouter). When the chosen replica
publishes a direct-stream address and the front door's channel to it is connected, the tokens
come straight from it (direct_stream.py, or multiplexed_stream.py when the replica serves that
kind, on framed_socket.py's socket where the replica has one), or, when this front door is attached
to the replica's vLLM engine core (engine_clients.py), from the engine core itself; otherwise, and
whenever a replica refuses a direct stream before its first token (full, stopping, unreachable),
the request goes through the Serve handle, whose router queues it, re-routes it, or refuses it as
Serve does.

Serve's router waits for a replica for as long as it takes (none routable: all dead, or not
placed yet); ours gives up after `replica_wait_s` with NoReplicaError, which the front door
answers UNAVAILABLE with RetryInfo.
"""

from __future__ import annotations

import asyncio
import logging
from typing import AsyncIterator

from ray.serve.handle import DeploymentHandle

from cluster.engine.request import GenerateRequest, TokenChunk
from cluster.metrics import router_metrics
from cluster.serving.direct_stream import DirectAddress, DirectStreamClient, Rejected
from cluster.serving.engine_clients import EngineClients, EngineStream
from cluster.serving.multiplexed_stream import MultiplexedClient
from cluster.serving.serve_internals import replica_assignment, request_router

log = logging.getLogger(__name__)

DIRECT, ENGINE_CLIENT = "direct", "engine_client"
SERVE_HANDLE, SERVE_HANDLE_AFTER_REFUSAL = "serve_handle", "serve_handle_after_refusal"


class NoReplicaError(ConnectionError):
    """No replica took the request within the wait allowed (ConnectionError: UNAVAILABLE)."""


def replica_lost(err: BaseException) -> bool:
    """Whether `err` ended a stream because its replica is gone or going (its process, node or an
    expert-parallel rank died, its engine stopped, it shut down): the rest of the request may be
    sent to another replica. Not a refusal before the request was taken, not the request's own
    fault (bad input, deadline, cancellation)."""
    from ray import exceptions as ray_exceptions

    from cluster.engine.errors import EngineDead

    if isinstance(err, NoReplicaError):
        return False
    if isinstance(err, ray_exceptions.RayTaskError) and isinstance(getattr(err, "cause", None), BaseException):
        err = err.cause
    return isinstance(err, (ConnectionError, EngineDead, ray_exceptions.RayActorError,
                            ray_exceptions.ActorUnavailableError))


class ReplicaStreams:
    """The front door's way to its replicas: `open(request)` starts one stream."""

    def __init__(self, handle: DeploymentHandle, replica_wait_s: float = 30.0) -> None:
        self._generate = handle.options(stream=True).generate
        self._handle = handle
        self.replica_wait_s = replica_wait_s
        self._client = DirectStreamClient()
        self._multiplexed = MultiplexedClient(self._client)
        self._engines = EngineClients()
        self._replica_set_version = -1
        self._pruning: set[asyncio.Task] = set()
        labels = (handle.app_name, handle.deployment_name)
        streams = router_metrics().streams_total
        self._counted = {path: streams.labels(*labels, path) for path in (DIRECT, ENGINE_CLIENT, SERVE_HANDLE,
                                                                           SERVE_HANDLE_AFTER_REFUSAL)}

    def open(self, request: GenerateRequest) -> "ReplicaStream":
        """Start streaming `request` (the call is on its way when this returns)."""
        router = request_router(self._handle)
        route = None
        if router is not None and hasattr(router, "choose_direct"):
            if router.replica_set_version != self._replica_set_version:
                self._replica_set_version = router.replica_set_version
                self._prune(router.direct_addresses())
                self._offer_engines(router)
            route = router.choose_direct(request, self._ready)
        if route is None:  # the router is not up yet, or the replica it chose takes no direct stream
            self._counted[SERVE_HANDLE].inc()
            return ReplicaStream(self, request, None)
        engine = self._engines.get(route.target.address)
        self._counted[DIRECT if engine is None else ENGINE_CLIENT].inc()
        return ReplicaStream(self, request, route, engine)

    def _ready(self, target: DirectAddress) -> bool:
        """Whether a stream to `target` starts without waiting for a connection (asks for one if not)."""
        if self._engines.get(target.address) is not None:
            return True
        return (self._multiplexed if target.multiplexed else self._client).ready(target)

    def _offer_engines(self, router) -> None:
        if hasattr(router, "replica_metadata"):
            for address, metadata in router.replica_metadata().items():
                self._engines.offer(address, metadata)

    def routable_replicas(self) -> int | None:
        """Replicas the router can send requests to now; None before the router exists."""
        router = request_router(self._handle)
        replicas = getattr(router, "curr_replicas", None)
        return None if replicas is None else len(replicas)

    def requests_held(self) -> tuple[int, int]:
        """(requests the routable replicas hold, of which this router placed), see
        router.GptossRouter.requests_held; (0, 0) before the router exists."""
        router = request_router(self._handle)
        if router is None or not hasattr(router, "requests_held"):
            return 0, 0
        return router.requests_held()

    def connect(self) -> None:
        """Ask the channel to each routable replica's direct stream to connect, so that the first
        requests to a replica (a burst after start-up, say) find it ready instead of all taking the
        Serve handle path while it connects."""
        router = request_router(self._handle)
        if router is not None and hasattr(router, "direct_targets"):
            for target in router.direct_targets():
                self._ready(target)
            self._offer_engines(router)

    def _prune(self, addresses: set[str]) -> None:
        self._engines.retain(addresses)
        self._multiplexed.retain(addresses)
        task = asyncio.get_running_loop().create_task(self._client.retain(addresses))
        self._pruning.add(task)
        task.add_done_callback(self._pruning.discard)

    async def close(self) -> None:
        """After the front door's server has stopped (its calls are cancelled, so channels in
        their grace period close at once)."""
        self._engines.close()
        await self._multiplexed.close()
        await self._client.close()
        if self._pruning:
            _, late = await asyncio.wait(set(self._pruning), timeout=5.0)
            for task in late:
                task.cancel()


class ReplicaStream:
    """One request's stream of TokenChunks; `close()` cancels it unless it finished."""

    def __init__(self, streams: ReplicaStreams, request: GenerateRequest, route, engine=None) -> None:
        self._streams = streams
        self._request = request
        self._route = route
        self._direct = None
        if engine is not None:
            self._direct = EngineStream(engine, request)
        elif route is not None:
            client = streams._multiplexed if route.target.multiplexed else streams._client
            self._direct = client.open(route.target, request)
        self._response = None if route is not None else streams._generate.remote(request)
        self._finished = False

    async def __aiter__(self) -> AsyncIterator[TokenChunk]:
        if self._direct is not None:
            try:
                async for chunk in self._direct:
                    # Set before the yield: the consumer returns on the last chunk without resuming
                    # us, and cancelling a finished call costs the replica a cancellation for nothing.
                    self._finished = chunk.finish_reason is not None
                    yield chunk
                return
            except Rejected as refusal:
                # full / stopping / unreachable are routine; a refused token is a misconfiguration
                level = logging.WARNING if refusal.reason == "token" else logging.DEBUG
                log.log(level, "request_id=%s replica %s refused the direct stream (%s): through the Serve "
                        "handle", self._request.request_id, self._route.replica, refusal)
            finally:
                self._route.release()
            self._direct = None
            self._streams._counted[SERVE_HANDLE_AFTER_REFUSAL].inc()
            self._response = self._streams._generate.remote(self._request)
        await self._assigned()
        async for chunk in self._response:
            self._finished = chunk.finish_reason is not None
            yield chunk

    async def _assigned(self) -> None:
        """Wait for Serve to give the handle call a replica, at most replica_wait_s."""
        assignment = replica_assignment(self._response)
        if assignment is None or assignment.done():
            return
        try:
            async with asyncio.timeout(self._streams.replica_wait_s):
                await asyncio.shield(assignment)
        except TimeoutError:
            self._response.cancel()
            raise NoReplicaError(f"no model replica took the request within {self._streams.replica_wait_s:g} s "
                                 "(frontdoor.replica_wait_s)") from None

    def close(self) -> None:
        if self._finished:
            return
        if self._direct is not None:
            self._direct.cancel()
        if self._response is not None:
            self._response.cancel()
