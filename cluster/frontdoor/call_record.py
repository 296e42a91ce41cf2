"""CallRecord: one call's metrics, either API (in-flight gauge, status code, latencies, tokens).

The per-method metric children are looked up once (MethodMetrics) rather than on every chunk.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

import grpc

from cluster.frontdoor import errors
from cluster.frontdoor.usage import Usage
from cluster.metrics import FrontdoorMetrics

log = logging.getLogger(__name__)


class MethodMetrics:
    """One method's labelled metric children."""

    def __init__(self, metrics: FrontdoorMetrics, method: str, api: str = "grpc") -> None:
        self.in_flight = metrics.requests_in_flight.labels(api, method)
        self.prompt_tokens = metrics.prompt_tokens_total.labels(api, method)
        self.completion_tokens = metrics.completion_tokens_total.labels(api, method)
        self.ttft = metrics.time_to_first_token_seconds.labels(api, method)
        self.itl = metrics.inter_token_latency_seconds.labels(api, method)
        self.duration = metrics.request_duration_seconds.labels(api, method)


class CallRecord:
    """The bookkeeping of one call, from admission until end()."""

    def __init__(self, metrics: FrontdoorMetrics, method: str, children: MethodMetrics, api: str = "grpc",
                 slow_first_token_s: float = 0.0) -> None:
        self.metrics = metrics
        self.method = method
        self.api = api
        self._m = children
        self.code = grpc.StatusCode.UNKNOWN
        self.usage = Usage()  # what the client was sent, for the tenant's usage record
        self.start = time.perf_counter()
        self._last_token_at: float | None = None
        self._m.in_flight.inc()
        self.detached = False  # someone else (a background response) calls release() later
        # The stream's last message (its usage) was handed to the transport: a client that goes away
        # after reading it without waiting for the status (as gRPC clients may) ends an answered call.
        self.answered = False
        self.release: Callable[[], None] = self.end  # the call ended: out of flight, counted, billed
        # The first token's way, logged when it took over slow_first_token_s (0: never)
        self.log: logging.LoggerAdapter | logging.Logger = log  # the call's (request_id=...) once admitted
        self._slow_first_token_s = slow_first_token_s
        self.dispatched_at: float | None = None  # the request left for a replica
        self.first_chunk_at: float | None = None  # the replica's first chunk arrived
        self._replica_first_chunk_s: float | None = None

    def first_chunk(self, replica_first_chunk_s: float | None) -> None:
        """The replica's first chunk arrived, with the replica's own time to it (None from a replica
        that does not say)."""
        self.first_chunk_at = time.perf_counter()
        self._replica_first_chunk_s = replica_first_chunk_s

    def prompt(self, n_tokens: int) -> None:
        self._m.prompt_tokens.inc(n_tokens)

    def tokens(self, n_tokens: int) -> None:
        if not n_tokens:
            return
        now = time.perf_counter()
        histogram = self._m.itl
        if self._last_token_at is None:
            # The first token's wait is time to first token; tokens that came with it waited 0.
            ttft = now - self.start
            self._m.ttft.observe(ttft)
            if self._slow_first_token_s and ttft > self._slow_first_token_s:
                self._log_slow_first_token(now)
            for _ in range(n_tokens - 1):
                histogram.observe(0.0)
        else:
            # A chunk of n tokens after t seconds: n observations of t/n (one per completion
            # token after the first, so the count is completion_tokens - 1 per stream).
            per_token = (now - self._last_token_at) / n_tokens
            for _ in range(n_tokens):
                histogram.observe(per_token)
        self._last_token_at = now
        self._m.completion_tokens.inc(n_tokens)

    def _log_slow_first_token(self, now: float) -> None:
        """Where a slow first token's time went, in ms: the front door before the request left
        (admission, conversion), the way to the replica and back (routing, the transport, and Serve's
        queue on the handle path), the replica (its engine's queue and prefill), and the front door
        after the first chunk came (stop sequences, text, the message handed to the transport)."""
        def ms(seconds: float | None) -> str:
            return "?" if seconds is None else f"{seconds * 1000.0:.1f}"

        dispatched, back, replica = self.dispatched_at, self.first_chunk_at, self._replica_first_chunk_s
        before = None if dispatched is None else dispatched - self.start
        way = None if None in (dispatched, back, replica) else back - dispatched - replica
        after = None if back is None else now - back
        self.log.warning("slow first token: ttft_ms=%s frontdoor_before_ms=%s to_replica_and_back_ms=%s "
                         "replica_ms=%s frontdoor_after_ms=%s (api=%s)", ms(now - self.start), ms(before), ms(way),
                         ms(replica), ms(after), self.api)

    def failed(self, status: errors.RpcError) -> None:
        """The call ends with `status` (a refusal for lack of room is also counted as one)."""
        self.code = status.code
        if status.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            self.metrics.rejected_requests_total.labels(self.api, self.method, status.reason or "").inc()

    def end(self) -> None:
        self._m.in_flight.dec()
        self.metrics.requests_total.labels(self.api, self.method, errors.code_label(self.code)).inc()
        self._m.duration.observe(time.perf_counter() - self.start)
