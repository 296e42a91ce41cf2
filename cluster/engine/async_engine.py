"""AsyncEngine: EngineCore behind asyncio — a step loop in one thread, a token stream per request.

    submit/generate (event loop)          step thread
    ---------------------------          -----------
    inbox.append(seq)  --- notify --->    drain inbox: add new sequences, apply aborts
                                          core.step()  (one forward for every running sequence)
    queue.get() <- call_soon_threadsafe - deliver each StepOutput to its request's queue

Admission is decided at once, on the caller's thread: when the waiting queue (plus the inbox)
is full the call raises EngineOverloadedError, with a retry hint estimated from the queue length
and the rate requests finished at recently, and nothing is queued. Closing a stream early (client
gone, task cancelled) puts an abort in the inbox, and its blocks are freed at the next step.
A consumer takes whatever tokens are ready as one chunk, so a slow consumer gets bigger chunks
rather than a backlog of small ones.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from cluster.engine.core import EngineCore, EngineCoreStats, StepOutput
from cluster.engine.errors import DeadlineExceededError, EngineDead, EngineOverloadedError, RequestTooLong, retry_after_s
from cluster.engine.guided import Guide
from cluster.engine.request import TokenLogprobs
from cluster.engine.sequence import EndReason, SamplingSettings, Sequence

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SequenceChunk:
    """Tokens produced since the previous chunk; the last chunk of a stream has end_reason set."""

    request_id: str
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprobs, ...]  # empty unless the request asked for logprobs
    end_reason: EndReason | None
    num_prompt_tokens: int
    num_output_tokens: int  # so far, this chunk included
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache


class _Stream:
    """The per-request queue the step thread fills and one asyncio consumer drains."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.queue: asyncio.Queue[StepOutput | BaseException] = asyncio.Queue()

    def put(self, item: StepOutput | BaseException) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the consumer's loop is closed; nobody is listening
            pass


class AsyncEngine:
    def __init__(self, core: EngineCore):
        self.core = core
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._inbox_adds: list[tuple[Sequence, _Stream]] = []
        self._inbox_aborts: list[str] = []
        self._streams: dict[str, _Stream] = {}  # written by the step thread only (submit() reads its size)
        self._closed = False
        self._error: BaseException | None = None
        self._ids = itertools.count()
        # Stream outcomes, counted on the event loop's thread.
        self.requests_total = self.finished_total = self.cancelled_total = self.failed_total = 0
        self._thread = threading.Thread(target=self._step_loop, name="engine-step-loop", daemon=True)
        self._thread.start()

    # --- caller side ------------------------------------------------------------------------------

    def stats(self) -> EngineCoreStats:
        return self.core.stats

    @property
    def is_alive(self) -> bool:
        return self._thread.is_alive() and self._error is None

    @property
    def num_submitted(self) -> int:
        """Requests accepted by submit() that the step loop has not taken in yet."""
        return len(self._inbox_adds)

    def check_alive(self) -> None:
        """Raise EngineDead if the step loop is gone (failed, or shut down)."""
        if not self.is_alive:
            raise EngineDead(f"engine step loop is not running: {self._error!r}" if self._error
                             else "engine step loop is not running")

    def submit(self, seq: Sequence) -> _Stream:
        """Queue `seq` for the step loop or refuse it now. Call from the thread running the event loop."""
        stream = _Stream(asyncio.get_running_loop())
        limit = self.core.config.max_waiting_requests
        longest = seq.num_prompt_tokens + seq.sampling.max_tokens
        if not self.core.kv_cache.fits_alone(longest, self.core.config.max_num_batched_tokens):
            raise RequestTooLong(longest, self.core.kv_cache.capacity_tokens)
        with self._lock:
            if self._error is not None or self._closed:
                raise EngineDead("the engine is not running") from self._error
            # Capacity is the batch plus the waiting queue: a request the step loop has not yet
            # pulled into a free batch slot is not waiting. Counted exactly, under the lock: the
            # requests accepted and not yet ended (the step loop's streams, and the inbox).
            slots = self.core.config.max_num_seqs
            queued = len(self._streams) + len(self._inbox_adds) - slots
            if queued >= limit:
                raise EngineOverloadedError(queued, limit, retry_after_s(queued, self.core.stats.finished_requests_per_s))
            self._inbox_adds.append((seq, stream))
            self._wake.notify()
        self.requests_total += 1
        return stream

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._inbox_aborts.append(request_id)
            self._wake.notify()

    async def generate(self, prompt_token_ids: list[int], sampling: SamplingSettings,
                       request_id: str | None = None, deadline_s: float | None = None,
                       guide: Guide | None = None) -> AsyncIterator[SequenceChunk]:
        """Stream chunks of new tokens. Raises EngineOverloadedError/RequestTooLong/ValueError before the
        first chunk, and DeadlineExceededError if `deadline_s` (epoch seconds) passes while it is queued."""
        seq = Sequence(request_id or f"req-{next(self._ids)}", list(prompt_token_ids), sampling, deadline_s=deadline_s,
                       guide=guide)
        stream = self.submit(seq)
        finished = failed = False
        try:
            while not finished:
                items = [await stream.queue.get()]
                while not stream.queue.empty():
                    items.append(stream.queue.get_nowait())
                for item in items:
                    if isinstance(item, BaseException):
                        failed = True
                        raise item
                outputs: list[StepOutput] = items  # type: ignore[assignment]
                last = outputs[-1]
                if last.end_reason is EndReason.DEADLINE:  # dropped from the queue: nothing ran
                    raise DeadlineExceededError(seq.request_id, time.time() - (deadline_s or 0.0))
                finished = last.end_reason is not None
                yield SequenceChunk(
                    request_id=seq.request_id,
                    token_ids=tuple(o.token_id for o in outputs if o.token_id is not None),
                    logprobs=tuple(o.logprobs for o in outputs if o.logprobs is not None),
                    end_reason=last.end_reason,
                    num_prompt_tokens=last.num_prompt_tokens,
                    num_output_tokens=last.num_output_tokens,
                    num_cached_tokens=last.num_cached_tokens,
                )
        finally:
            if finished:
                self.finished_total += 1
            else:
                self.abort(seq.request_id)
                if failed:
                    self.failed_total += 1
                else:
                    self.cancelled_total += 1

    def shutdown(self, timeout_s: float = 5.0) -> None:
        with self._lock:
            self._closed = True
            self._wake.notify()
        self._thread.join(timeout_s)

    # --- step thread ------------------------------------------------------------------------------

    def _step_loop(self) -> None:
        try:
            while True:
                with self._lock:
                    while not (self._closed or self._inbox_adds or self._inbox_aborts or self.core.has_unfinished()):
                        self._wake.wait()
                    if self._closed:
                        break
                    adds, self._inbox_adds = self._inbox_adds, []
                    aborts, self._inbox_aborts = self._inbox_aborts, []
                    for seq, stream in adds:
                        self._admit(seq, stream)
                for request_id in aborts:
                    self.core.abort_request(request_id)  # the consumer is gone; nothing to deliver
                    self._streams.pop(request_id, None)
                for output in self.core.step():
                    stream = self._streams.get(output.request_id)
                    if stream is None:
                        continue
                    stream.put(output)
                    if output.end_reason is not None:
                        del self._streams[output.request_id]
        except BaseException as err:  # a bug or an out-of-memory: fail every open stream, loudly
            log.exception("engine step loop failed")
            with self._lock:
                self._error = err
                pending = [stream for _, stream in self._inbox_adds] + list(self._streams.values())
            for stream in pending:
                stream.put(EngineDead(f"engine step loop failed: {err!r}"))

    def _admit(self, seq: Sequence, stream: _Stream) -> None:
        try:
            self.core.add_request(seq)
        except Exception as err:  # e.g. preempted sequences refilled the queue since submit()
            stream.put(err)
            return
        self._streams[seq.request_id] = stream
