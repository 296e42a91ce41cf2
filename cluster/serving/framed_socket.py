"""The multiplexed replica stream on a socket of its own (serving.replica_stream "socket").

The frames are multiplexed_stream.py's, unchanged; only what carries them differs. Instead of a
gRPC call, the front door holds one TLS connection (plaintext when serving.direct_stream_tls is
false) to a listening socket the replica opens beside its direct-stream gRPC server, with the
same certificate and token. Each message is a 4-byte little-endian length and the pickled list of
frames. A grpc.aio message costs each side its HTTP/2 framing and a hop through gRPC's completion
queue thread; on loopback with TLS a round trip on this socket took 0.32 ms against the Multiplex
call's 0.60 ms, with less CPU on both sides (docs/performance.md, "The multiplexed stream on a
socket").

The connection opens with a handshake that is read before anything is unpickled: MAGIC, the
token's length (one byte) and the token, then the front door's credit window (4 bytes, 0 for no
flow control). The replica answers one byte: OK, or why it refuses (a wrong token, stopping) and
closes. A connection that does not complete the handshake in HANDSHAKE_S is closed.

Dead peers: TCP keepalive probes after 10 s of silence, and TCP_USER_TIMEOUT on data left
unacknowledged, notice a peer whose node is gone within ~15 s, as the gRPC channel's keepalive
pings do.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import socket
import ssl
import struct
import tempfile
from pathlib import Path
from typing import Awaitable, Callable

from cluster.serving.direct_stream import DirectAddress, DirectStreamTls, Rejected, host_port

log = logging.getLogger(__name__)

MAGIC = b"gptoss-multiplex/1\n"
OK, WRONG_TOKEN, STOPPING = b"\x00", b"T", b"S"
_REFUSALS = {WRONG_TOKEN: "token", STOPPING: "stopping"}
_LENGTH = struct.Struct("<I")
MAX_MESSAGE = 64 << 20  # as the gRPC channels' limit: a prompt filling a 128k context pickles to ~0.7 MB
HANDSHAKE_S = 10.0
CONNECT_S = 10.0


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def _keepalive(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is None:
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in (("TCP_KEEPIDLE", 10), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 1),
                          ("TCP_USER_TIMEOUT", 15_000)):
        if hasattr(socket, option):  # Linux; elsewhere the system's keepalive defaults
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)


def hello(token: bytes, window: int) -> bytes:
    """What a front door sends first: MAGIC, the token's length and the token, its credit window."""
    return MAGIC + bytes([len(token)]) + token + _LENGTH.pack(window)


async def _read_message(reader: asyncio.StreamReader) -> bytes | None:
    """The next message; None when the peer closed the connection between messages."""
    try:
        header = await reader.readexactly(_LENGTH.size)
    except asyncio.IncompleteReadError as err:
        if err.partial:
            raise ConnectionError("the connection ended inside a message header") from None
        return None
    (size,) = _LENGTH.unpack(header)
    if size > MAX_MESSAGE:
        raise ConnectionError(f"a message of {size} bytes is over the limit of {MAX_MESSAGE}")
    return await reader.readexactly(size)


async def _write_message(writer: asyncio.StreamWriter, message: bytes) -> None:
    writer.write(_LENGTH.pack(len(message)) + message)
    await writer.drain()


# ─────────────────────────────────────── the replica's side ───────────────────────────────────────

def _server_context(tls: DirectStreamTls) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with tempfile.TemporaryDirectory() as folder:  # ssl loads a key only from a file; the folder is ours alone (0700)
        cert, key = Path(folder, "cert.pem"), Path(folder, "key.pem")
        cert.write_bytes(tls.cert_pem)
        key.write_bytes(tls.key_pem)
        context.load_cert_chain(cert, key)
    return context


class FramedServer:
    """A replica's listening socket for the multiplexed stream. Each connection that passes the
    handshake goes to `serve(read, write, window)` (MultiplexServer.serve_frames); `stopping()`
    says whether new connections are refused."""

    def __init__(self, token: str, serve: Callable[..., Awaitable[None]], stopping: Callable[[], bool]) -> None:
        self._token = token.encode()
        self._serve = serve
        self._stopping = stopping
        self._server: asyncio.Server | None = None
        self._connections: dict[asyncio.Task, asyncio.StreamWriter] = {}

    async def start(self, host: str, tls: DirectStreamTls | None) -> str:
        """Listen on a free port of `host`; returns its "host:port"."""
        self._server = await asyncio.start_server(
            self._accept, host, 0, ssl=_server_context(tls) if tls is not None else None,
            ssl_handshake_timeout=HANDSHAKE_S if tls is not None else None)
        return host_port(host, self._server.sockets[0].getsockname()[1])

    async def stop(self, grace_s: float) -> None:
        """Take no new connections; those open get `grace_s` to end (a stopping replica ends each
        once its requests are done), then they are cut."""
        if self._server is None:
            return
        self._server.close()
        self._server = None
        if self._connections:
            _, late = await asyncio.wait(list(self._connections), timeout=grace_s)
            for task in late:
                self._connections[task].transport.abort()
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._connections[task] = writer
        try:
            _keepalive(writer)
            window = await asyncio.wait_for(self._handshake(reader, writer), HANDSHAKE_S)
            if window is not None:
                await self._serve(lambda: _read_message(reader), lambda m: _write_message(writer, m), window)
        except (OSError, asyncio.IncompleteReadError, TimeoutError) as err:
            log.debug("multiplexed socket: connection from %s ended: %r", writer.get_extra_info("peername"), err)
        finally:
            del self._connections[task]
            writer.close()

    async def _handshake(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> int | None:
        """The front door's credit window once its token is checked; None: refused (and told why)."""
        if await reader.readexactly(len(MAGIC)) != MAGIC:
            return None
        (size,) = await reader.readexactly(1)
        token = await reader.readexactly(size)
        (window,) = _LENGTH.unpack(await reader.readexactly(_LENGTH.size))
        answer = OK
        if not hmac.compare_digest(token, self._token):
            answer = WRONG_TOKEN
        elif self._stopping():
            answer = STOPPING
        writer.write(answer)
        await writer.drain()
        return window if answer == OK else None


# ─────────────────────────────────────── the front door's side ───────────────────────────────────────

def _client_context(target: DirectAddress) -> ssl.SSLContext:
    return ssl.create_default_context(cadata=target.trust_pem)  # trusts only what the replica announced


class FramedCall:
    """The front door's end of one connection to a replica's socket, as multiplexed_stream's
    Connection uses a call: `read()`, `write(message)`, `cancel()`. It connects at once; what is
    written meanwhile waits for the connection, and `connected` says whether it is up."""

    def __init__(self, target: DirectAddress, window: int) -> None:
        self.connected = False
        self.unreachable = ""  # why connecting failed, when it did for want of a connection (not a refusal)
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._connecting = asyncio.ensure_future(self._connect(target, window))
        self._connecting.add_done_callback(lambda f: f.cancelled() or f.exception())  # read() reports it

    async def _connect(self, target: DirectAddress, window: int) -> None:
        try:
            await self._handshake(target, window)
        except (OSError, TimeoutError, asyncio.IncompleteReadError) as err:
            self.unreachable = repr(err)
            raise

    async def _handshake(self, target: DirectAddress, window: int) -> None:
        host, port = _split(target.socket)
        context = _client_context(target) if target.trust_pem else None
        async with asyncio.timeout(CONNECT_S):
            reader, writer = await asyncio.open_connection(
                host, port, ssl=context, server_hostname=(target.server_name or host) if context else None)
            try:
                _keepalive(writer)
                writer.write(hello(target.token.encode(), window))
                answer = await reader.readexactly(1)
            except BaseException:
                writer.close()
                raise
        if answer != OK:
            writer.close()
            raise Rejected(_REFUSALS.get(answer, "token"), f"the replica's socket at {target.socket} refused us")
        self._reader, self._writer = reader, writer
        self.connected = True

    async def read(self) -> bytes | None:
        if not self.connected:
            await self._connecting
        return await _read_message(self._reader)

    async def write(self, message: bytes) -> None:
        if not self.connected:
            await self._connecting
        await _write_message(self._writer, message)

    def cancel(self) -> None:
        self._connecting.cancel()
        if self._writer is not None:
            self._writer.close()

    @staticmethod
    def failure(error: Exception, started: bool) -> Exception:
        """What a failed connection means for a request that had (`started`) or had not received a chunk."""
        if isinstance(error, Rejected):  # the handshake's refusal, before any request ran
            return error
        if not started:
            return Rejected("unreachable", repr(error))
        return ConnectionError(f"the multiplexed socket to the replica failed: {error!r}")
