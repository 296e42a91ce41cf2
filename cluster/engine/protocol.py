"""The contract between a serving replica and whatever engine runs the model.

A later engine (continuous batching, paged KV cache) replaces TorchEngine behind this protocol.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import AsyncIterator, Protocol

from cluster.engine.request import GenerateRequest, ModelLimits, TokenChunk


@dataclass(frozen=True)
class EngineStats:
    active_requests: int  # requests decoding now
    requests_total: int  # requests accepted since start
    finished_total: int  # requests that reached a finish reason
    cancelled_total: int  # requests whose caller went away before the end
    failed_total: int  # requests that ended in an error
    tokens_generated_total: int  # tokens produced by the model, cancelled requests included


class Engine(Protocol):
    limits: ModelLimits

    def generate(self, request: GenerateRequest) -> AsyncIterator[TokenChunk]:
        """Stream chunks of generated token ids; the last chunk carries the finish reason.

        Raises InvalidRequestError for a bad request and EngineOverloadedError when full.
        Closing the iterator (or cancelling its task) stops decoding at the next token.
        """
        ...

    def stats(self) -> EngineStats:
        """Counters readable at any time, also while requests run."""
        ...
