"""EchoEngine: a TEST engine that streams tokens at a fixed rate without any model.

Select it with `engine.kind: echo`. It exists to measure the serving path (front door, Ray hop,
replica) apart from the model: each request produces `max_tokens` tokens (default
`default_max_tokens`), the first at once and then `tokens_per_s` per stream (0: all at once),
as if a model decoded them. Tokens that are due by the time the consumer comes back travel in one
chunk, at most one chunk per `chunk_interval_s` (a real engine coalesces the same way), so a slow
relay gets bigger chunks, not fewer tokens.

The tokens echo the prompt's ordinary-text ids cyclically (harmony's special ids, from 199998 up,
are skipped so Chat streams stay plain text), so a client can check what it got. It never emits a
stop token: every stream finishes with FinishReason.LENGTH.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import AsyncIterator

from cluster.engine.errors import EngineOverloadedError
from cluster.engine.protocol import EngineStats
from cluster.engine.request import FinishReason, GenerateRequest, ModelLimits, TokenChunk, validate_request

log = logging.getLogger(__name__)

# o200k_harmony: ids from here up are special (<|start|>, <|end|>, ...); the echo skips them.
FIRST_SPECIAL_ID = 199998
FILLER_TOKEN_ID = 13  # "." when a prompt holds no ordinary-text id at all
ECHO_VOCAB_SIZE = 201088  # o200k_harmony, so Generate and Chat validate as for a real gpt-oss
ECHO_CONTEXT_LENGTH = 131072


def echo_tokens(prompt: tuple[int, ...], n: int) -> list[int]:
    """The n tokens EchoEngine streams for `prompt`."""
    text = [t for t in prompt if t < FIRST_SPECIAL_ID] or [FILLER_TOKEN_ID]
    return [text[i % len(text)] for i in range(n)]


class EchoEngine:
    """Engine protocol implementation that paces echoed tokens; see the module docstring."""

    supports_logprobs = False
    resumes_constrained = False  # no constraints at all

    def __init__(self, *, tokens_per_s: float = 1000.0, chunk_interval_s: float = 0.01,
                 default_max_tokens: int = 256, max_active_requests: int = 1024,
                 limits: ModelLimits | None = None) -> None:
        if tokens_per_s < 0:
            raise ValueError(f"tokens_per_s must be >= 0, got {tokens_per_s}")
        self.limits = limits or ModelLimits(vocab_size=ECHO_VOCAB_SIZE, context_length=ECHO_CONTEXT_LENGTH)
        self._tokens_per_s = tokens_per_s
        self._chunk_interval_s = chunk_interval_s
        self._default_max_tokens = default_max_tokens
        self._max_active = max_active_requests
        self._active = 0
        self._requests = self._finished = self._cancelled = self._tokens = 0

    def stats(self) -> EngineStats:
        # Every accepted stream runs at once: none waits, and there is no KV cache.
        return EngineStats(active_requests=self._active, requests_total=self._requests,
                           finished_total=self._finished, cancelled_total=self._cancelled,
                           failed_total=0, tokens_generated_total=self._tokens, running_requests=self._active)

    def check_health(self) -> None:
        return None  # no background state to die

    def shutdown(self) -> None:
        return None

    def _due(self, started: float, now: float, total: int) -> int:
        """Tokens produced by `now`: the first at once, then one per 1/tokens_per_s."""
        if self._tokens_per_s == 0:
            return total
        return min(total, 1 + int((now - started) * self._tokens_per_s))

    async def generate(self, request: GenerateRequest) -> AsyncIterator[TokenChunk]:
        validate_request(request, self.limits)
        prompt = request.prompt_token_ids
        room = self.limits.context_length - len(prompt)
        max_tokens = request.sampling.max_tokens
        total = max_tokens if max_tokens is not None else min(self._default_max_tokens, room)
        tokens = echo_tokens(prompt, total)
        if self._active >= self._max_active:
            raise EngineOverloadedError(self._active, self._max_active)
        self._active += 1
        self._requests += 1
        sent = 0
        finished = False
        try:
            started = time.monotonic()
            while True:
                now = time.monotonic()
                due = self._due(started, now, total)
                self._tokens += due - sent  # "generated" the moment they are due
                chunk, sent = tuple(tokens[sent:due]), due
                if sent == total:
                    finished = True
                    yield TokenChunk(chunk, FinishReason.LENGTH, prompt_tokens=len(prompt), completion_tokens=total)
                    return
                if chunk:
                    yield TokenChunk(chunk)
                # Sleep until the next token is due, but flush no more often than the chunk interval.
                next_due = started + sent / self._tokens_per_s
                wake = max(next_due, time.monotonic() + (self._chunk_interval_s if chunk else 0.0))
                await asyncio.sleep(max(0.0, wake - time.monotonic()))
        finally:
            self._active -= 1
            if finished:
                self._finished += 1
            else:
                self._cancelled += 1
                log.info("request %s cancelled after %d of %d tokens", request.request_id or "-", sent, total)
