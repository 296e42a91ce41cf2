"""The replica's per-chunk deadline relay (no Ray): cancellation always gets through, the deadline
stops the stream, and the engine's stream is closed in every case."""

from __future__ import annotations

import asyncio
import time

import pytest

from cluster.serving.replica import stream_until_deadline


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

        async def feed():
            for _ in range(3):
                await stream.waiting.wait()
                stream.waiting.clear()
                stream.release.set()

        await asyncio.gather(_consume(stream, time.time() + 30, got), feed())
        return stream, got

    stream, got = asyncio.run(main())
    assert got == [0, 1, 2] and stream.closed
