"""The multiplexed replica stream over real gRPC on loopback (no Ray): many requests share one call
and the chunks of one engine step leave in one message; each request keeps its order, its
cancellation and its refusals (full, stopping) before the first token; a lost connection ends
every request on it and the next request opens a new one. What both kinds of stream must do alike
(the engine's error type, the token check) is in test_direct_stream.py, run with both."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import pytest

from cluster.engine.request import FinishReason, GenerateRequest, SamplingParams, TokenChunk
from cluster.serving.direct_stream import DirectAddress, DirectStreamClient, DirectStreamServer, Rejected
from cluster.serving.multiplexed_stream import WINDOW
from tests.serving.test_direct_stream import FakeEngine, collect, request, run
from tests.serving.test_direct_stream import served as direct_served
from tests.waiting import async_wait_until


class StepEngine(FakeEngine):
    """Every request yields one chunk per `step()`, as an engine step yields one for each."""

    def __init__(self) -> None:
        super().__init__()
        self.limit = 64
        self.steps = 0
        self.yielded = 0  # chunks the replica has pulled from this engine
        self._stepped = asyncio.Event()

    def step(self) -> None:
        self.steps += 1
        self._stepped.set()
        self._stepped = asyncio.Event()

    async def generate(self, req: GenerateRequest):
        self.in_flight += 1
        first = self.steps
        try:
            n = req.sampling.max_tokens
            for i in range(n):
                while self.steps <= first + i:
                    await self._stepped.wait()
                self.yielded += 1
                yield TokenChunk((req.prompt_token_ids[0] + i,), FinishReason.LENGTH if i == n - 1 else None,
                                 completion_tokens=i + 1)
            self.ended.append("finished")
        except asyncio.CancelledError:
            self.ended.append("cancelled")
            raise
        finally:
            self.in_flight -= 1


MULTIPLEXED = ("multiplexed", "socket")  # serving.replica_stream: on a gRPC call, or on the replica's own socket


@pytest.fixture(params=MULTIPLEXED)
def kind(request) -> str:
    return request.param


def served(engine: FakeEngine, kind: str, tls="self-signed"):
    return direct_served(engine, tls, kind=kind)


def req(n: int, first: int) -> GenerateRequest:
    return GenerateRequest(prompt_token_ids=(first,), sampling=SamplingParams(max_tokens=n))


async def until_started(streams) -> None:
    await async_wait_until(lambda: all(s.started for s in streams), 5, message="every request streaming")


def test_the_replica_announces_the_multiplexed_kind_and_the_per_request_path_stays(kind):
    async def main():
        engine = FakeEngine()
        async with served(engine, kind) as (_, client, target):
            assert target.multiplexed and bool(target.socket) == (kind == "socket")
            assert [c.token_ids for c in await collect(client.open(target, request(4)))] == [(5,), (6,), (7,), (5,)]
            connection, = client._connections.values()
            assert type(connection.call).__name__ == ("FramedCall" if kind == "socket" else "_GrpcCall")
            old = dataclasses.replace(target, socket="")  # a front door that knows no socket: the Multiplex call
            assert len(await collect(client.open(old, request(2)))) == 2
            assert type(client._connections[target.address].call).__name__ == "_GrpcCall"
            per_request = DirectStreamClient()  # the same server still serves the per-request call
            try:
                assert len(await collect(per_request.open(target, request(2)))) == 2
            finally:
                await per_request.close()
        server = DirectStreamServer(engine.generate, engine.full)
        metadata = await server.start("127.0.0.1", None)
        assert "kind" not in metadata["direct_stream"] and not DirectAddress.from_metadata(metadata).multiplexed
        await server.stop(0)
    run(main())


def test_32_requests_share_one_call_and_each_step_leaves_in_one_message(kind):
    async def main():
        engine = StepEngine()
        async with served(engine, kind) as (_, client, target):
            streams = [client.open(target, req(10, 1000 * k)) for k in range(32)]
            readers = [asyncio.ensure_future(collect(s)) for s in streams]
            await async_wait_until(lambda: engine.in_flight == 32, 5, message="32 requests running")
            for _ in range(10):
                engine.step()
                await asyncio.sleep(0.01)
            results = await asyncio.gather(*readers)
            for k, chunks in enumerate(results):
                assert [c.token_ids[0] for c in chunks] == [1000 * k + i for i in range(10)]
                assert chunks[-1].finish_reason is FinishReason.LENGTH
            connection, = client._connections.values()
            assert connection.messages <= 12, f"{connection.messages} messages for 320 chunks in 10 steps"
            assert engine.ended == ["finished"] * 32
    run(main())


async def steps(engine: StepEngine, n: int) -> None:
    for _ in range(n):
        engine.step()
        await asyncio.sleep(0.001)
    await asyncio.sleep(0.2)


def test_a_request_whose_client_stops_reading_is_held_in_the_replica_a_window_ahead(kind):
    async def main():
        engine = StepEngine()
        async with served(engine, kind) as (_, client, target):
            assert target.credits
            slow, other = client.open(target, req(3 * WINDOW, 1)), client.open(target, req(3 * WINDOW, 5000))
            other_reader = asyncio.ensure_future(collect(other))
            await async_wait_until(lambda: engine.in_flight == 2, 5, message="both running")
            await steps(engine, 3 * WINDOW)
            # the reading request got everything; the one nobody reads was pulled a window ahead, no more
            assert [c.token_ids[0] for c in await other_reader] == [5000 + i for i in range(3 * WINDOW)]
            assert engine.yielded - 3 * WINDOW in (WINDOW, WINDOW + 1)  # +1: pulled, waiting for credit
            assert slow._items.qsize() == WINDOW  # what reached the front door
            chunks = await collect(slow)  # reading it now grants credit: the rest follows, in order
            assert [c.token_ids[0] for c in chunks] == [1 + i for i in range(3 * WINDOW)]
            assert chunks[-1].finish_reason is FinishReason.LENGTH and engine.in_flight == 0
    run(main())


def test_without_the_credit_announcement_no_window_is_asked_or_kept(kind):
    """A replica from before flow control (no "credits" in its metadata) gets no window header and no
    credit frames; the replica then keeps no window either, so neither side waits for the other."""
    async def main():
        engine = StepEngine()
        async with served(engine, kind) as (server, client, target):
            old = dataclasses.replace(target, credits=False)
            stream = client.open(old, req(3 * WINDOW, 1))
            connection, = client._connections.values()
            assert connection.window == 0
            await async_wait_until(lambda: engine.in_flight == 1, 5, message="running")
            await steps(engine, 3 * WINDOW)
            assert engine.yielded == 3 * WINDOW and stream._items.qsize() == 3 * WINDOW + 1  # + the end
            assert [c.token_ids[0] for c in await collect(stream)] == [1 + i for i in range(3 * WINDOW)]
    run(main())


def test_cancelling_one_request_stops_it_in_the_replica_and_not_the_others(kind):
    async def main():
        engine = StepEngine()
        async with served(engine, kind) as (_, client, target):
            cancelled, other = client.open(target, req(100, 1)), client.open(target, req(3, 500))
            reader = asyncio.ensure_future(collect(other))
            await async_wait_until(lambda: engine.in_flight == 2, 5, message="both running")
            engine.step()
            chunks = aiter(cancelled)
            assert (await anext(chunks)).token_ids == (1,)
            cancelled.cancel()
            with pytest.raises(asyncio.CancelledError):
                await anext(chunks)
            await async_wait_until(lambda: engine.ended == ["cancelled"], 5, message="the engine stream closed")
            engine.step()
            engine.step()
            assert [c.token_ids for c in await reader] == [(500,), (501,), (502,)]
            assert engine.in_flight == 0
    run(main())


def test_a_burst_beyond_max_ongoing_requests_is_refused_before_the_first_token(kind):
    async def main():
        engine = StepEngine()
        engine.limit = 4
        async with served(engine, kind) as (_, client, target):
            # Opened together, the ten arrive in one message: the full check must count each
            # request the replica has just taken.
            streams = [client.open(target, req(2, k)) for k in range(10)]
            outcomes = [asyncio.ensure_future(collect(s)) for s in streams]
            await async_wait_until(lambda: sum(o.done() for o in outcomes) == 6, 5, message="six refusals")
            engine.step()
            engine.step()
            results = await asyncio.gather(*outcomes, return_exceptions=True)
            refused = [r for r in results if isinstance(r, Rejected)]
            assert len(refused) == 6 and {r.reason for r in refused} == {"full"}
            assert [len(r) for r in results if not isinstance(r, Exception)] == [2] * 4
            assert engine.ended == ["finished"] * 4
    run(main())


def test_an_error_that_does_not_pickle_still_ends_its_request_only(kind):
    class Local(Exception):
        pass

    async def main():
        async with served(FakeEngine(error=Local("no pickle for a local class")), kind) as (_, client, target):
            with pytest.raises(RuntimeError, match="Local"):
                await collect(client.open(target, request()))
            assert not client._connections[target.address].broken
    run(main())


def test_stopping_refuses_new_requests_finishes_accepted_ones_then_ends_the_call(kind):
    async def main():
        engine = FakeEngine(gap_s=0.02)
        async with served(engine, kind) as (server, client, target):
            running = client.open(target, request(25))
            reader = asyncio.ensure_future(collect(running))
            await until_started([running])
            started = time.monotonic()
            stopping = asyncio.ensure_future(server.stop(30.0))
            await async_wait_until(lambda: server._stopping, 5, message="the replica's server stopping")
            with pytest.raises(Rejected, match="stopping"):
                await collect(client.open(target, request(2, "late")))
            chunks = await reader
            await asyncio.wait_for(stopping, 5)  # the call ended with its last request, not at the grace
            assert time.monotonic() - started < 5
            assert len(chunks) == 25 and engine.ended == ["finished"]
    run(main())


async def streaming(engine: StepEngine, client, target, n: int) -> list[asyncio.Future]:
    """`n` long requests, each past its first chunk; their readers."""
    streams = [client.open(target, req(100, k)) for k in range(n)]
    readers = [asyncio.ensure_future(collect(s)) for s in streams]
    await async_wait_until(lambda: engine.in_flight == n, 5, message="all running")
    engine.step()
    await until_started(streams)
    return readers


def test_a_replica_that_goes_away_ends_every_request_on_it_with_connection_error(kind):
    async def main():
        engine = StepEngine()
        async with served(engine, kind) as (server, client, target):
            readers = await streaming(engine, client, target, 8)
            await server.stop(0)  # no grace: the replica is gone mid-stream
            results = await asyncio.gather(*readers, return_exceptions=True)
            assert all(isinstance(r, ConnectionError) for r in results), results
    run(main())


def test_after_a_broken_connection_the_next_request_opens_a_new_one(kind):
    async def main():
        engine = StepEngine()
        async with served(engine, kind) as (_, client, target):
            readers = await streaming(engine, client, target, 3)
            broken = client._connections[target.address]
            broken.call.cancel()  # the connection breaks under its requests
            results = await asyncio.gather(*readers, return_exceptions=True)
            assert all(isinstance(r, ConnectionError) for r in results), results
            await async_wait_until(lambda: engine.in_flight == 0, 5, message="the replica closed their streams")
            fresh = client.open(target, req(2, 7))
            reader = asyncio.ensure_future(collect(fresh))
            await async_wait_until(lambda: engine.in_flight == 1, 5, message="the new request running")
            engine.step()
            engine.step()
            assert [c.token_ids for c in await reader] == [(7,), (8,)]
            assert client._connections[target.address] is not broken
    run(main())


def test_chunks_received_before_a_break_are_read_then_connection_error_not_a_refusal(kind):
    async def main():
        engine = StepEngine()
        async with served(engine, kind) as (_, client, target):
            stream = client.open(target, req(100, 1))
            await async_wait_until(lambda: engine.in_flight == 1, 5, message="running")
            engine.step()
            await async_wait_until(lambda: stream.started, 5, message="a chunk received")
            client._connections[target.address].call.cancel()
            got = []
            with pytest.raises(ConnectionError):
                async for chunk in stream:
                    got.append(chunk.token_ids)
            assert got == [(1,)]  # a refusal here would send the request to another replica from the start
    run(main())


def test_a_replica_left_out_of_the_routable_set_finishes_its_requests_then_the_call_ends(kind):
    async def main():
        engine = FakeEngine(gap_s=0.02)
        async with served(engine, kind) as (_, client, target):
            running = client.open(target, request(20))
            reader = asyncio.ensure_future(collect(running))
            await until_started([running])
            connection = client._connections[target.address]
            client.retain(set())
            assert len(await reader) == 20
            await async_wait_until(lambda: connection.broken, 5, message="the drained call ended")
            assert engine.ended == ["finished"]
    run(main())


def test_a_plaintext_replica_serves_the_multiplexed_stream_too(kind):
    async def main():
        async with served(FakeEngine(), kind, None) as (_, client, target):
            assert target.trust_pem == "" and len(await collect(client.open(target, request(3)))) == 3
    run(main())
