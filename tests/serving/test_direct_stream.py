"""The replica's direct token stream over real gRPC on loopback (no Ray): chunks and typed errors
arrive as sent, refusals come back as Rejected before any token, a cancelled call stops the
replica's generator, and stopping lets in-flight streams finish while refusing new ones."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses

import pytest

from cluster.engine.errors import EngineOverloadedError, InvalidRequestError
from cluster.engine.request import FinishReason, GenerateRequest, SamplingParams, TokenChunk
from cluster.serving.direct_stream import (DirectAddress, DirectStreamClient, DirectStreamServer, DirectStreamTls,
                                          Rejected)
from cluster.serving.multiplexed_stream import MultiplexedClient
from tests.waiting import async_wait_until


def request(n: int = 3, request_id: str = "r1") -> GenerateRequest:
    return GenerateRequest(prompt_token_ids=(5, 6, 7), sampling=SamplingParams(max_tokens=n), request_id=request_id)


class FakeEngine:
    """What the replica's stream would produce: n chunks of one token, `gap_s` apart; records how
    each stream ended. (The real replica's stream is exercised through Serve in the e2e tests.)"""

    def __init__(self, gap_s: float = 0.0, error: Exception | None = None) -> None:
        self.gap_s = gap_s
        self.error = error
        self.in_flight = 0
        self.limit = 8
        self.ended: list[str] = []
        self.started = asyncio.Event()

    def full(self) -> bool:
        return self.in_flight >= self.limit

    async def generate(self, req: GenerateRequest):
        self.in_flight += 1
        self.started.set()
        sent = 0
        try:
            if self.error is not None:
                raise self.error
            n = req.sampling.max_tokens
            for i in range(n):
                if i and self.gap_s:
                    await asyncio.sleep(self.gap_s)
                sent += 1
                last = i == n - 1
                yield TokenChunk((req.prompt_token_ids[i % 3],), FinishReason.LENGTH if last else None,
                                 completion_tokens=i + 1)
            self.ended.append("finished")
        except asyncio.CancelledError:
            self.ended.append(f"cancelled after {sent}")
            raise
        finally:
            self.in_flight -= 1


KINDS = ("per_request", "multiplexed", "socket")  # serving.replica_stream


@contextlib.asynccontextmanager
async def served(engine: FakeEngine, tls="self-signed", kind: str = "per_request"):
    """A direct-stream server on loopback, with TLS (a self-signed certificate, the replicas'
    default) unless tls is None, and a front door's client of `kind` for it."""
    server = DirectStreamServer(engine.generate, engine.full, kind=kind)
    metadata = await server.start("127.0.0.1", DirectStreamTls.self_signed("127.0.0.1") if tls == "self-signed" else tls)
    target = DirectAddress.from_metadata(metadata)
    channels = DirectStreamClient()
    client = MultiplexedClient(channels) if kind != "per_request" else channels
    try:
        yield server, client, target
    finally:
        if client is not channels:
            await client.close()
        await channels.close()
        await server.stop(0)


async def collect(stream) -> list[TokenChunk]:
    return [chunk async for chunk in stream]


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


def test_chunks_arrive_in_order_and_the_address_is_published():
    async def main():
        engine = FakeEngine()
        async with served(engine) as (_, client, target):
            assert target.address.startswith("127.0.0.1:") and len(target.token) >= 24
            chunks = await collect(client.open(target, request(4)))
            assert [c.token_ids for c in chunks] == [(5,), (6,), (7,), (5,)]
            assert chunks[-1].finish_reason is FinishReason.LENGTH and chunks[-1].completion_tokens == 4
            assert engine.ended == ["finished"]
    run(main())


@pytest.mark.parametrize("kind", KINDS)
def test_a_prompt_filling_a_128k_context_goes_through(kind):
    async def main():
        engine = FakeEngine()
        async with served(engine, kind=kind) as (_, client, target):
            long = GenerateRequest(prompt_token_ids=tuple(range(100_000, 100_000 + 131_072)),
                                   sampling=SamplingParams(max_tokens=2))
            chunks = await collect(client.open(target, long))
            assert [c.token_ids for c in chunks] == [(100_000,), (100_001,)]
            if kind != "per_request":  # eight at once leave in one message of ~6 MB
                together = await asyncio.gather(*(collect(client.open(target, long)) for _ in range(8)))
                assert [len(chunks) for chunks in together] == [2] * 8
    run(main())


def test_dropping_a_replica_s_channel_lets_its_running_stream_finish():
    async def main():
        engine = FakeEngine(gap_s=0.02)
        async with served(engine) as (_, client, target):
            running = asyncio.ensure_future(collect(client.open(target, request(20))))
            await engine.started.wait()
            dropping = asyncio.ensure_future(client.retain(set()))  # the replica left the routable set
            await async_wait_until(lambda: target.address not in client._channels, 5, message="channel dropped")
            assert not dropping.done()
            chunks = await running
            await asyncio.wait_for(dropping, 5)
            assert len(chunks) == 20 and engine.ended == ["finished"]
    run(main())


def test_ready_connects_an_idle_channel():
    async def main():
        async with served(FakeEngine()) as (_, client, target):
            for _ in range(200):
                if client.ready(target):
                    break
                await asyncio.sleep(0.01)
            assert client.ready(target)
            assert not client.ready(DirectAddress("127.0.0.1:1", "x"))  # nothing listens there
    run(main())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("error", [InvalidRequestError("sampling.max_tokens", "must be >= 1"),
                                   EngineOverloadedError(9, 8, retry_after_s=0.25)],
                         ids=["invalid", "overloaded"])
def test_the_replica_s_error_arrives_with_its_type_and_fields(error, kind):
    async def main():
        async with served(FakeEngine(error=error), kind=kind) as (_, client, target):
            with pytest.raises(type(error)) as raised:
                await collect(client.open(target, request()))
            assert str(raised.value) == str(error)
            assert vars(raised.value) == vars(error)
    run(main())


@pytest.mark.parametrize("kind", KINDS)
def test_a_wrong_token_is_refused_before_anything_runs(kind):
    async def main():
        engine = FakeEngine()
        async with served(engine, kind=kind) as (_, client, target):
            for wrong in ("not-the-token", ""):
                with pytest.raises(Rejected, match="token"):
                    await collect(client.open(dataclasses.replace(target, token=wrong), request()))
            assert not engine.started.is_set()
    run(main())


def test_a_full_replica_refuses_before_the_first_token():
    async def main():
        engine = FakeEngine(gap_s=0.05)
        engine.limit = 1
        async with served(engine) as (_, client, target):
            first = client.open(target, request(20))
            reader = asyncio.ensure_future(collect(first))
            await engine.started.wait()
            with pytest.raises(Rejected, match="full"):
                await collect(client.open(target, request(2, "r2")))
            first.cancel()
            with pytest.raises(asyncio.CancelledError):
                await reader
    run(main())


def test_an_unreachable_replica_is_a_refusal():
    async def main():
        client = DirectStreamClient()
        try:
            with pytest.raises(Rejected, match="unreachable"):
                await collect(client.open(DirectAddress("127.0.0.1:1", "x"), request()))
        finally:
            await client.close()
    run(main())


def test_cancelling_the_call_stops_the_replica_s_generator():
    async def main():
        engine = FakeEngine(gap_s=0.05)
        async with served(engine) as (_, client, target):
            stream = client.open(target, request(100))
            got = []
            async for chunk in stream:
                got.append(chunk)
                if len(got) == 3:
                    stream.cancel()
                    break
            for _ in range(100):
                if engine.ended:
                    break
                await asyncio.sleep(0.02)
            assert engine.ended and engine.ended[0].startswith("cancelled after "), engine.ended
            assert int(engine.ended[0].split()[-1]) < 100
            assert engine.in_flight == 0
    run(main())


def test_stopping_finishes_streams_in_flight_and_refuses_new_ones():
    async def main():
        engine = FakeEngine(gap_s=0.02)
        async with served(engine) as (server, client, target):
            running = asyncio.ensure_future(collect(client.open(target, request(25))))
            await engine.started.wait()
            stopping = asyncio.ensure_future(server.stop(10.0))
            await async_wait_until(lambda: server._stopping, 5, message="the replica's server stopping")
            with pytest.raises(Rejected):
                await collect(client.open(target, request(2, "late")))
            chunks = await running
            await stopping
            assert len(chunks) == 25 and chunks[-1].finish_reason is FinishReason.LENGTH
            assert engine.ended == ["finished"]
    run(main())


def test_a_stream_cut_after_its_first_token_is_a_connection_error_not_a_refusal():
    async def main():
        engine = FakeEngine(gap_s=0.05)
        async with served(engine) as (server, client, target):
            stream = client.open(target, request(100))
            with pytest.raises(ConnectionError):
                async for chunk in stream:
                    await server.stop(0)  # no grace: the replica goes away mid-stream
            assert stream.started
    run(main())


# ─────────────────────────────────────────── TLS ───────────────────────────────────────────

def test_tls_is_on_by_default_and_the_replica_announces_what_to_trust():
    async def main():
        async with served(FakeEngine()) as (_, client, target):
            assert target.trust_pem.startswith("-----BEGIN CERTIFICATE-----")
            chunks = await collect(client.open(target, request(3)))
            assert [c.token_ids for c in chunks] == [(5,), (6,), (7,)]
    run(main())


def test_a_plaintext_client_is_refused_by_a_tls_replica():
    async def main():
        engine = FakeEngine()
        async with served(engine) as (_, client, target):
            with pytest.raises(Rejected, match="unreachable"):  # no TLS handshake: nothing reaches the RPC
                await collect(client.open(dataclasses.replace(target, trust_pem=""), request()))
            assert not engine.started.is_set()
    run(main())


def test_a_client_trusting_another_certificate_is_refused():
    """Someone else's certificate (a man in the middle presents one) fails the handshake."""
    async def main():
        engine = FakeEngine()
        other = DirectStreamTls.self_signed("127.0.0.1").trust_pem.decode()
        async with served(engine) as (_, client, target):
            with pytest.raises(Rejected, match="unreachable"):
                await collect(client.open(dataclasses.replace(target, trust_pem=other), request()))
            assert not engine.started.is_set()
    run(main())


def test_over_tls_a_missing_token_is_still_refused():
    async def main():
        engine = FakeEngine()
        async with served(engine) as (_, client, target):
            with pytest.raises(Rejected, match="token"):
                await collect(client.open(dataclasses.replace(target, token=""), request()))
            assert not engine.started.is_set()
    run(main())


def test_a_certificate_from_files_with_its_ca(tmp_path):
    """A certificate signed by a CA (what a Secret or Ray's TLS holds): the replica announces the CA."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test ca")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True).sign(ca_key, hashes.SHA256()))
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "replica")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(2).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("replicas.gptoss.internal")]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    (tmp_path / "ca.crt").write_bytes(ca.public_bytes(pem))
    (tmp_path / "tls.crt").write_bytes(cert.public_bytes(pem))
    (tmp_path / "tls.key").write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                        serialization.NoEncryption()))
    tls = DirectStreamTls.from_files(str(tmp_path / "tls.crt"), str(tmp_path / "tls.key"), str(tmp_path / "ca.crt"),
                                     server_name="replicas.gptoss.internal")

    async def main():
        async with served(FakeEngine(), tls) as (_, client, target):
            assert target.trust_pem == ca.public_bytes(pem).decode()
            assert len(await collect(client.open(target, request(2)))) == 2
            with pytest.raises(Rejected, match="unreachable"):  # the certificate is not for this name
                await collect(client.open(dataclasses.replace(target, server_name="other.example"), request()))
    run(main())


def test_plaintext_only_when_chosen():
    async def main():
        async with served(FakeEngine(), None) as (_, client, target):
            assert target.trust_pem == ""
            assert len(await collect(client.open(target, request(2)))) == 2
    run(main())
