"""One generation request as the batching engine sees it inside: a `Sequence` of tokens, its fully
resolved sampling settings and its progress. (What crosses the replica boundary is
`cluster.engine.request.GenerateRequest`; the engine turns it into a Sequence.)

The engine has no prefill or decode phase. Each sequence carries `num_computed_tokens` (how many of
its tokens already have K/V in the cache) and the scheduler keeps handing it tokens until that count
catches up with `num_tokens` (prompt + generated). A chunked prefill, a prefix-cache hit and a
recompute after preemption are all just different starting points of that chase.
"""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field

from typing import TYPE_CHECKING

import torch

from cluster.engine.request import TokenLogprobs

if TYPE_CHECKING:
    from cluster.engine.guided import Guide


class EndReason(enum.Enum):
    STOP = "stop"  # sampled one of the stop token ids
    LENGTH = "length"  # produced max_tokens
    ABORT = "abort"  # cancelled by the caller or the client went away
    DEADLINE = "deadline"  # its deadline passed while it waited in the queue


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # queued, no cache blocks held
    RUNNING = "running"  # holds blocks and is scheduled every step
    PREEMPTED = "preempted"  # lost its blocks; back in the waiting queue to be recomputed
    FINISHED = "finished"


@dataclass(frozen=True)
class SamplingSettings:
    """How one sequence picks each next token, every default already resolved.

    temperature 0 means greedy (top_k/top_p/seed are then unused).
    """

    max_tokens: int = 256
    temperature: float = 1.0
    top_k: int = 0  # 0: no top-k filter
    top_p: float = 1.0  # 1.0: no nucleus filter
    seed: int | None = None  # same seed -> same tokens, whatever else shares the batch
    stop_token_ids: tuple[int, ...] = ()  # none unless given (BatchingEngine fills in its defaults)
    logprobs: int | None = None  # also return this many top alternatives per token (0: only the chosen one)

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not self.temperature >= 0.0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.logprobs is not None and self.logprobs < 0:
            raise ValueError(f"logprobs must be >= 0, got {self.logprobs}")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


_arrival_counter = itertools.count()


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    # Absolute deadline (time.time() seconds, as GenerateRequest.deadline_s); a request still
    # waiting past it is dropped at the next step. None: none.
    deadline_s: float | None = None
    # The grammar state of a constrained request (structured output), advanced by every token taken;
    # it depends only on the output tokens, so a preempted sequence keeps it through the recompute.
    guide: Guide | None = None

    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[TokenLogprobs] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose K/V sit in the cache
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache at first admission
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: EndReason | None = None
    num_preemptions: int = 0
    # Chained content hashes of this request's full blocks, extended lazily by the KV cache manager.
    block_hashes: list[bytes] = field(default_factory=list)
    arrival_index: int = field(default_factory=lambda: next(_arrival_counter))  # FCFS order; newest is largest

    def __post_init__(self) -> None:
        if not self.prompt_token_ids:
            raise ValueError("a request needs at least one prompt token")
        self.prompt_token_ids = [int(t) for t in self.prompt_token_ids]
        # One generator per request, so what it samples never depends on its batch neighbours.
        self.generator = torch.Generator(device="cpu")
        if self.sampling.seed is not None:
            self.generator.manual_seed(self.sampling.seed)
        else:
            self.generator.seed()

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        """Prompt plus generated tokens; the last generated one has no K/V until the next step."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_id_at(self, position: int) -> int:
        n = len(self.prompt_token_ids)
        return self.prompt_token_ids[position] if position < n else self.output_token_ids[position - n]

    @property
    def num_tokens_left(self) -> int:
        """Tokens this sequence may still generate."""
        return self.sampling.max_tokens - len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def append_output_token(self, token_id: int, logprobs: TokenLogprobs | None = None) -> EndReason | None:
        """Record one sampled token; returns why the request is now finished, or None."""
        self.output_token_ids.append(token_id)
        if self.guide is not None:
            self.guide.consume(token_id)
        if logprobs is not None:
            self.output_logprobs.append(logprobs)
        if token_id in self.sampling.stop_token_ids:
            return EndReason.STOP
        if len(self.output_token_ids) >= self.sampling.max_tokens:
            return EndReason.LENGTH
        return None
