"""Per-tenant token buckets on requests and on tokens.

Requests: each call takes one token from the tenant's request bucket or is refused.
Tokens: prompt and generated tokens are charged as they are used, so a long stream may drive
the bucket below zero; a tenant in debt is refused new calls until the bucket is back at 1.
Either refusal says how long until a retry can succeed (RetryInfo).
"""

from __future__ import annotations

import threading
import time
from typing import Callable

from cluster.config import LimitsConfig
from cluster.frontdoor.errors import RateLimitedError


class TokenBucket:
    """`rate` tokens per second up to `burst`; the level may go negative through charge()."""

    def __init__(self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._level = burst
        self._at = clock()

    def level(self) -> float:
        now = self._clock()
        self._level = min(self.burst, self._level + (now - self._at) * self.rate)
        self._at = now
        return self._level

    def wait_s(self, amount: float = 1.0) -> float:
        """Seconds until `amount` tokens are available (0 if they are now)."""
        return max(0.0, (amount - self.level()) / self.rate)

    def take(self, amount: float = 1.0) -> bool:
        if self.level() < amount:
            return False
        self._level -= amount
        return True

    def charge(self, amount: float) -> None:
        self.level()
        self._level -= amount


def _burst(rate: float, burst: float) -> float:
    return burst if burst > 0 else max(1.0, rate)


class TenantLimits:
    """The buckets of every tenant seen so far (tenants come from the key table, so they are few)."""

    def __init__(self, config: LimitsConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self._config = config
        self._clock = clock
        self._lock = threading.Lock()
        self._requests: dict[str, TokenBucket] = {}
        self._tokens: dict[str, TokenBucket] = {}

    @property
    def enabled(self) -> bool:
        return self._config.requests_per_s > 0 or self._config.tokens_per_s > 0

    def _bucket(self, table: dict[str, TokenBucket], tenant: str, rate: float, burst: float) -> TokenBucket:
        bucket = table.get(tenant)
        if bucket is None:
            bucket = table[tenant] = TokenBucket(rate, _burst(rate, burst), self._clock)
        return bucket

    def admit(self, tenant: str) -> None:
        """Take one request from the tenant's budget, or raise RateLimitedError."""
        c = self._config
        with self._lock:
            if c.tokens_per_s > 0:
                tokens = self._bucket(self._tokens, tenant, c.tokens_per_s, c.token_burst)
                if tokens.level() < 1:
                    raise RateLimitedError(tenant, "tokens", tokens.wait_s(1))
            if c.requests_per_s > 0:
                requests = self._bucket(self._requests, tenant, c.requests_per_s, c.request_burst)
                if not requests.take(1):
                    raise RateLimitedError(tenant, "requests", requests.wait_s(1))

    def charge_tokens(self, tenant: str, n_tokens: int) -> None:
        c = self._config
        if c.tokens_per_s <= 0 or n_tokens <= 0:
            return
        with self._lock:
            self._bucket(self._tokens, tenant, c.tokens_per_s, c.token_burst).charge(n_tokens)
