"""Request migration: a stream whose replica dies mid-way goes on on another replica.

The front door keeps the token ids it has relayed for each stream. When the replica fails (its
process, its node or one of its expert-parallel ranks dies, its engine stops, or it ends the
stream because it is being shut down: `replica_lost`), the rest of the request is sent to a
replica again as a new request: the original prompt plus the tokens already streamed, the
max_tokens still left, the same deadline. The prefix cache of whichever replica takes it
makes the longer prompt cheap to prefill. Its chunks continue the client's stream, so the client
sees one stream, with no token lost or repeated.

What is guaranteed:
- greedy decoding (temperature 0): the tokens are those the model gives the prompt plus the
  tokens already sent, i.e. the undisturbed run's tokens (as exactly as two greedy runs agree);
- sampled decoding: every token is still a sample of the model given all tokens before it, so the
  stream is a valid sample; with a seed, the rest is drawn with a seed derived from (seed, tokens
  already sent), so the same failure at the same point gives the same stream, but not the tokens
  the undisturbed run would have drawn after that point (its generator state is lost with the
  replica).
- constrained output (response_format, strict tools, reasoning budget): the resumed request says
  how many of its prompt tokens were streamed (`resumed_tokens`); the torch engine compiles the
  whole turn's grammar and advances it over them, so the rest still completes a valid turn. vLLM
  cannot advance a grammar over prompt tokens (ModelInfo.resumes_constrained is False): there a
  constrained stream is not resumed and ends UNAVAILABLE with RetryInfo (outcome `constrained`),
  unless it was lost before its first token: then it starts afresh on another replica, grammar
  and all (a replica whose engine died but which Serve has not yet replaced fails at once).

At most frontdoor.migration_attempts resumptions per stream; none once the call's deadline has
passed. A resumption that fails again before its first token (the routers still list the lost
replica for a moment, or it is being replaced) is retried with a growing pause, for up to
frontdoor.replica_wait_s, without using an attempt. gptoss_frontdoor_migrations_total counts each by outcome; when no replica takes the
rest, the call ends UNAVAILABLE (NO_REPLICA, with RetryInfo), as any call with no replica does.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import AsyncIterator

from cluster.engine.request import FinishReason, GenerateRequest, TokenChunk
from cluster.serving.replica_streams import NoReplicaError, ReplicaStreams, replica_lost

log = logging.getLogger(__name__)

RESUMED, EXHAUSTED, NO_REPLICA, DEADLINE = "resumed", "exhausted", "no_replica", "deadline"
CONSTRAINED = "constrained"  # a constrained stream, and the engine cannot resume its grammar
# Pause before a resumption: this, doubled for each retry that failed before its first token
# (the routers learn of a dead replica within a moment), at most MAX_BACKOFF_S.
BACKOFF_S = 0.1
MAX_BACKOFF_S = 2.0
_SEED_MASK = (1 << 63) - 1


def resumed_request(request: GenerateRequest, sent: list[int], default_max_tokens: int,
                    context_length: int) -> GenerateRequest | None:
    """The rest of `request` after `sent` tokens were streamed; None when nothing is left to generate."""
    sampling = request.sampling
    total = sampling.max_tokens
    if total is None:
        total = min(default_max_tokens, context_length - len(request.prompt_token_ids)) if default_max_tokens else None
    left = None if total is None else total - len(sent)
    if left is not None and left <= 0:
        return None
    seed = sampling.seed
    if seed is not None and sent:
        seed = (seed * 1_000_003 + len(sent)) & _SEED_MASK
    return dataclasses.replace(request, prompt_token_ids=request.prompt_token_ids + tuple(sent),
                               sampling=dataclasses.replace(sampling, max_tokens=left, seed=seed),
                               resumed_tokens=len(sent))


class MigratingStream:
    """One request's TokenChunks, resumed on another replica when its replica is lost."""

    def __init__(self, replicas: ReplicaStreams, request: GenerateRequest, *, attempts: int,
                 default_max_tokens: int, context_length: int, migrations, retry_for_s: float = 30.0,
                 resumes_constrained: bool = True) -> None:
        self._replicas = replicas
        self._request = request
        self._attempts = attempts
        self._default_max_tokens = default_max_tokens
        self._context_length = context_length
        self._migrations = migrations  # gptoss_frontdoor_migrations_total
        self._retry_for_s = retry_for_s
        # ModelInfo.resumes_constrained: False (vLLM) ends a constrained stream at its replica's loss.
        self._resumable = resumes_constrained or request.constraint is None or not request.constraint.active
        self._stream = replicas.open(request)  # on its way when this returns

    async def __aiter__(self) -> AsyncIterator[TokenChunk]:
        sent: list[int] = []
        attempt = 0
        resuming = False
        retries = 0  # resumptions in a row that failed before their first token
        retrying_since = 0.0
        while True:
            try:
                async for chunk in self._stream:
                    if resuming:
                        resuming, retries = False, 0
                        self._migrations.labels(RESUMED).inc()
                    sent.extend(chunk.token_ids)
                    yield chunk
                return
            except NoReplicaError:
                if resuming:
                    self._migrations.labels(NO_REPLICA).inc()
                raise
            except Exception as err:  # noqa: BLE001 - only a lost replica is resumed; the rest re-raised
                if not replica_lost(err):
                    raise
                if resuming:  # the resumed stream failed before its first token: not a new loss
                    if retries == 0:
                        retrying_since = time.monotonic()
                    retries += 1
                    if time.monotonic() - retrying_since > self._retry_for_s:
                        self._migrations.labels(NO_REPLICA).inc()
                        raise
                outcome = self._refusal(attempt if not resuming else attempt - 1, sent)
                if outcome is not None:
                    self._migrations.labels(outcome).inc()
                    raise
                pause = min(MAX_BACKOFF_S, BACKOFF_S * 2 ** retries)
                if not resuming:
                    attempt += 1
                log.warning("request_id=%s replica lost after %d tokens (%r): resuming on another replica "
                            "(attempt %d of %d)", self._request.request_id, len(sent), err, attempt, self._attempts)
                rest = resumed_request(self._request, sent, self._default_max_tokens, self._context_length)
                if rest is None:  # every token was sent, only the end was lost
                    self._migrations.labels(RESUMED).inc()
                    yield TokenChunk((), FinishReason.LENGTH, prompt_tokens=len(self._request.prompt_token_ids),
                                     completion_tokens=len(sent))
                    return
                self._stream.close()
                await asyncio.sleep(pause)
                self._stream = self._replicas.open(rest)
                resuming = True

    def _refusal(self, attempt: int, sent: list[int]) -> str | None:
        """Why this stream is not resumed (an outcome), or None to resume it."""
        if sent and not self._resumable:
            return CONSTRAINED
        if attempt >= self._attempts:
            return EXHAUSTED
        deadline = self._request.deadline_s
        if deadline is not None and deadline - time.time() <= BACKOFF_S:
            return DEADLINE
        return None

    def close(self) -> None:
        self._stream.close()
