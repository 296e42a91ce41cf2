"""A request's deadline over a stream of chunks, wherever the engine runs (replica or front door)."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import AsyncIterator

from cluster.engine.request import TokenChunk


async def stream_until_deadline(stream: AsyncIterator[TokenChunk], deadline_s: float | None) -> AsyncIterator[TokenChunk]:
    """Relay `stream` until it ends, or raise TimeoutError once `deadline_s` (epoch seconds) passes;
    the stream is closed either way, which stops its decoding.

    The deadline bounds each single wait for a chunk, never what Serve's task does between our
    yields: one timer per stream (not one per chunk, which cost a timer and a heap entry per
    token) that cancels the waiting task if it fires during a wait, and else ends the stream at
    the next wait. Not asyncio.wait_for: on Python 3.11 it returns the chunk and drops a
    cancellation that arrives just as the chunk is ready, and the cancelled request would then
    decode on to max_tokens.
    """
    deadline = _Deadline(deadline_s)
    try:
        while True:
            deadline.check()
            try:
                chunk = await deadline.wait(anext(stream))
            except StopAsyncIteration:
                return
            yield chunk
    finally:
        deadline.cancel()
        await stream.aclose()


async def timed_until_deadline(stream: AsyncIterator[TokenChunk], deadline_s: float | None) -> AsyncIterator[TokenChunk]:
    """stream_until_deadline, with the first chunk carrying how long it took from the first pull
    (TokenChunk.replica_first_chunk_s): how the replica and an engine client of the front door
    (engine_clients.py) hand on an engine's stream."""
    started = time.perf_counter()
    first = True
    async for chunk in stream_until_deadline(stream, deadline_s):
        if first:
            first = False
            chunk = dataclasses.replace(chunk, replica_first_chunk_s=time.perf_counter() - started)
        yield chunk


class _Deadline:
    """stream_until_deadline's timer: cancels the task in `wait` when `deadline_s` passes during
    it (turning that cancellation into TimeoutError, as asyncio.timeout does)."""

    def __init__(self, deadline_s: float | None) -> None:
        self.expired = False
        self._waiting: asyncio.Task | None = None
        self._fired_in_wait = False
        self._timer = None
        if deadline_s is not None:
            remaining = deadline_s - time.time()
            if remaining <= 0:
                self.expired = True
            else:
                loop = asyncio.get_running_loop()
                self._timer = loop.call_at(loop.time() + remaining, self._expire)

    def _expire(self) -> None:
        self.expired = True
        if self._waiting is not None:
            self._fired_in_wait = True
            self._waiting.cancel()

    def check(self) -> None:
        if self.expired:
            raise TimeoutError("deadline passed")

    async def wait(self, awaitable):
        if self._timer is None:
            return await awaitable
        task = asyncio.current_task()
        cancelling = task.cancelling()  # cancellations already requested by others
        self._waiting = task
        try:
            return await awaitable
        except asyncio.CancelledError:
            if self._fired_in_wait:
                self._fired_in_wait = False
                if task.uncancel() <= cancelling:  # ours alone: the deadline, not the caller
                    raise TimeoutError("deadline passed") from None
            raise
        finally:
            self._waiting = None
            if self._fired_in_wait:  # the wait ended otherwise despite our cancel: take it back
                self._fired_in_wait = False
                task.uncancel()

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
