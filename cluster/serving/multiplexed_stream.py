"""The multiplexed replica stream: one long-lived gRPC call per (front door, replica) pair carries
the tokens of all the requests between them (serving.replica_stream "multiplexed").

The per-request direct stream (direct_stream.py) sends each token chunk as a gRPC message of its
own, so at 32 concurrent streams an engine step costs 32 grpc.aio messages on each side. Here one
bidirectional call ("Multiplex", on the replica's direct-stream server: same port, TLS and token)
carries, front door -> replica, ("open", id, GenerateRequest) and ("cancel", id) frames and,
replica -> front door, events: (id, TokenChunk), (id, exception), (id, None) at the end of a
request, and (id, "full" | "stopping") when the replica refuses it. Each side queues what it has
to send in an `_Outbox` whose single writer sends everything queued as ONE pickled list per
message: the chunks an engine step yields for all its requests leave in one message.

Flow control is per request, as the per-request call's own gRPC window gives it: the front door
opens the call with a window of WINDOW chunks (the x-gptoss-credit-window header) and grants more
with ("credit", id, n) frames as its consumer reads them; a request that has used its window waits
in the replica, without pulling its engine stream further, so a client that stops reading holds
the rest of its tokens where the engine keeps them (vLLM merges them into one output), not in the
front door. A replica announces that it takes credits ("credits" in its metadata); a front door
that does not send the header gets no window, as before flow control was added.

Semantics are the per-request stream's: a refusal comes before the first token (`Rejected`, the
front door routes the request through the Serve handle instead); the replica's
max_ongoing_requests check counts these requests (they run the replica's own `_stream`);
cancelling a request closes its engine stream; engine errors arrive pickled, with their type; a
lost connection ends each request on it as the per-request stream would end it (ConnectionError
after the first token), and the next request opens a new connection; a stopping replica refuses
new requests, lets the accepted ones finish, then ends the call.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import pickle
from typing import AsyncIterator, Awaitable, Callable

import grpc

from cluster.engine.request import GenerateRequest, TokenChunk
from cluster.serving.direct_stream import (MULTIPLEX_METHOD, TOKEN_HEADER, DirectAddress, DirectStreamClient,
                                          Rejected, failure)

log = logging.getLogger(__name__)

WINDOW_HEADER = "x-gptoss-credit-window"
WINDOW = 64  # chunks a request may be ahead of its consumer; credit is returned half a window at a time


class _Outbox:
    """Items queued by many tasks; `run()` writes all those queued so far as one pickled list."""

    def __init__(self, write: Callable[[bytes], Awaitable[None]]) -> None:
        self._write = write
        self._items: list = []
        self._ready = asyncio.Event()
        self._closed = False
        self.messages = 0

    def put(self, item) -> None:
        self._items.append(item)
        self._ready.set()

    def close(self) -> None:
        """`run()` returns once what is queued is written."""
        self._closed = True
        self._ready.set()

    async def run(self) -> None:
        # Tasks woken by the same engine step run before this one does: their items leave together.
        while True:
            await self._ready.wait()
            self._ready.clear()
            if self._items:
                items, self._items = self._items, []
                self.messages += 1
                await self._write(pickle.dumps(items, protocol=pickle.HIGHEST_PROTOCOL))
            if self._closed and not self._items:
                return


def _picklable(err: Exception) -> Exception:
    try:
        pickle.dumps(err, protocol=pickle.HIGHEST_PROTOCOL)
        return err
    except Exception:  # noqa: BLE001 - one bad exception must not break the message it travels in
        log.exception("multiplexed stream: the replica's error does not pickle")
        return RuntimeError(f"replica error {type(err).__name__}: {err}")


def _retrieved(task: asyncio.Task) -> None:
    """A reader or writer ends with the call's error when the call breaks; the other side of the
    connection reports that, so it is only logged here."""
    if not task.cancelled() and task.exception() is not None:
        log.debug("multiplexed stream: %r", task.exception())


# ─────────────────────────────────────── the replica's side ───────────────────────────────────────

class MultiplexServer:
    """Serves the Multiplex calls of a replica's direct-stream server (which checks the token
    first). `refusal()` says why the replica takes no new request now ("full", "stopping") or None."""

    def __init__(self, generate: Callable[[GenerateRequest], AsyncIterator[TokenChunk]],
                 refusal: Callable[[], str | None]) -> None:
        self._generate = generate
        self._refusal = refusal
        self._calls: set[_ReplicaCall] = set()

    async def serve(self, context: grpc.aio.ServicerContext) -> None:
        """One gRPC Multiplex call (the token is checked already)."""
        window = int(dict(context.invocation_metadata() or ()).get(WINDOW_HEADER) or 0)

        async def read() -> bytes | None:
            message = await context.read()
            return None if message is grpc.aio.EOF else message

        await self.serve_frames(read, context.write, window)

    async def serve_frames(self, read: Callable[[], Awaitable[bytes | None]],
                           write: Callable[[bytes], Awaitable[None]], window: int) -> None:
        """One connection, on any transport: `read()` returns a message (None at the end), `write`
        sends one; `window` is the front door's credit window (0: no flow control)."""
        call = _ReplicaCall(self, read, write, window)
        self._calls.add(call)
        try:
            await call.run()
        finally:
            self._calls.discard(call)

    def drain(self) -> None:
        """The replica is stopping: each call ends once its requests have."""
        for call in self._calls:
            call.drain()


class _ReplicaCall:
    def __init__(self, server: MultiplexServer, read: Callable[[], Awaitable[bytes | None]],
                 write: Callable[[bytes], Awaitable[None]], window: int) -> None:
        self._server = server
        self._receive = read
        self._outbox = _Outbox(write)
        self._requests: dict[int, asyncio.Task] = {}
        self._window = window  # 0: no flow control
        self._credits: dict[int, _Credit] = {}
        self._ended = asyncio.get_running_loop().create_future()
        self._draining = False

    async def run(self) -> None:
        reader = asyncio.create_task(self._read())
        writer = asyncio.create_task(self._outbox.run())
        for task in (reader, writer):
            task.add_done_callback(_retrieved)
            task.add_done_callback(self._end)
        try:
            await self._ended
            if self._draining:  # every request ended: send their last events, then end the call
                self._outbox.close()
                await writer
        finally:
            for task in (reader, writer, *self._requests.values()):
                task.cancel()

    def _end(self, _=None) -> None:
        if not self._ended.done():
            self._ended.set_result(None)

    def drain(self) -> None:
        self._draining = True
        if not self._requests:
            self._end()

    async def _read(self) -> None:
        while (message := await self._receive()) is not None:
            for frame in pickle.loads(message):
                kind, rid = frame[0], frame[1]
                if kind == "open":
                    await self._open(rid, frame[2])
                elif kind == "credit":
                    if (credit := self._credits.get(rid)) is not None:
                        credit.grant(frame[2])
                elif kind == "cancel" and (task := self._requests.get(rid)) is not None:
                    task.cancel()

    async def _open(self, rid: int, request: GenerateRequest) -> None:
        refusal = self._server._refusal()
        if refusal is not None:
            self._outbox.put((rid, refusal))
            return
        credit = None
        if self._window > 0:
            credit = self._credits[rid] = _Credit(self._window)
        task = asyncio.create_task(self._run(rid, request, credit))
        self._requests[rid] = task
        task.add_done_callback(lambda _: self._finished(rid))
        # Let the request start (and the replica count it) before the next frame's full check.
        await asyncio.sleep(0)

    async def _run(self, rid: int, request: GenerateRequest, credit: "_Credit | None") -> None:
        put = self._outbox.put
        try:
            async for chunk in self._server._generate(request):
                if credit is not None:
                    if credit.left <= 0:
                        await credit.granted()
                    credit.left -= 1
                put((rid, chunk))
        except Exception as err:  # noqa: BLE001 - the front door maps it, as it does Ray's
            put((rid, _picklable(err)))
        else:
            put((rid, None))

    def _finished(self, rid: int) -> None:
        del self._requests[rid]
        self._credits.pop(rid, None)
        if self._draining and not self._requests:
            self._end()


class _Credit:
    """The chunks one request may still send before its consumer has read more."""

    def __init__(self, window: int) -> None:
        self.left = window
        self._more = asyncio.Event()

    def grant(self, n: int) -> None:
        self.left += n
        self._more.set()

    async def granted(self) -> None:
        while self.left <= 0:
            self._more.clear()
            await self._more.wait()


# ─────────────────────────────────────── the front door's side ───────────────────────────────────────

class MultiplexedClient:
    """One multiplexed connection per replica: a Multiplex call on the per-request client's channel
    to it (which owns the channels: TLS, replacement, closing), or a connection to the replica's
    own socket where it announces one (framed_socket.py); `open` sends a request on it."""

    def __init__(self, channels: DirectStreamClient) -> None:
        self._channels = channels
        self._connections: dict[str, Connection] = {}
        self._unreachable_sockets: dict[str, str] = {}  # replica address -> its socket this front door cannot reach

    def ready(self, target: DirectAddress) -> bool:
        """Whether a request to `target` goes out now without waiting for a connection; starts
        connecting if it would wait (the request then takes the Serve handle meanwhile)."""
        target = self._usable(target)
        if not target.socket:
            return self._channels.ready(target)
        return self._connection(target).call.connected

    def open(self, target: DirectAddress, request: GenerateRequest) -> "MultiplexedStream":
        return self._connection(self._usable(target)).open(request)

    def _usable(self, target: DirectAddress) -> DirectAddress:
        """`target`, without its socket if this front door could not connect to it (a network
        policy that lets only the gRPC port through, say): then the Multiplex call carries the
        stream instead of every request taking the Serve handle."""
        if not target.socket:
            return target
        connection = self._connections.get(target.address)
        if (connection is not None and connection.broken and connection.target == target
                and getattr(connection.call, "unreachable", "")
                and self._unreachable_sockets.get(target.address) != target.socket):
            self._unreachable_sockets[target.address] = target.socket
            log.warning("multiplexed stream: cannot connect to replica socket %s (%s); using its gRPC "
                        "Multiplex call at %s instead", target.socket, connection.call.unreachable, target.address)
        if self._unreachable_sockets.get(target.address) == target.socket:
            return dataclasses.replace(target, socket="")
        return target

    def _connection(self, target: DirectAddress) -> "Connection":
        connection = self._connections.get(target.address)
        channel = None if target.socket else self._channels.channel(target)
        if connection is not None and not connection.broken and connection.target == target and (
                channel is None or connection.call.channel is channel):
            return connection
        if connection is not None:
            connection.drain()
        window = WINDOW if target.credits else 0
        if target.socket:
            from cluster.serving.framed_socket import FramedCall  # it imports this module

            call = FramedCall(target, window)
        else:
            call = _GrpcCall(channel, target.token, window)
        connection = self._connections[target.address] = Connection(call, target, window)
        return connection

    def retain(self, addresses: set[str]) -> None:
        """Replicas no longer routable: their connections end once their requests have."""
        for address in [a for a in self._connections if a not in addresses]:
            self._connections.pop(address).drain()
        for address in [a for a in self._unreachable_sockets if a not in addresses]:
            del self._unreachable_sockets[address]

    async def close(self) -> None:
        connections, self._connections = list(self._connections.values()), {}
        await asyncio.gather(*(c.close() for c in connections))


class _GrpcCall:
    """A Multiplex call on a replica's gRPC server, as a Connection uses it."""

    connected = True  # whether the channel is connected is the DirectStreamClient's to say

    def __init__(self, channel: grpc.aio.Channel, token: str, window: int) -> None:
        self.channel = channel
        metadata = ((TOKEN_HEADER, token),) + (((WINDOW_HEADER, str(window)),) if window > 0 else ())
        self._call = channel.stream_stream(MULTIPLEX_METHOD)(metadata=metadata)
        self.write = self._call.write

    async def read(self) -> bytes | None:
        message = await self._call.read()
        return None if message is grpc.aio.EOF else message

    def cancel(self) -> None:
        self._call.cancel()

    @staticmethod
    def failure(error: Exception, started: bool) -> Exception:
        if isinstance(error, grpc.aio.AioRpcError):
            return failure(error, started)
        return ConnectionError(f"the multiplexed stream to the replica failed: {error!r}")


class Connection:
    """The front door's end of one multiplexed connection (`call`: _GrpcCall or FramedCall): one
    reader hands each event to its request."""

    def __init__(self, call, target: DirectAddress, window: int = 0) -> None:
        self.call = call
        self.target = target
        self.window = window  # 0: the replica takes no credits, so none are sent
        self._streams: dict[int, MultiplexedStream] = {}
        self._next_id = 0
        self._draining = False
        self.broken = False
        self.messages = 0  # replica -> front door messages read
        self._outbox = _Outbox(call.write)
        self._tasks = [asyncio.create_task(self._outbox.run()), asyncio.create_task(self._read())]
        for task in self._tasks:
            task.add_done_callback(_retrieved)

    def open(self, request: GenerateRequest) -> "MultiplexedStream":
        self._next_id += 1
        stream = self._streams[self._next_id] = MultiplexedStream(self, self._next_id)
        self._outbox.put(("open", self._next_id, request))
        return stream

    def grant(self, rid: int, n: int) -> None:
        if rid in self._streams:
            self._outbox.put(("credit", rid, n))

    def cancel(self, rid: int) -> None:
        if self._streams.pop(rid, None) is not None:
            self._outbox.put(("cancel", rid))
            self._idle()

    def drain(self) -> None:
        self._draining = True
        self._idle()

    def _idle(self) -> None:
        if self._draining and not self._streams:
            self.call.cancel()

    async def close(self) -> None:
        self.call.cancel()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _read(self) -> None:
        streams = self._streams
        error: Exception | None = None
        try:
            while (message := await self.call.read()) is not None:
                self.messages += 1
                for rid, item in pickle.loads(message):
                    stream = streams.get(rid)
                    if stream is None:  # cancelled meanwhile
                        continue
                    if isinstance(item, TokenChunk):
                        stream.started = True  # received, even if not read yet: the end is then no refusal
                    else:
                        del streams[rid]
                    stream.deliver(item)
                self._idle()
        except asyncio.CancelledError:  # we cancelled the call (drained or closed)
            pass
        except Exception as err:  # noqa: BLE001 - the transport failed: each request learns what that means for it
            error = err
        finally:
            self.broken = True
            self._tasks[0].cancel()
            for stream in streams.values():
                stream.deliver(stream.lost(error))
            streams.clear()
            self._idle()


class MultiplexedStream:
    """One request on a Connection, used as a direct_stream.DirectStream is: iterate for
    TokenChunks (Rejected before the first for a refusal); `cancel()` ends it in the replica."""

    def __init__(self, connection: Connection, rid: int) -> None:
        self._connection = connection
        self._rid = rid
        self._items: asyncio.Queue = asyncio.Queue()
        self.started = False

    def deliver(self, item) -> None:
        self._items.put_nowait(item)

    def cancel(self) -> None:
        self._connection.cancel(self._rid)
        self.deliver(asyncio.CancelledError())

    def lost(self, error: Exception | None) -> Exception:
        """What the call's end means for this request. None: the replica ended the call without
        an error, as a stopping replica does once its requests are done."""
        if error is not None:
            return self._connection.call.failure(error, self.started)
        if not self.started:
            return Rejected("stopping")
        return ConnectionError("the multiplexed stream to the replica ended")

    async def __aiter__(self) -> AsyncIterator[TokenChunk]:
        refill = self._connection.window // 2
        read = 0
        while True:
            item = await self._items.get()
            if isinstance(item, TokenChunk):
                if refill:
                    read += 1
                    if read == refill:
                        self._connection.grant(self._rid, read)
                        read = 0
                yield item
            elif item is None:
                return
            elif isinstance(item, str):
                raise Rejected(item)
            else:
                raise item
