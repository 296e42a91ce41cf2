"""Typed errors an engine raises; the front door maps them to gRPC status codes.

They cross Ray as pickles inside a RayTaskError, so each reduces to its constructor arguments:
every error keeps each argument as an attribute of the same name (EngineError.__reduce__ reads them).
"""

from __future__ import annotations

import inspect


class EngineError(Exception):
    """Base of every error an engine raises on purpose."""

    def __reduce__(self):
        if type(self).__init__ is Exception.__init__:
            return super().__reduce__()
        names = list(inspect.signature(type(self).__init__).parameters)[1:]  # after self
        return (type(self), tuple(getattr(self, name) for name in names))


class InvalidRequestError(EngineError, ValueError):
    """A request field is invalid. `field` names it the way the proto does ("prompt_token_ids[3]")."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason



class RequestTooLong(InvalidRequestError):
    """Prompt plus max_tokens can never fit the KV cache, even with the engine to itself."""

    def __init__(self, num_tokens: int, capacity_tokens: int) -> None:
        super().__init__("sampling.max_tokens",
                         f"prompt + max_tokens = {num_tokens} tokens can never fit this replica's KV cache "
                         f"(about {capacity_tokens} tokens)")
        self.num_tokens = num_tokens
        self.capacity_tokens = capacity_tokens



# Retry hints for a refused request: the time the queue ahead of it needs to drain at the recent
# finish rate, within these bounds; the default when nothing has finished lately.
RETRY_AFTER_BOUNDS_S = (0.05, 30.0)
DEFAULT_RETRY_AFTER_S = 1.0


def retry_after_s(queued: int, finished_per_s: float) -> float:
    if finished_per_s <= 0:
        return DEFAULT_RETRY_AFTER_S
    low, high = RETRY_AFTER_BOUNDS_S
    return min(high, max(low, queued / finished_per_s))


class EngineOverloadedError(EngineError):
    """The engine's queue is full: the request was refused, not queued. The front door maps this to
    RESOURCE_EXHAUSTED with `retry_after_s` as the RetryInfo hint."""

    def __init__(self, queued: int, limit: int, retry_after_s: float = 1.0) -> None:
        super().__init__(f"engine is full: {queued} requests queued, limit {limit}; retry in {retry_after_s:.2f} s")
        self.queued = queued
        self.limit = limit
        self.retry_after_s = retry_after_s



class DeadlineExceededError(EngineError, TimeoutError):
    """The request's deadline passed while it waited in the engine's queue: it was dropped unstarted.
    The front door maps it (a TimeoutError) to DEADLINE_EXCEEDED."""

    def __init__(self, request_id: str, late_by_s: float) -> None:
        super().__init__(f"request {request_id} dropped from the queue {late_by_s:.3f} s past its deadline")
        self.request_id = request_id
        self.late_by_s = late_by_s



class EngineDead(EngineError):
    """The engine's step loop failed: this replica can serve nothing more (Serve replaces it)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
