"""Per-tenant limits, enforced as calls come in and as tokens are used.

Requests: each call takes one token from the tenant's request bucket or is refused.
Tokens: prompt and generated tokens are charged as they are used, so a long stream may drive
the bucket below zero; a tenant in debt is refused new calls until the bucket is back at 1.
Streams: a tenant has at most max_concurrent_streams streaming calls open.
Each refusal (RateLimitedError) says which limit and how long until a retry can succeed.
Per request: its prompt and max_tokens must fit the tenant's max_context_tokens and
max_output_tokens (`fit_request`). Nothing here knows gRPC: an HTTP front door uses it as is.
"""

from __future__ import annotations

import threading
import time
from typing import Callable

from cluster.frontdoor.errors import FieldError, RateLimitedError
from cluster.frontdoor.tenants import TenantPolicy, Tenants

STREAM_RETRY_S = 1.0  # a full stream budget frees up when one of the tenant's streams ends


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


class TenantLimits:
    """The buckets and open streams of every tenant seen so far (tenants come from the key table,
    so they are few)."""

    def __init__(self, tenants: Tenants, clock: Callable[[], float] = time.monotonic) -> None:
        self.tenants = tenants
        self._clock = clock
        self._lock = threading.Lock()
        self._requests: dict[str, TokenBucket] = {}
        self._tokens: dict[str, TokenBucket] = {}
        self._streams: dict[str, int] = {}

    def _requests_bucket(self, tenant: str, policy: TenantPolicy) -> TokenBucket:
        bucket = self._requests.get(tenant)
        if bucket is None:
            rate = policy.requests_per_s
            bucket = self._requests[tenant] = TokenBucket(rate, policy.request_burst or max(1.0, rate), self._clock)
        return bucket

    def _tokens_bucket(self, tenant: str, policy: TenantPolicy) -> TokenBucket:
        bucket = self._tokens.get(tenant)
        if bucket is None:
            rate = policy.tokens_per_min / 60.0
            bucket = self._tokens[tenant] = TokenBucket(rate, policy.token_burst or max(1.0, policy.tokens_per_min),
                                                        self._clock)
        return bucket

    def admit(self, tenant: str) -> None:
        """Take one request from the tenant's budget, or raise RateLimitedError."""
        policy = self.tenants.policy(tenant)
        with self._lock:
            if policy.tokens_per_min > 0:
                tokens = self._tokens_bucket(tenant, policy)
                if tokens.level() < 1:
                    raise RateLimitedError(tenant, "tokens", tokens.wait_s(1),
                                           f"{policy.tokens_per_min:g} tokens per minute")
            if policy.requests_per_s > 0:
                requests = self._requests_bucket(tenant, policy)
                if not requests.take(1):
                    raise RateLimitedError(tenant, "requests", requests.wait_s(1),
                                           f"{policy.requests_per_s:g} requests per second")

    def open_stream(self, tenant: str) -> None:
        """Count one more open stream of the tenant, or raise RateLimitedError; close_stream ends it."""
        limit = self.tenants.policy(tenant).max_concurrent_streams
        with self._lock:
            n = self._streams.get(tenant, 0)
            if limit > 0 and n >= limit:
                raise RateLimitedError(tenant, "concurrent_streams", STREAM_RETRY_S, f"{limit} concurrent streams")
            self._streams[tenant] = n + 1

    def close_stream(self, tenant: str) -> None:
        with self._lock:
            n = self._streams.get(tenant, 0) - 1
            if n > 0:
                self._streams[tenant] = n
            else:
                self._streams.pop(tenant, None)

    def fit_request(self, tenant: str, prompt_tokens: int, max_tokens: int | None, *, prompt_field: str) -> int | None:
        """The request's max_tokens under the tenant's per-request limits (an unset one is capped
        at max_output_tokens); FieldError naming the field when the request is over them."""
        policy = self.tenants.policy(tenant)
        if policy.max_context_tokens and prompt_tokens > policy.max_context_tokens:
            raise FieldError(prompt_field, f"the prompt has {prompt_tokens} tokens; tenant {tenant or '-'} may send "
                                           f"at most {policy.max_context_tokens} (max_context_tokens)")
        if policy.max_output_tokens:
            if max_tokens is None:
                return policy.max_output_tokens
            if max_tokens > policy.max_output_tokens:
                raise FieldError("sampling.max_tokens", f"tenant {tenant or '-'} may ask for at most "
                                                        f"{policy.max_output_tokens} tokens (max_output_tokens), "
                                                        f"got {max_tokens}")
        return max_tokens

    def charge_tokens(self, tenant: str, n_tokens: int) -> None:
        policy = self.tenants.policy(tenant)
        if policy.tokens_per_min <= 0 or n_tokens <= 0:
            return
        with self._lock:
            self._tokens_bucket(tenant, policy).charge(n_tokens)
