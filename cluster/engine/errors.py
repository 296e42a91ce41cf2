"""Typed errors an engine raises; the front door maps them to gRPC status codes.

They cross Ray as pickles inside a RayTaskError, so each reduces to its constructor arguments.
"""

from __future__ import annotations


class EngineError(Exception):
    """Base of every error an engine raises on purpose."""


class InvalidRequestError(EngineError, ValueError):
    """A request field is invalid. `field` names it the way the proto does ("prompt_token_ids[3]")."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason

    def __reduce__(self):
        return (type(self), (self.field, self.reason))


class EngineOverloadedError(EngineError):
    """The engine runs as many requests as it may; the caller should retry later."""

    def __init__(self, active: int, limit: int) -> None:
        super().__init__(f"engine is busy: {active} requests running, limit {limit}")
        self.active = active
        self.limit = limit

    def __reduce__(self):
        return (type(self), (self.active, self.limit))
