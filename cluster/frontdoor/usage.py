"""Usage accounting per tenant, for billing: every finished Generate/Chat call of a tenant adds its
tokens to the gptoss_tenant_* counters and writes one usage record (a JSON line) to the
`gptoss.usage` logger, whatever the outcome (completed, cancelled, failed, refused).

Tokens are what the client was sent: completion tokens of the chunks handed to the client's stream,
and the prompt (and its cached part) once the first of them was (0 for a call refused or ended
before any answer). Independent
of gRPC: a call's outcome is a plain status name.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterable

from cluster.metrics import TenantUsageMetrics

USAGE_LOGGER = "gptoss.usage"
OTHER, ANONYMOUS = "_other", "_anonymous"
TOKEN_TYPES = ("prompt", "cached_prompt", "reasoning", "completion")

usage_log = logging.getLogger(USAGE_LOGGER)


@dataclass
class Usage:
    """One call's tokens, filled in as it runs."""

    prompt: int = 0
    cached_prompt: int = 0
    reasoning: int = 0
    completion: int = 0

    def sent(self, prompt: int, completion: int, cached_prompt: int = 0, reasoning: int | None = None) -> None:
        """A part of the answer was handed to the client's stream: `completion` more tokens, the
        reasoning tokens so far (Chat), and the prompt is now billed."""
        self.prompt = prompt
        self.cached_prompt = max(self.cached_prompt, cached_prompt)
        self.completion += completion
        if reasoning is not None:
            self.reasoning = reasoning


class UsageRecorder:
    def __init__(self, metrics: TenantUsageMetrics, known_tenants: Callable[[], Iterable[str]], model: str) -> None:
        self._metrics = metrics
        self._known = known_tenants  # called per record: the key table may be reloaded
        self._model = model

    def label(self, tenant: str) -> str:
        if not tenant:
            return ANONYMOUS
        return tenant if tenant in set(self._known()) else OTHER

    def record(self, *, request_id: str, tenant: str, method: str, usage: Usage, outcome: str,
               duration_s: float) -> None:
        label = self.label(tenant)
        counted = asdict(usage)
        for kind in TOKEN_TYPES:
            if counted[kind]:
                self._metrics.tokens_total.labels(label, kind).inc(counted[kind])
        self._metrics.requests_total.labels(label, outcome).inc()
        if usage_log.isEnabledFor(logging.INFO):
            usage_log.info(json.dumps({
                "time": round(time.time(), 3), "request_id": request_id, "tenant": tenant or ANONYMOUS,
                "model": self._model, "method": method, "outcome": outcome,
                "prompt_tokens": usage.prompt, "cached_prompt_tokens": usage.cached_prompt,
                "reasoning_tokens": usage.reasoning, "completion_tokens": usage.completion,
                "duration_s": round(duration_s, 4)}, separators=(",", ":")))


def configure_usage_log(destination: str) -> None:
    """Send usage records, one JSON object per line and nothing else, to `destination`: "stdout",
    "stderr" or a file path (appended to); "" leaves the logger to the process's logging setup."""
    if not destination:
        return
    for handler in list(usage_log.handlers):
        usage_log.removeHandler(handler)
        handler.close()
    if destination in ("stdout", "stderr"):
        handler: logging.Handler = logging.StreamHandler(getattr(sys, destination))
    else:
        handler = logging.FileHandler(destination)
    handler.setFormatter(logging.Formatter("%(message)s"))
    usage_log.addHandler(handler)
    usage_log.setLevel(logging.INFO)
    usage_log.propagate = False
