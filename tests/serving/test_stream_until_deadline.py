"""The replica's per-chunk deadline relay (no Ray): cancellation always gets through, the deadline
stops the stream, and the engine's stream is closed in every case."""

from __future__ import annotations

import asyncio
import time

import pytest

from cluster.serving.deadline import stream_until_deadline


class EngineStream:
    """An engine stream whose next chunk is released by the test; records whether it was closed."""

    def __init__(self, chunks: int = 100) -> None:
        self.release = asyncio.Event()
        self.waiting = asyncio.Event()  # the relay is waiting for the next chunk
        self.closed = False
        self._chunks = chunks

    async def _gen(self):
        try:
            for i in range(self._chunks):
                self.waiting.set()
                await self.release.wait()
                self.release.clear()
                yield i
        finally:
            self.closed = True

    def __aiter__(self):
        self._it = self._gen()
        return self._it


async def _consume(stream, deadline_s, got):
    async for chunk in stream_until_deadline(aiter(stream), deadline_s):
        got.append(chunk)


async def _release_each(stream, chunks):
    """Release `chunks` chunks, each once the relay waits for it."""
    for _ in range(chunks):
        await stream.waiting.wait()
        stream.waiting.clear()
        stream.release.set()


@pytest.mark.parametrize("deadline_in_s", [None, 60.0])
def test_a_cancel_that_arrives_as_a_chunk_is_ready_is_not_lost(deadline_in_s):
    async def main():
        stream, got = EngineStream(), []
        deadline = None if deadline_in_s is None else time.time() + deadline_in_s
        task = asyncio.create_task(_consume(stream, deadline, got))
        await stream.waiting.wait()  # the relay waits for the first chunk
        stream.release.set()  # the chunk becomes ready ...
        task.cancel()  # ... and the caller cancels, in the same turn of the loop
        with pytest.raises(asyncio.CancelledError):
            await task
        return stream, got

    stream, got = asyncio.run(main())
    assert stream.closed, "a cancelled request must close the engine's stream (that stops decoding)"
    assert got == []


def test_the_deadline_stops_a_slow_stream_and_closes_it():
    async def main():
        stream, got = EngineStream(), []
        with pytest.raises(TimeoutError):
            await _consume(stream, time.time() + 0.1, got)
        return stream

    assert asyncio.run(main()).closed


def test_a_stream_ending_before_the_deadline_is_relayed_whole():
    async def main():
        stream, got = EngineStream(chunks=3), []
        await asyncio.gather(_consume(stream, time.time() + 30, got), _release_each(stream, 3))
        return stream, got

    stream, got = asyncio.run(main())
    assert got == [0, 1, 2] and stream.closed


def test_a_deadline_passing_while_the_consumer_holds_a_chunk_ends_the_stream_at_its_next_wait():
    """The deadline bounds waits for a chunk only: what the consumer does between chunks (Serve's
    task, the direct stream's write) is never cancelled by it."""
    async def main():
        stream = EngineStream()
        relay = stream_until_deadline(aiter(stream), time.time() + 0.05)
        stream.release.set()
        first = await anext(relay)
        await asyncio.sleep(0.1)  # the consumer is busy past the deadline, and is not cancelled
        with pytest.raises(TimeoutError):
            await anext(relay)
        return first, stream

    first, stream = asyncio.run(main())
    assert first == 0 and stream.closed


def test_a_caller_cancel_during_a_deadline_wait_stays_a_cancel():
    """When the caller cancels as the deadline passes, the caller's cancellation wins (not TimeoutError)."""
    async def main():
        stream, got = EngineStream(), []
        task = asyncio.create_task(_consume(stream, time.time() + 0.05, got))
        await stream.waiting.wait()
        await asyncio.sleep(0.04)
        task.cancel()
        await asyncio.sleep(0.02)  # the deadline's timer fires too while the cancel is delivered
        with pytest.raises(asyncio.CancelledError):
            await task
        return stream

    assert asyncio.run(main()).closed


def test_a_long_stream_arms_one_timer_not_one_per_chunk():
    """A timer per chunk cost the replica a heap entry and a cancel per streamed token."""
    async def main():
        loop = asyncio.get_running_loop()
        armed = []
        call_at = loop.call_at

        def counting_call_at(when, callback, *args, **kwargs):
            armed.append(callback)
            return call_at(when, callback, *args, **kwargs)

        loop.call_at = counting_call_at
        stream, got = EngineStream(chunks=200), []
        await asyncio.gather(_consume(stream, time.time() + 30, got), _release_each(stream, 200))
        return got, armed

    got, armed = asyncio.run(main())
    assert got == list(range(200))
    assert len(armed) == 1
