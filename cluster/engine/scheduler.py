"""Iteration-level scheduling: which requests compute how many tokens in the next forward pass.

Every step, `schedule()` maps request -> number of tokens to compute, under two caps: a token
budget (`max_num_batched_tokens`) and a batch size (`max_num_seqs`). Running requests come first,
oldest first, so decoding never waits behind a long prompt; whatever budget is left admits waiting
requests (FCFS), each starting from its prefix-cache hit and taking at most the budget left — a
long prompt is simply prefilled over several steps. When the KV pool runs dry the newest running
request is preempted: its blocks are freed and it goes back to the front of the queue, to be
recomputed (prompt + tokens so far) later.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from cluster.config import EngineConfig
from cluster.engine.errors import EngineOverloadedError, RequestTooLong
from cluster.engine.kv_cache import KVCacheManager
from cluster.engine.request import TokenLogprobs
from cluster.engine.sequence import EndReason, Sequence, SequenceStatus


@dataclass
class ScheduledChunk:
    """Compute tokens [start, start + num_tokens) of `request` this step."""

    request: Sequence
    start: int
    num_tokens: int

    @property
    def samples(self) -> bool:
        """This chunk reaches the request's last token, so its last logits pick the next token."""
        return self.start + self.num_tokens == self.request.num_tokens


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    expired: list[Sequence] = field(default_factory=list)  # dropped from the queue past their deadline

    @property
    def num_batched_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)


class Scheduler:
    def __init__(self, config: EngineConfig, kv_cache: KVCacheManager):
        """Bounded by config.max_num_seqs, max_num_batched_tokens (>= max_num_seqs, checked by the config)
        and max_waiting_requests."""
        self.config = config
        self.kv_cache = kv_cache
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order
        self.num_preemptions = 0

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def add_request(self, request: Sequence) -> None:
        """Queue a request, or refuse it at once (EngineOverloadedError, RequestTooLong)."""
        # Free batch slots take waiting requests at the next step: those are not queued.
        queued = len(self.waiting) - max(0, self.config.max_num_seqs - len(self.running))
        if queued >= self.config.max_waiting_requests:
            raise EngineOverloadedError(queued, self.config.max_waiting_requests)
        longest = request.num_prompt_tokens + request.sampling.max_tokens
        if not self.kv_cache.fits_alone(longest, self.config.max_num_batched_tokens):
            raise RequestTooLong(longest, self.kv_cache.capacity_tokens)
        request.status = SequenceStatus.WAITING
        self.waiting.append(request)

    def schedule(self) -> SchedulerOutput:
        expired = self._drop_expired()
        budget = self.config.max_num_batched_tokens
        scheduled: dict[str, ScheduledChunk] = {}
        preempted: list[Sequence] = []

        # 1. Running requests, oldest admission first: each gets what it still lacks, within budget.
        for request in list(self.running):
            if budget == 0:
                break
            if request.status is not SequenceStatus.RUNNING:  # preempted earlier in this loop
                continue
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            while not self.kv_cache.allocate_slots(request, num_new):
                victim = max(self.running, key=lambda r: r.arrival_index)
                self._preempt(victim)
                preempted.append(victim)
                if victim.request_id in scheduled:  # give back what it was granted this step
                    budget += scheduled.pop(victim.request_id).num_tokens
                if victim is request:
                    break
            else:
                scheduled[request.request_id] = ScheduledChunk(request, request.num_computed_tokens, num_new)
                budget -= num_new

        # 2. Waiting requests, FCFS, starting from their prefix-cache hit. Not after a preemption:
        #    the pool is full, and admitting would only evict someone again.
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs and not preempted:
            request = self.waiting[0]
            prefix = self.kv_cache.find_cached_prefix(request)
            num_new = min(request.num_tokens - prefix.num_tokens, budget)
            if not self.kv_cache.allocate_slots(request, num_new, prefix):
                break
            self.waiting.popleft()
            if request.num_preemptions == 0:  # what the client's usage reports, not recompute hits
                request.num_cached_tokens = min(prefix.num_tokens, request.num_prompt_tokens)
            request.num_computed_tokens = prefix.num_tokens
            request.status = SequenceStatus.RUNNING
            self.running.append(request)
            scheduled[request.request_id] = ScheduledChunk(request, prefix.num_tokens, num_new)
            budget -= num_new

        return SchedulerOutput(list(scheduled.values()), preempted, expired)

    def _drop_expired(self) -> list[Sequence]:
        """Finish (EndReason.DEADLINE) every waiting request whose deadline has passed; running ones
        are left to their consumer, which holds the partial output."""
        if not self.waiting:
            return []
        now = time.time()
        expired = [r for r in self.waiting if r.deadline_s is not None and r.deadline_s <= now]
        for request in expired:
            self._finish(request, EndReason.DEADLINE)
        return expired

    def _preempt(self, request: Sequence) -> None:
        self.running.remove(request)
        self.kv_cache.free(request)
        request.num_computed_tokens = 0
        request.status = SequenceStatus.PREEMPTED
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    def update_from_output(
        self, output: SchedulerOutput, sampled: dict[str, tuple[int, TokenLogprobs | None]]
    ) -> list[Sequence]:
        """Advance computed-token counts, append sampled tokens; returns requests finished by this step.

        `sampled` maps request id -> (token id, logprobs) for every chunk with `samples` set.
        """
        finished = []
        for chunk in output.chunks:
            request = chunk.request
            if request.status is not SequenceStatus.RUNNING:
                continue
            request.num_computed_tokens = chunk.start + chunk.num_tokens
            if not chunk.samples:
                continue  # mid-prefill: the logits of this chunk are not needed
            token_id, logprobs = sampled[request.request_id]
            reason = request.append_output_token(token_id, logprobs)
            if reason is not None:
                self._finish(request, reason)
                finished.append(request)
        return finished

    def abort_request(self, request_id: str) -> Sequence | None:
        """Drop a request wherever it is and free its blocks; returns it, or None if unknown/finished."""
        for queue in (self.running, self.waiting):
            for request in queue:
                if request.request_id == request_id:
                    self._finish(request, EndReason.ABORT)
                    return request
        return None

    def _finish(self, request: Sequence, reason: EndReason) -> None:
        if request in self.running:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        self.kv_cache.free(request)
        request.status = SequenceStatus.FINISHED
        request.finish_reason = reason
