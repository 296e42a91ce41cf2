"""The direct token stream: one gRPC stream from the front door straight to a replica.

Through a Serve handle, a request costs Serve's assign and routing tasks, Ray's authentication
interceptors on the replica's gRPC server, and the rejection protocol's "accepted" round trip
before the first token (docs/performance.md, "Time to first token at concurrency 1"). Each
ModelReplica therefore also serves `generate` on a small grpc.aio server of its own, and
publishes where in its Serve replica metadata (`record_replica_metadata`), so the front door's
Serve router (router.py) still chooses the replica and the front door then streams from it
directly (replica_streams.py). The Serve handle stays the path for everything else and the
fallback whenever the direct stream cannot take a request.

Wire format: the request is a pickled GenerateRequest; every response message is a pickled
TokenChunk, or, last, the exception the replica raised (an engine error, which pickles to its
own type, so the front door maps it exactly as it maps one that came through Ray).

Who may call: each replica draws a random token and publishes it only in its replica metadata,
which reaches the routers of its own Serve application and nobody outside the Ray cluster; a
call without it is refused before its request is unpickled.

Transport: TLS unless the operator turns it off (serving.direct_stream_tls false). The replica
publishes, with its address and token, the PEM the front door is to trust for it: its own
certificate when it made one at start (the default: a fresh key and self-signed certificate for
its node IP, so there is nothing to configure), or the CA of a certificate from files
(serving.direct_stream_cert_file/key_file/ca_file, e.g. a mounted Secret) or of Ray's TLS
(RAY_USE_TLS with RAY_TLS_SERVER_CERT/KEY and RAY_TLS_CA_CERT). The metadata travels through Ray's
own (authenticated) control plane, so a front door only completes a handshake with that replica.

Refusals the caller routes elsewhere (`Rejected`): the replica already has
serving.max_ongoing_requests generate calls in flight (the limit Serve enforces on its own path),
it is stopping, or it cannot be reached. A replica only refuses before its first token; a
failure after that ends the call as UNAVAILABLE (ConnectionError), as on the Serve path.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import pickle
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, Callable

import grpc

from cluster.engine.request import GenerateRequest, TokenChunk

log = logging.getLogger(__name__)

METHOD = "/gptoss.internal.ReplicaStream/Generate"
MULTIPLEX_METHOD = "/gptoss.internal.ReplicaStream/Multiplex"  # multiplexed_stream.py
METADATA_KEY = "direct_stream"  # the replica metadata entry: {"address": "host:port", "token": "..."}
TOKEN_HEADER = "x-gptoss-replica-token"
REFUSED_HEADER = "x-gptoss-refused"  # trailing metadata of a refusal: "full" or "stopping"

# A prompt filling a 128k context pickles to ~0.7 MB; 64 MiB leaves any chunk room (gRPC's default is 4 MB).
_MESSAGE_LIMITS = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
# Dead peers are noticed by keepalive pings within ~15 s even when no packet comes back.
_CHANNEL_OPTIONS = [("grpc.keepalive_time_ms", 10_000), ("grpc.keepalive_timeout_ms", 5_000),
                    ("grpc.keepalive_permit_without_calls", 1), ("grpc.http2.max_pings_without_data", 0),
                    *_MESSAGE_LIMITS]
_SERVER_OPTIONS = [("grpc.http2.min_recv_ping_interval_without_data_ms", 5_000), ("grpc.http2.max_ping_strikes", 0),
                   ("grpc.keepalive_permit_without_calls", 1), ("grpc.so_reuseport", 0), *_MESSAGE_LIMITS]


# How long a channel to a replica that left the routable set stays open for its running streams
# (a stopping replica itself gives them serving.graceful_shutdown_timeout_s at most).
STREAM_GRACE_S = 3600.0


class Rejected(Exception):
    """The replica did not take the request: route it elsewhere. `reason`: "full", "stopping",
    "unreachable" or "token" (the replica did not accept our token)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True)
class DirectAddress:
    address: str  # host:port
    token: str
    trust_pem: str = ""  # what the client trusts for this replica's certificate; "": plaintext
    server_name: str = ""  # the name its certificate is checked against ("": the address's host)
    multiplexed: bool = False  # it serves the multiplexed stream (multiplexed_stream.py), which the front door uses
    credits: bool = False  # its multiplexed stream takes credit frames: per-request flow control
    socket: str = ""  # host:port of its multiplexed stream's own socket (framed_socket.py), which the front door then uses

    @classmethod
    def from_metadata(cls, metadata: dict) -> "DirectAddress | None":
        entry = metadata.get(METADATA_KEY)
        if not isinstance(entry, dict) or not entry.get("address") or not entry.get("token"):
            return None
        return cls(str(entry["address"]), str(entry["token"]), str(entry.get("trust_pem") or ""),
                   str(entry.get("server_name") or ""), entry.get("kind") == "multiplexed",
                   entry.get("credits") is True, str(entry.get("socket") or ""))


def host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# ─────────────────────────────────────────────── TLS ───────────────────────────────────────────────

@dataclass(frozen=True)
class DirectStreamTls:
    """The replica's key and certificate chain, and the PEM clients are to trust for it."""

    key_pem: bytes
    cert_pem: bytes
    trust_pem: bytes
    server_name: str = ""

    @classmethod
    def self_signed(cls, host: str, valid_days: int = 365) -> "DirectStreamTls":
        """A fresh P-256 key and a certificate for `host` (an IP or a DNS name) signed by itself."""
        import datetime
        import ipaddress

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"gptoss replica {host}")])
        try:
            san: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host))
        except ValueError:
            san = x509.DNSName(host)
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(hours=1))
                .not_valid_after(now + datetime.timedelta(days=valid_days))
                .add_extension(x509.SubjectAlternativeName([san]), critical=False)
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .sign(key, hashes.SHA256()))
        cert_pem = cert.public_bytes(serialization.Encoding.PEM)
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        return cls(key_pem, cert_pem, cert_pem)

    @classmethod
    def from_files(cls, cert_file: str, key_file: str, ca_file: str | None, server_name: str = "") -> "DirectStreamTls":
        """A certificate from files; clients trust `ca_file` (or the certificate itself, if self-signed)."""
        cert_pem = Path(cert_file).read_bytes()
        trust = Path(ca_file).read_bytes() if ca_file else cert_pem
        return cls(Path(key_file).read_bytes(), cert_pem, trust, server_name)


def ray_tls_files(env=None) -> tuple[str, str, str] | None:
    """(server cert, key, CA) of Ray's TLS when RAY_USE_TLS is on, else None."""
    env = os.environ if env is None else env
    if env.get("RAY_USE_TLS", "0").lower() not in ("1", "true"):
        return None
    files = (env.get("RAY_TLS_SERVER_CERT", ""), env.get("RAY_TLS_SERVER_KEY", ""), env.get("RAY_TLS_CA_CERT", ""))
    return files if all(files) else None


# ─────────────────────────────────────── the replica's side ───────────────────────────────────────

class DirectStreamServer:
    """Serves `generate` (an async generator of TokenChunk) on a port of its own, refusing new
    streams while `full()` says the replica has as many requests as it takes. `kind`
    (serving.replica_stream) "multiplexed" also serves the multiplexed stream and announces it;
    "socket" serves it on a socket of its own as well, which front doors then use (older front
    doors, which know no socket, use the Multiplex call)."""

    def __init__(self, generate: Callable[[GenerateRequest], AsyncIterator[TokenChunk]],
                 full: Callable[[], bool], kind: str = "per_request") -> None:
        self._generate = generate
        self._full = full
        self._token = secrets.token_urlsafe(24)
        self._server: grpc.aio.Server | None = None
        self._stopping = False
        self._multiplexed = self._framed = None
        if kind in ("multiplexed", "socket"):
            from cluster.serving.multiplexed_stream import MultiplexServer  # it imports this module

            self._multiplexed = MultiplexServer(generate, self._refusal)
        if kind == "socket":
            from cluster.serving.framed_socket import FramedServer  # it imports this module

            self._framed = FramedServer(self._token, self._multiplexed.serve_frames, lambda: self._stopping)

    async def start(self, host: str, tls: DirectStreamTls | None) -> dict:
        """Listen on a free port of `host` (the Ray node's IP, which front doors reach), with TLS
        unless `tls` is None; returns the replica metadata entry that announces it."""
        server = grpc.aio.server(options=_SERVER_OPTIONS)
        handlers = {METHOD.split("/")[2]: grpc.unary_stream_rpc_method_handler(self._serve)}  # bytes in, bytes out
        if self._multiplexed is not None:
            handlers[MULTIPLEX_METHOD.split("/")[2]] = grpc.stream_stream_rpc_method_handler(self._multiplex)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(METHOD.split("/")[1], handlers),))
        if tls is None:
            port = server.add_insecure_port(host_port(host, 0))
        else:
            port = server.add_secure_port(host_port(host, 0),
                                          grpc.ssl_server_credentials([(tls.key_pem, tls.cert_pem)]))
        if port == 0:
            raise OSError(f"direct stream: cannot listen on {host}")
        await server.start()
        self._server = server
        entry = {"address": host_port(host, port), "token": self._token}
        if tls is not None:
            entry.update(trust_pem=tls.trust_pem.decode(), server_name=tls.server_name)
        if self._multiplexed is not None:
            entry.update(kind="multiplexed", credits=True)
        if self._framed is not None:
            entry.update(socket=await self._framed.start(host, tls))
        return {METADATA_KEY: entry}

    async def stop(self, grace_s: float) -> None:
        """Refuse new streams, let those in flight finish for up to `grace_s`, then close."""
        self._stopping = True
        if self._multiplexed is not None:
            self._multiplexed.drain()
        server, self._server = self._server, None
        await asyncio.gather(*(s.stop(grace_s) for s in (server, self._framed) if s is not None))

    async def _refuse(self, context: grpc.aio.ServicerContext, why: str, code: grpc.StatusCode) -> None:
        context.set_trailing_metadata(((REFUSED_HEADER, why),))
        await context.abort(code, f"replica refused the stream: {why}")

    async def _check_token(self, context: grpc.aio.ServicerContext) -> None:
        token = dict(context.invocation_metadata() or ()).get(TOKEN_HEADER, "")
        if not hmac.compare_digest(str(token).encode(), self._token.encode()):
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "wrong or missing replica token")

    def _refusal(self) -> str | None:
        return "stopping" if self._stopping else "full" if self._full() else None

    async def _multiplex(self, _requests, context: grpc.aio.ServicerContext) -> None:
        await self._check_token(context)
        if self._stopping:
            await self._refuse(context, "stopping", grpc.StatusCode.UNAVAILABLE)
        await self._multiplexed.serve(context)

    async def _serve(self, request_bytes: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        await self._check_token(context)
        if self._stopping:
            await self._refuse(context, "stopping", grpc.StatusCode.UNAVAILABLE)
        if self._full():
            await self._refuse(context, "full", grpc.StatusCode.RESOURCE_EXHAUSTED)
        try:
            async for chunk in self._generate(pickle.loads(request_bytes)):
                yield pickle.dumps(chunk, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as err:  # noqa: BLE001 - the front door maps it, as it does Ray's
            yield _pickled_error(err)


def _pickled_error(err: Exception) -> bytes:
    try:
        return pickle.dumps(err, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:  # noqa: BLE001 - an exception that does not pickle still ends the call clearly
        log.exception("direct stream: the replica's error does not pickle")
        return pickle.dumps(RuntimeError(f"replica error {type(err).__name__}: {err}"))


# ─────────────────────────────────────── the front door's side ───────────────────────────────────────

class DirectStreamClient:
    """One channel per replica address, kept open; `open` starts a stream on one."""

    def __init__(self) -> None:
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._trust: dict[str, tuple[str, str]] = {}  # address -> (trust_pem, server_name) of its channel
        self._replaced: list[grpc.aio.Channel] = []
        self._closing: set[asyncio.Task] = set()

    def channel(self, target: DirectAddress) -> grpc.aio.Channel:
        address, trust = target.address, (target.trust_pem, target.server_name)
        channel = self._channels.get(address)
        if channel is not None and self._trust.get(address) != trust:  # a new replica on the same port
            self._close_later(self._channels.pop(address))
            channel = None
        if channel is None:
            if target.trust_pem:
                options = list(_CHANNEL_OPTIONS)
                if target.server_name:
                    options.append(("grpc.ssl_target_name_override", target.server_name))
                credentials = grpc.ssl_channel_credentials(root_certificates=target.trust_pem.encode())
                channel = grpc.aio.secure_channel(address, credentials, options=options)
            else:
                channel = grpc.aio.insecure_channel(address, options=_CHANNEL_OPTIONS)
            self._channels[address], self._trust[address] = channel, trust
        return channel

    def _close_later(self, channel: grpc.aio.Channel) -> None:
        """Close a replaced channel once its streams are done (or at close())."""
        self._replaced.append(channel)
        task = asyncio.get_running_loop().create_task(channel.close(STREAM_GRACE_S))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def ready(self, target: DirectAddress) -> bool:
        """Whether `target` has a connected channel; asks an idle one to connect. Only ready
        channels take requests, so a new or unreachable replica never makes a request wait for a
        connection (it goes through Serve meanwhile)."""
        state = self.channel(target).get_state(try_to_connect=True)
        return state == grpc.ChannelConnectivity.READY

    def open(self, target: DirectAddress, request: GenerateRequest) -> "DirectStream":
        call = self.channel(target).unary_stream(METHOD)(
            pickle.dumps(request, protocol=pickle.HIGHEST_PROTOCOL), metadata=((TOKEN_HEADER, target.token),))
        return DirectStream(call)

    async def retain(self, addresses: set[str], grace_s: float | None = STREAM_GRACE_S) -> None:
        """Close the channels of replicas no longer routable. A replica leaves the set when it
        starts stopping, with streams still running on it: those get `grace_s` to finish (new
        calls go to a new channel if the replica comes back)."""
        stale = [self._channels.pop(a) for a in list(self._channels) if a not in addresses]
        for address in [a for a in self._trust if a not in addresses]:
            del self._trust[address]
        await asyncio.gather(*(channel.close(grace_s) for channel in stale))

    async def close(self) -> None:
        """Close every channel now (the front door has cancelled its calls already)."""
        await self.retain(set(), grace_s=None)
        replaced, self._replaced = self._replaced, []
        await asyncio.gather(*(channel.close(None) for channel in replaced))


class DirectStream:
    """One direct call: iterate for TokenChunks; `cancel()` ends it (the replica stops decoding)."""

    def __init__(self, call) -> None:
        self._call = call
        self.started = False  # a chunk arrived: from here on a failure is not a refusal

    def cancel(self) -> None:
        self._call.cancel()

    async def __aiter__(self) -> AsyncIterator[TokenChunk]:
        while True:
            try:
                message = await self._call.read()
            except grpc.aio.AioRpcError as err:
                raise failure(err, self.started) from None
            if message is grpc.aio.EOF:
                return
            item = pickle.loads(message)
            if isinstance(item, BaseException):
                raise item
            self.started = True
            yield item


def failure(err: grpc.aio.AioRpcError, started: bool) -> Exception:
    """What a failed call means for a stream that had (`started`) or had not yet received a chunk."""
    refused = dict(err.trailing_metadata() or ()).get(REFUSED_HEADER)
    if not started and refused:
        return Rejected(refused)
    if not started and err.code() == grpc.StatusCode.UNAVAILABLE:
        return Rejected("unreachable", err.details())
    if err.code() == grpc.StatusCode.PERMISSION_DENIED:
        return Rejected("token", err.details())
    # CANCELLED here came from the replica's side (ours raises CancelledError instead).
    return ConnectionError(f"direct stream to the replica failed: {err.code().name} {err.details()}")
