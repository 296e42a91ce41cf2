"""CallRecord: one call's metrics, either API (in-flight gauge, status code, latencies, tokens).

The per-method metric children are looked up once (MethodMetrics) rather than on every chunk.
"""

from __future__ import annotations

import time
from typing import Callable

import grpc

from cluster.frontdoor import errors
from cluster.frontdoor.usage import Usage
from cluster.metrics import FrontdoorMetrics


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

    def __init__(self, metrics: FrontdoorMetrics, method: str, children: MethodMetrics, api: str = "grpc") -> None:
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

    def prompt(self, n_tokens: int) -> None:
        self._m.prompt_tokens.inc(n_tokens)

    def tokens(self, n_tokens: int) -> None:
        if not n_tokens:
            return
        now = time.perf_counter()
        histogram = self._m.itl
        if self._last_token_at is None:
            # The first token's wait is time to first token; tokens that came with it waited 0.
            self._m.ttft.observe(now - self.start)
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

    def failed(self, status: errors.RpcError) -> None:
        """The call ends with `status` (a refusal for lack of room is also counted as one)."""
        self.code = status.code
        if status.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            self.metrics.rejected_requests_total.labels(self.api, self.method, status.reason or "").inc()

    def end(self) -> None:
        self._m.in_flight.dec()
        self.metrics.requests_total.labels(self.api, self.method, errors.code_label(self.code)).inc()
        self._m.duration.observe(time.perf_counter() - self.start)
