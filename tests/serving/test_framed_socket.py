"""The multiplexed stream's own socket (serving.replica_stream "socket") on loopback, no Ray: what
only this transport has to get right. The handshake is read before anything is unpickled: garbage,
an oversized message, a wrong token or a silent peer is turned away and the replica goes on
serving; a front door reports the connection ready only once it is up; an unreachable socket or an
untrusted certificate is a refusal (the request then takes the Serve handle), and a socket that
cannot be reached is left for the replica's gRPC call; both ends ask the kernel to notice a dead
peer. What every multiplexed transport must do alike is in
test_multiplexed_stream.py and test_direct_stream.py, run on this one too."""

from __future__ import annotations

import asyncio
import dataclasses
import socket

import pytest

from cluster.serving import framed_socket
from cluster.serving.direct_stream import DirectStreamClient, DirectStreamTls, Rejected
from cluster.serving.multiplexed_stream import MultiplexedClient
from cluster.sockets import free_port
from tests.serving.test_direct_stream import FakeEngine, collect, request, run
from tests.serving.test_direct_stream import served as direct_served
from tests.waiting import async_wait_until


def served(engine: FakeEngine, tls="self-signed"):
    return direct_served(engine, tls, kind="socket")


async def still_serves(client, target) -> None:
    assert [c.token_ids for c in await collect(client.open(target, request(3)))] == [(5,), (6,), (7,)]


async def raw_connection(target):
    """A plaintext TCP connection to the replica's socket, as anyone on the network could open."""
    host, port = framed_socket._split(target.socket)
    return await asyncio.open_connection(host, port)


@pytest.mark.parametrize("garbage", [b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"\x00" * 64,
                                     framed_socket.MAGIC + b"\x05short"], ids=["http", "zeros", "cut-short"])
def test_garbage_at_the_socket_is_closed_and_the_replica_goes_on(garbage):
    async def main():
        engine = FakeEngine()
        async with served(engine, tls=None) as (_, client, target):
            reader, writer = await raw_connection(target)
            writer.write(garbage)
            writer.write_eof()
            assert await asyncio.wait_for(reader.read(), 5) == b""  # closed without an answer
            writer.close()
            assert not engine.started.is_set()
            await still_serves(client, target)
    run(main())


def test_a_wrong_token_is_told_so_and_nothing_after_it_is_read():
    async def main():
        engine = FakeEngine()
        async with served(engine, tls=None) as (server, client, target):
            reader, writer = await raw_connection(target)
            writer.write(framed_socket.hello(b"wrong", 0) + (8).to_bytes(4, "little") + b"\x80\x05not a pickle")
            assert await asyncio.wait_for(reader.read(), 5) == framed_socket.WRONG_TOKEN
            writer.close()
            assert not engine.started.is_set() and not server._framed._connections
            await still_serves(client, target)
    run(main())


def test_an_oversized_message_after_the_handshake_ends_that_connection_only():
    async def main():
        engine = FakeEngine()
        async with served(engine, tls=None) as (_, client, target):
            await still_serves(client, target)
            reader, writer = await raw_connection(target)
            writer.write(framed_socket.hello(target.token.encode(), 0))
            assert await reader.readexactly(1) == framed_socket.OK
            writer.write((framed_socket.MAX_MESSAGE + 1).to_bytes(4, "little"))
            assert await asyncio.wait_for(reader.read(), 5) == b""
            writer.close()
            await still_serves(client, target)  # the front door's own connection was not touched
            assert len(client._connections) == 1 and not next(iter(client._connections.values())).broken
    run(main())


def test_a_peer_that_never_completes_the_handshake_is_closed(monkeypatch):
    monkeypatch.setattr(framed_socket, "HANDSHAKE_S", 0.3)

    async def main():
        async with served(FakeEngine(), tls=None) as (server, client, target):
            reader, writer = await raw_connection(target)
            writer.write(framed_socket.MAGIC)  # and then nothing
            assert await asyncio.wait_for(reader.read(), 5) == b""
            writer.close()
            assert not server._framed._connections
            await still_serves(client, target)
    run(main())


def test_ready_only_once_connected_and_requests_opened_before_that_wait_for_it():
    async def main():
        async with served(FakeEngine()) as (_, client, target):
            assert not client.ready(target)  # starts connecting; the request would take the Serve handle
            await async_wait_until(lambda: client.ready(target), 5, message="the socket connected")
            connection = client._connections[target.address]
            await still_serves(client, target)
            assert client._connections[target.address] is connection
            fresh = MultiplexedClient(DirectStreamClient())
            try:
                await still_serves(fresh, target)  # opened while connecting: sent once connected
            finally:
                await fresh.close()
    run(main())


def test_an_unreachable_socket_is_a_refusal_then_the_grpc_call_carries_the_stream(caplog):
    """A front door that cannot reach a replica's socket (a network policy letting only the gRPC
    port through, say) refuses the first request (it takes the Serve handle) and then streams on
    the replica's gRPC Multiplex call instead, saying so once."""
    async def main():
        async with served(FakeEngine()) as (_, _client, target):
            host, _ = framed_socket._split(target.socket)
            blocked = dataclasses.replace(target, socket=f"{host}:{free_port(host)}")
            client = MultiplexedClient(DirectStreamClient())
            try:
                with pytest.raises(Rejected, match="unreachable"):
                    await collect(client.open(blocked, request()))
                await async_wait_until(lambda: client.ready(blocked), 5, message="the gRPC channel ready")
                await still_serves(client, blocked)
                assert type(client._connections[target.address].call).__name__ == "_GrpcCall"
                await still_serves(client, blocked)
            finally:
                await client._channels.close()
                await client.close()
        assert sum("cannot connect to replica socket" in r.getMessage() for r in caplog.records) == 1
    run(main())


def test_an_untrusted_certificate_is_a_refusal():
    async def main():
        async with served(FakeEngine()) as (_, client, target):
            host, _ = framed_socket._split(target.socket)
            stranger = DirectStreamTls.self_signed(host).trust_pem.decode()
            impostor = dataclasses.replace(target, trust_pem=stranger, address="impostor:1")
            with pytest.raises(Rejected, match="unreachable"):
                await collect(client.open(impostor, request()))
            assert "CERTIFICATE_VERIFY_FAILED" in client._connections["impostor:1"].call.unreachable
            await still_serves(client, target)
    run(main())


def test_both_ends_ask_the_kernel_to_notice_a_dead_peer():
    async def main():
        async with served(FakeEngine()) as (server, client, target):
            await still_serves(client, target)
            connection = client._connections[target.address]
            ends = [connection.call._writer, *server._framed._connections.values()]
            assert len(ends) == 2
            for writer in ends:
                sock = writer.get_extra_info("socket")
                assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 10
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 15_000
    run(main())
