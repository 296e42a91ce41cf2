"""The simple engine: one decode loop per request, each in its own thread.

Each request runs `cluster.model.generate.decode_stream` (prefill, then one token per step with a
KV cache) in a worker thread; tokens reach asyncio through a buffer and an event, and the
consumer coalesces whatever is ready into one chunk, at most one chunk per `chunk_interval_s`.
Closing the stream sets a stop flag the worker checks after every token.

A continuous-batching engine replaces this one behind `cluster.engine.protocol.Engine`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from typing import AsyncIterator, Callable, Iterator

from cluster.engine.errors import EngineOverloadedError
from cluster.engine.protocol import EngineStats
from cluster.engine.request import FinishReason, GenerateRequest, ModelLimits, TokenChunk, validate_request

log = logging.getLogger(__name__)

# (prompt_ids, max_new_tokens, *, temperature, top_p, top_k, seed, stop_token_ids) -> token ids
TokenStreamFn = Callable[..., Iterator[int]]


class _DecodeThread:
    """Runs one token iterator in a thread and buffers its tokens for an asyncio consumer."""

    def __init__(self, tokens: Iterator[int], loop: asyncio.AbstractEventLoop,
                 on_token: Callable[[], None], name: str) -> None:
        self._tokens = tokens
        self._loop = loop
        self._on_token = on_token
        self._lock = threading.Lock()
        self._buffer: list[int] = []
        self._done = False
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self.ready = asyncio.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Ask the worker to stop after its current step."""
        self._stop.set()

    def _wake(self) -> None:
        try:
            self._loop.call_soon_threadsafe(self.ready.set)
        except RuntimeError:  # the loop closed while we were decoding; nobody is listening
            self._stop.set()

    def _run(self) -> None:
        import torch  # the engine package stays importable without torch

        try:
            with torch.inference_mode():
                for token in self._tokens:
                    if self._stop.is_set():
                        break
                    self._on_token()
                    with self._lock:
                        self._buffer.append(int(token))
                    self._wake()
        except BaseException as err:  # handed to the consumer, which raises it
            with self._lock:
                self._error = err
        finally:
            close = getattr(self._tokens, "close", None)
            if close is not None:
                close()
            with self._lock:
                self._done = True
            self._wake()

    def take(self) -> tuple[list[int], bool, BaseException | None]:
        """Tokens buffered so far, whether the worker finished, and its error if it failed."""
        with self._lock:
            tokens, self._buffer = self._buffer, []
            return tokens, self._done, self._error


class TorchEngine:
    """Engine over a synchronous token stream (by default the torch model's decode_stream)."""

    def __init__(
        self,
        token_stream: TokenStreamFn,
        limits: ModelLimits,
        *,
        stop_token_ids: tuple[int, ...] = (),
        default_max_tokens: int = 256,
        max_active_requests: int = 32,
        chunk_interval_s: float = 0.005,
    ) -> None:
        self.limits = limits
        self._token_stream = token_stream
        self._stop_token_ids = tuple(stop_token_ids)
        self._default_max_tokens = default_max_tokens
        self._max_active = max_active_requests
        self._chunk_interval_s = chunk_interval_s
        self._counter_lock = threading.Lock()
        self._active = 0
        self._requests = self._finished = self._cancelled = self._failed = self._tokens = 0

    @classmethod
    def for_model(cls, model, **kwargs) -> "TorchEngine":
        """An engine decoding with `cluster.model.generate.decode_stream` on `model`."""
        from cluster.model.generate import decode_stream

        limits = ModelLimits(vocab_size=model.config.vocab_size,
                             context_length=model.config.max_position_embeddings)
        return cls(functools.partial(decode_stream, model), limits, **kwargs)

    def stats(self) -> EngineStats:
        with self._counter_lock:
            return EngineStats(active_requests=self._active, requests_total=self._requests,
                               finished_total=self._finished, cancelled_total=self._cancelled,
                               failed_total=self._failed, tokens_generated_total=self._tokens)

    def _count_token(self) -> None:
        with self._counter_lock:
            self._tokens += 1

    def _admit(self) -> None:
        with self._counter_lock:
            if self._active >= self._max_active:
                raise EngineOverloadedError(self._active, self._max_active)
            self._active += 1
            self._requests += 1

    async def generate(self, request: GenerateRequest) -> AsyncIterator[TokenChunk]:
        validate_request(request, self.limits)
        sampling = request.sampling
        prompt = list(request.prompt_token_ids)
        room = self.limits.context_length - len(prompt)
        max_tokens = sampling.max_tokens if sampling.max_tokens is not None else min(self._default_max_tokens, room)
        if sampling.ignore_stop:
            stop_ids: tuple[int, ...] = ()
        elif sampling.stop_token_ids:
            stop_ids = tuple(sampling.stop_token_ids)
        else:
            stop_ids = self._stop_token_ids
        tokens = self._token_stream(prompt, max_tokens, temperature=sampling.temperature, top_p=sampling.top_p,
                                    top_k=sampling.top_k, seed=sampling.seed, stop_token_ids=stop_ids)

        self._admit()
        worker = _DecodeThread(tokens, asyncio.get_running_loop(), self._count_token,
                               name=f"decode-{request.request_id or id(request)}")
        outcome = "cancelled"  # unless the stream reaches its end or fails
        generated = 0
        last_token: int | None = None
        try:
            worker.start()
            last_flush = 0.0
            while True:
                await worker.ready.wait()
                worker.ready.clear()
                wait = self._chunk_interval_s - (time.monotonic() - last_flush)
                if wait > 0 and generated:  # the first chunk goes out at once (time to first token)
                    await asyncio.sleep(wait)
                ready, done, error = worker.take()
                if error is not None:
                    outcome = "failed"
                    raise error
                if ready:
                    generated += len(ready)
                    last_token = ready[-1]
                if done:
                    reason = FinishReason.STOP if last_token in stop_ids else FinishReason.LENGTH
                    outcome = "finished"
                    yield TokenChunk(tuple(ready), reason, prompt_tokens=len(prompt), completion_tokens=generated)
                    return
                if ready:
                    last_flush = time.monotonic()
                    yield TokenChunk(tuple(ready))
        finally:
            worker.stop()
            with self._counter_lock:
                self._active -= 1
                if outcome == "finished":
                    self._finished += 1
                elif outcome == "failed":
                    self._failed += 1
                else:
                    self._cancelled += 1
            if outcome == "cancelled":
                log.info("request %s cancelled after %d tokens", request.request_id or "-", generated)
