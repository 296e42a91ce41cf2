"""The contract between a serving replica and whatever engine runs the model.

Engines: `batching_engine.BatchingEngine` (engine.kind torch: continuous batching over a paged KV
cache) and `echo_engine.EchoEngine` (a test engine without a model).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import AsyncIterator, Protocol

from cluster.engine.request import GenerateRequest, ModelLimits, TokenChunk


@dataclass(frozen=True)
class ExpertLoad:
    """Expert routing load of an expert-parallel replica (parallel.ep_size > 1; its rank 0 sees
    every token's routing). The replica attaches it to the engine's stats for /metrics."""

    tokens_per_expert_total: list[list[int]]  # [layer][expert]: tokens routed there since the replica started
    imbalance: list[float]  # per layer: per-rank load max/mean over the recent window (1 = balanced)
    rebalances_total: int  # expert placements applied


@dataclass(frozen=True)
class EngineStats:
    """What an engine last counted; cheap to build, read at any time (routing, autoscaling, /metrics).

    Fields an engine has no notion of stay 0 (e.g. kv_blocks_total for an engine without a paged cache).
    """

    active_requests: int  # requests in the engine now: waiting + running
    requests_total: int  # requests accepted since start
    finished_total: int  # requests that reached a finish reason
    cancelled_total: int  # requests whose caller went away before the end
    failed_total: int  # requests that ended in an error
    tokens_generated_total: int  # tokens produced by the model, cancelled requests included
    waiting_requests: int = 0  # accepted, not yet scheduled (or preempted and waiting again)
    running_requests: int = 0  # in the batch now
    kv_blocks_used: int = 0  # KV-cache blocks held by requests
    kv_blocks_total: int = 0  # KV-cache blocks the engine may hand out; 0: no paged cache
    prefix_cache_queried_tokens_total: int = 0  # prompt tokens looked up in the prefix cache
    prefix_cache_hit_tokens_total: int = 0  # of those, tokens whose K/V were reused
    preemptions_total: int = 0  # running requests evicted to free KV blocks (recomputed later)
    generation_tokens_per_s: float = 0.0  # tokens generated per second over the last few seconds
    expert_load: ExpertLoad | None = None  # set by an expert-parallel replica, None otherwise

    @property
    def kv_cache_usage(self) -> float | None:
        """Fraction of KV blocks in use, or None for an engine without a paged cache."""
        return self.kv_blocks_used / self.kv_blocks_total if self.kv_blocks_total else None

    @property
    def prefix_cache_hit_rate(self) -> float:
        q = self.prefix_cache_queried_tokens_total
        return self.prefix_cache_hit_tokens_total / q if q else 0.0


class Engine(Protocol):
    limits: ModelLimits
    supports_logprobs: bool  # whether TokenChunk.logprobs is filled when a request asks
    # Whether a constrained request with resumed_tokens continues its turn's grammar after them
    # (else the front door does not migrate a constrained stream to this engine).
    resumes_constrained: bool

    def generate(self, request: GenerateRequest) -> AsyncIterator[TokenChunk]:
        """Stream chunks of generated token ids; the last chunk carries the finish reason.

        Raises InvalidRequestError for a bad request and EngineOverloadedError when full, at the
        first `anext`. Closing the iterator (or cancelling its task) stops the request at the next
        step and frees what it holds.
        """
        ...

    def stats(self) -> EngineStats:
        """Counters readable at any time, also while requests run; cheap (no locks, no waiting)."""
        ...

    def check_health(self) -> None:
        """Raise (EngineDead) if the engine can serve nothing more, so Serve replaces the replica."""
        ...

    def shutdown(self) -> None:
        """Stop background work; open streams fail."""
        ...
