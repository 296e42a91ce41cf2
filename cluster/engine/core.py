"""EngineCore: the synchronous heart of the batching engine — add, step, abort, stats.

One `step()` = schedule -> one paged forward over every scheduled token -> sample -> update.
Nothing here is thread-safe; `async_engine.AsyncEngine` drives it from one background thread.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

import torch

from cluster.config import EngineConfig
from cluster.engine.kv_cache import KVCacheManager, KVCacheSpec
from cluster.engine.runner import ModelRunner
from cluster.engine.scheduler import Scheduler
from cluster.engine.request import TokenLogprobs
from cluster.engine.sequence import EndReason, Sequence
from cluster.model.transformer import GptOssModel


@dataclass(frozen=True)
class EngineCoreStats:
    """A snapshot taken after each step; reading it costs one attribute access."""

    num_waiting: int = 0
    num_running: int = 0
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    prefix_cache_queried_tokens_total: int = 0  # prompt tokens looked up in the prefix cache
    prefix_cache_hit_tokens_total: int = 0  # of those, tokens whose K/V were found and reused
    preemptions_total: int = 0
    computed_tokens_total: int = 0  # tokens run through the model (prompts, recomputes, decodes)
    generation_tokens_total: int = 0  # tokens sampled
    generation_tokens_per_s: float = 0.0  # over the last few seconds
    finished_requests_per_s: float = 0.0  # over the last few seconds (aborts included)
    steps_total: int = 0

    @property
    def kv_cache_usage(self) -> float:
        return self.kv_blocks_used / self.kv_blocks_total if self.kv_blocks_total else 0.0

    @property
    def prefix_cache_hit_rate(self) -> float:
        """Hit tokens / looked-up tokens since start."""
        q = self.prefix_cache_queried_tokens_total
        return self.prefix_cache_hit_tokens_total / q if q else 0.0


@dataclass(frozen=True)
class StepOutput:
    """One sequence's new token from a step (token_id None only for an abort)."""

    request_id: str
    token_id: int | None
    logprobs: TokenLogprobs | None
    end_reason: EndReason | None
    num_prompt_tokens: int
    num_output_tokens: int
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache


class EngineCore:
    RATE_WINDOW_S = 5.0

    def __init__(self, model: GptOssModel, config: EngineConfig, forward_factory=None):
        """Sized by `config`, the engine section of cluster/config.py (block size, KV memory, batch and
        queue bounds, prefix caching). `forward_factory(spec, num_blocks) -> forward` swaps the runner's
        paged forward for another (an expert-parallel group: cluster/parallel/); it sees the cache
        layout the engine chose."""
        self.model = model
        self.config = config
        self.spec = KVCacheSpec.from_model_config(model.config, config.block_size, dtype=model.dtype)
        num_blocks = self.spec.num_blocks_for_budget(config.kv_cache_memory_bytes)
        self.kv_cache = KVCacheManager(self.spec, num_blocks, config.enable_prefix_caching)
        self.scheduler = Scheduler(config, self.kv_cache)
        forward = None if forward_factory is None else forward_factory(self.spec, num_blocks)
        self.runner = ModelRunner(model, self.kv_cache, forward)
        self._recent: deque[tuple[float, int, int]] = deque()  # (time, tokens sampled, requests ended) per step
        self._recent_tokens = self._recent_ended = 0  # sums over _recent
        self._computed_tokens = self._generation_tokens = self._steps = 0
        self._live_ids: set[str] = set()  # requests added and not yet finished or aborted
        self.stats = self._snapshot()

    def add_request(self, seq: Sequence) -> None:
        """Queue a sequence; raises EngineOverloadedError (queue full) or RequestTooLong at once."""
        vocab = self.model.config.vocab_size
        if min(seq.prompt_token_ids) < 0 or max(seq.prompt_token_ids) >= vocab:
            raise ValueError(f"prompt token ids must be in 0..{vocab - 1}")
        if seq.request_id in self._live_ids:
            raise ValueError(f"request id {seq.request_id!r} is already in the engine")
        self.scheduler.add_request(seq)
        self._live_ids.add(seq.request_id)
        self.stats = self._snapshot()

    def abort_request(self, request_id: str) -> StepOutput | None:
        seq = self.scheduler.abort_request(request_id)
        self._live_ids.discard(request_id)
        if seq is not None:
            self._record(0, 1)
        self.stats = self._snapshot()
        if seq is None:
            return None
        return StepOutput(request_id, None, None, EndReason.ABORT, seq.num_prompt_tokens, len(seq.output_token_ids),
                          seq.num_cached_tokens)

    def has_unfinished(self) -> bool:
        return self.scheduler.num_unfinished > 0

    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        """One forward over every scheduled token; returns each new token, plus an end (token None,
        EndReason.DEADLINE) for every waiting request dropped because its deadline passed."""
        scheduled = self.scheduler.schedule()
        outputs = [StepOutput(seq.request_id, None, None, EndReason.DEADLINE, seq.num_prompt_tokens,
                              len(seq.output_token_ids), seq.num_cached_tokens) for seq in scheduled.expired]
        for seq in scheduled.expired:
            self._live_ids.discard(seq.request_id)
        if not scheduled.chunks:
            if outputs:
                self._record(0, len(outputs))
                self.stats = self._snapshot()
            return outputs
        sampled = self.runner.execute(scheduled)
        self.scheduler.update_from_output(scheduled, sampled)
        ended = len(outputs)
        for chunk in scheduled.chunks:
            seq = chunk.request
            if seq.request_id not in sampled:
                continue
            token_id, logprobs = sampled[seq.request_id]
            outputs.append(StepOutput(seq.request_id, token_id, logprobs, seq.finish_reason,
                                      seq.num_prompt_tokens, len(seq.output_token_ids), seq.num_cached_tokens))
            if seq.finish_reason is not None:
                self._live_ids.discard(seq.request_id)
                ended += 1
        self._steps += 1
        self._computed_tokens += scheduled.num_batched_tokens
        self._generation_tokens += len(sampled)
        self._record(len(sampled), ended)
        self.stats = self._snapshot()
        return outputs

    def _record(self, tokens: int, ended: int) -> None:
        self._recent.append((time.monotonic(), tokens, ended))
        self._recent_tokens += tokens
        self._recent_ended += ended

    def _snapshot(self) -> EngineCoreStats:
        now = time.monotonic()
        recent = self._recent
        while recent and now - recent[0][0] > self.RATE_WINDOW_S:
            _, tokens, ended = recent.popleft()
            self._recent_tokens -= tokens
            self._recent_ended -= ended
        rate = finish_rate = 0.0
        if len(recent) > 1 and now > recent[0][0]:
            # Events after the first one, over the time since it: the first marks the window start.
            span = now - recent[0][0]
            rate = (self._recent_tokens - recent[0][1]) / span
            finish_rate = (self._recent_ended - recent[0][2]) / span
        pool = self.kv_cache.pool
        return EngineCoreStats(
            num_waiting=len(self.scheduler.waiting),
            num_running=len(self.scheduler.running),
            kv_blocks_used=pool.num_used_blocks,
            kv_blocks_total=pool.num_usable_blocks,
            prefix_cache_queried_tokens_total=self.kv_cache.prefix_query_tokens,
            prefix_cache_hit_tokens_total=self.kv_cache.prefix_hit_tokens,
            preemptions_total=self.scheduler.num_preemptions,
            computed_tokens_total=self._computed_tokens,
            generation_tokens_total=self._generation_tokens,
            generation_tokens_per_s=rate,
            finished_requests_per_s=finish_rate,
            steps_total=self._steps,
        )


def run_to_completion(core: EngineCore, sequences: list[Sequence]) -> dict[str, list[int]]:
    """Add `sequences` and step until all finish; returns request id -> generated tokens (tests, benchmarks)."""
    for seq in sequences:
        core.add_request(seq)
    while core.has_unfinished():
        core.step()
    return {seq.request_id: list(seq.output_token_ids) for seq in sequences}
