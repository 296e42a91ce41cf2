"""BatchingEngine: the continuous-batching torch engine behind the Engine protocol (engine.kind torch).

    GenerateRequest --settings_for--> SamplingSettings --AsyncEngine--> SequenceChunk --> TokenChunk

Defaults are resolved here (max_tokens, harmony's stop tokens); everything else is AsyncEngine's:
admission against the bounded queue (EngineOverloadedError with a retry hint), a step loop in its
own thread (so the replica's event loop never blocks on the model), and an abort at the next step
when a stream is closed early. A consumer gets whatever tokens are ready, at most one chunk per
`chunk_interval_s` after the first, because each message through Ray costs about 1 ms of CPU.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import AsyncIterator

from cluster.config import EngineConfig
from cluster.engine.async_engine import AsyncEngine
from cluster.engine.core import EngineCore
from cluster.engine.errors import InvalidRequestError
from cluster.engine.guided import GuideCompiler
from cluster.engine.protocol import EngineStats
from cluster.engine.request import (FinishReason, GenerateRequest, ModelLimits, TokenChunk, resolved_length_and_stops,
                                    validate_request)
from cluster.engine.sequence import EndReason, SamplingSettings
from cluster.harmony.tokenizer import VOCAB_SIZE, load_tokenizer

FINISH_REASONS = {EndReason.STOP: FinishReason.STOP, EndReason.LENGTH: FinishReason.LENGTH}


class BatchingEngine:
    supports_logprobs = True
    resumes_constrained = True  # the Guide is advanced over the resumed tokens

    def __init__(self, engine: AsyncEngine, *, stop_token_ids: tuple[int, ...] | None = None) -> None:
        """`stop_token_ids`: the stop ids of a request that names none; None: the end of a harmony
        assistant turn (HarmonyTokenizer.turn_end_ids: <|return|>, <|call|>). default_max_tokens and
        chunk_interval_ms come from the core's EngineConfig."""
        self._engine = engine
        config = engine.core.model.config
        self.limits = ModelLimits(vocab_size=config.vocab_size, context_length=config.max_position_embeddings)
        self._stop_token_ids = load_tokenizer().turn_end_ids if stop_token_ids is None else tuple(stop_token_ids)
        self._default_max_tokens = engine.core.config.default_max_tokens
        self._chunk_interval_s = engine.core.config.chunk_interval_ms / 1000.0
        self._ids = itertools.count()
        self._guides: GuideCompiler | None = None  # made at the first constrained request
        self._wrap_up_tokens = engine.core.config.structured_wrap_up_tokens

    @classmethod
    def for_model(cls, model, config: EngineConfig, **kwargs) -> BatchingEngine:
        """Start an engine (its step-loop thread included) over `model`."""
        return cls(AsyncEngine(EngineCore(model, config)), **kwargs)

    @property
    def core(self) -> EngineCore:
        return self._engine.core

    def settings_for(self, request: GenerateRequest) -> SamplingSettings:
        """The request's sampling with every default resolved (call after validate_request)."""
        sampling = request.sampling
        max_tokens, stops = resolved_length_and_stops(request, self.limits, self._default_max_tokens,
                                                      self._stop_token_ids)
        return SamplingSettings(max_tokens=max_tokens, temperature=sampling.temperature, top_k=sampling.top_k,
                                top_p=sampling.top_p, seed=sampling.seed, stop_token_ids=stops,
                                logprobs=sampling.logprobs)

    async def generate(self, request: GenerateRequest) -> AsyncIterator[TokenChunk]:
        validate_request(request, self.limits)
        settings = self.settings_for(request)
        guide = None
        if request.constraint is not None and request.constraint.active:
            # Compiled on the compiler's threads, never on the step loop; a bad schema is refused here,
            # before anything is queued.
            # A resumed turn's grammar is the whole turn's (the same budgets), advanced over what was sent.
            resumed = request.prompt_token_ids[len(request.prompt_token_ids) - request.resumed_tokens:]
            guide = await self._guide_compiler().guide_for(request.constraint, settings.max_tokens + len(resumed),
                                                           resumed)
        # Engine-internal ids must be unique; a client may reuse its x-request-id.
        internal_id = f"{request.request_id or 'req'}#{next(self._ids)}"
        stream = self._engine.generate(list(request.prompt_token_ids), settings, internal_id, request.deadline_s,
                                       guide)
        try:
            async for chunk in stream:
                flushed_at = time.monotonic()
                if chunk.end_reason is not None:
                    yield TokenChunk(chunk.token_ids, FINISH_REASONS[chunk.end_reason],
                                     prompt_tokens=chunk.num_prompt_tokens,
                                     completion_tokens=chunk.num_output_tokens,
                                     cached_prompt_tokens=chunk.num_cached_tokens, logprobs=chunk.logprobs)
                    return
                yield TokenChunk(chunk.token_ids, cached_prompt_tokens=chunk.num_cached_tokens, logprobs=chunk.logprobs)
                # Let tokens pile up for a while: the next pull takes all that are ready as one chunk.
                wait = self._chunk_interval_s - (time.monotonic() - flushed_at)
                if wait > 0:
                    await asyncio.sleep(wait)
        finally:
            await stream.aclose()  # not finished: aborts the request at the next step

    def _guide_compiler(self) -> GuideCompiler:
        if self.limits.vocab_size != VOCAB_SIZE:
            raise InvalidRequestError("response_format", f"structured output needs the o200k_harmony vocabulary "
                                      f"({VOCAB_SIZE} ids); this model has {self.limits.vocab_size}")
        if self._guides is None:
            self._guides = GuideCompiler(self._wrap_up_tokens)
        return self._guides

    def stats(self) -> EngineStats:
        core = self._engine.core.stats
        engine = self._engine
        waiting = core.num_waiting + engine.num_submitted
        return EngineStats(
            active_requests=waiting + core.num_running,
            requests_total=engine.requests_total,
            finished_total=engine.finished_total,
            cancelled_total=engine.cancelled_total,
            failed_total=engine.failed_total,
            tokens_generated_total=core.generation_tokens_total,
            waiting_requests=waiting,
            running_requests=core.num_running,
            kv_blocks_used=core.kv_blocks_used,
            kv_blocks_total=core.kv_blocks_total,
            prefix_cache_queried_tokens_total=core.prefix_cache_queried_tokens_total,
            prefix_cache_hit_tokens_total=core.prefix_cache_hit_tokens_total,
            preemptions_total=core.preemptions_total,
            generation_tokens_per_s=core.generation_tokens_per_s,
        )

    def check_health(self) -> None:
        self._engine.check_alive()

    def shutdown(self) -> None:
        self._engine.shutdown()
        if self._guides is not None:
            self._guides.shutdown()
