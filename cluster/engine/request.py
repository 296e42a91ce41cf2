"""What travels between the front door, the replica and the engine: plain dataclasses."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

from cluster.engine.errors import InvalidRequestError
from cluster.harmony.structured import CONSTRAINED_STOP_TOKEN_IDS, TurnConstraint

MAX_TEMPERATURE = 100.0
MAX_LOGPROBS = 20  # most alternatives a request may ask for per token


class FinishReason(str, enum.Enum):
    STOP = "stop"  # a stop token was generated (and streamed)
    LENGTH = "length"  # max_tokens reached or the context ran out


@dataclass(frozen=True)
class SamplingParams:
    # None: the engine's default, capped by the context left after the prompt.
    max_tokens: int | None = None
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0  # 1: off
    top_k: int = 0  # 0: off
    seed: int | None = None
    # None: the engine's default stop tokens (harmony's); () with ignore_stop means "none".
    stop_token_ids: tuple[int, ...] | None = None
    ignore_stop: bool = False
    # None: no log probabilities; 0: the sampled token's; n: also the n most likely alternatives.
    logprobs: int | None = None


@dataclass(frozen=True)
class GenerateRequest:
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    request_id: str = ""
    # Client session (x-session-id): requests of one session prefer one replica (routing).
    session_id: str = ""
    # Tenant the front door authenticated (empty when auth is off).
    tenant: str = ""
    # Absolute deadline (time.time() seconds) of the client's call; None: no deadline.
    # Wall-clock, not monotonic, because it crosses processes and hosts.
    deadline_s: float | None = None
    # Structured output: the grammar of the whole harmony turn (response format, strict tools,
    # reasoning budget); the prompt must end with `<|start|>assistant`. None: unconstrained.
    constraint: TurnConstraint | None = None
    # A migrated stream's rest (cluster/frontdoor/migration.py): the last `resumed_tokens` prompt
    # tokens are this request's own output, already streamed; a constraint covers them (its grammar
    # is advanced over them, and sampling.max_tokens counts only what is left of the turn).
    resumed_tokens: int = 0


@dataclass(frozen=True)
class TokenLogprobs:
    """Log-probability of a sampled token and of the most likely tokens at its position."""

    token_id: int
    logprob: float
    top_token_ids: tuple[int, ...] = ()  # most likely first
    top_logprobs: tuple[float, ...] = ()


@dataclass(frozen=True)
class TokenChunk:
    """Tokens ready since the previous chunk; the last chunk of a stream has finish_reason set."""

    token_ids: tuple[int, ...]
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0  # set on the last chunk
    completion_tokens: int = 0  # set on the last chunk
    # Prompt tokens served from a prefix cache; known from the first chunk on, so every chunk has it.
    cached_prompt_tokens: int = 0
    # One entry per token id when the request asked for logprobs, else empty.
    logprobs: tuple[TokenLogprobs, ...] = ()
    # Set by the replica on a stream's first chunk: seconds from the replica taking the request to
    # that chunk (the engine's queue and prefill), for the front door's slow-first-token log.
    replica_first_chunk_s: float | None = None


@dataclass(frozen=True)
class ModelLimits:
    vocab_size: int
    context_length: int


def validate_request(request: GenerateRequest, limits: ModelLimits) -> None:
    """Raise InvalidRequestError naming the first bad field (names as in gptoss.v1 protos)."""
    ids = request.prompt_token_ids
    if not ids:
        raise InvalidRequestError("prompt_token_ids", "must not be empty")
    for i, token in enumerate(ids):
        if not 0 <= token < limits.vocab_size:
            raise InvalidRequestError(
                f"prompt_token_ids[{i}]", f"{token} is outside the vocabulary [0, {limits.vocab_size})")
    if len(ids) >= limits.context_length:
        raise InvalidRequestError(
            "prompt_token_ids", f"{len(ids)} tokens leave no room in the context length {limits.context_length}")
    if not 0 <= request.resumed_tokens < len(ids):
        raise InvalidRequestError("resumed_tokens", f"must be in [0, {len(ids)}), got {request.resumed_tokens}")
    validate_sampling(request.sampling, len(ids), limits)
    if request.constraint is not None and request.constraint.active and request.sampling.ignore_stop:
        raise InvalidRequestError("sampling.ignore_stop", "cannot be combined with a constrained output, "
                                  "which ends at the end of the turn")


def validate_sampling(sampling: SamplingParams, prompt_len: int, limits: ModelLimits,
                      prefix: str = "sampling.") -> None:
    room = limits.context_length - prompt_len
    if sampling.max_tokens is not None:
        if sampling.max_tokens < 1:
            raise InvalidRequestError(f"{prefix}max_tokens", f"must be >= 1, got {sampling.max_tokens}")
        if sampling.max_tokens > room:
            raise InvalidRequestError(
                f"{prefix}max_tokens",
                f"{sampling.max_tokens} exceeds the {room} tokens left in the context length "
                f"{limits.context_length} after a {prompt_len}-token prompt")
    if not (math.isfinite(sampling.temperature) and 0.0 <= sampling.temperature <= MAX_TEMPERATURE):
        raise InvalidRequestError(f"{prefix}temperature", f"must be in [0, {MAX_TEMPERATURE:g}], got {sampling.temperature}")
    if not (math.isfinite(sampling.top_p) and 0.0 < sampling.top_p <= 1.0):
        raise InvalidRequestError(f"{prefix}top_p", f"must be in (0, 1], got {sampling.top_p}")
    if sampling.top_k < 0:
        raise InvalidRequestError(f"{prefix}top_k", f"must be >= 0, got {sampling.top_k}")
    if sampling.logprobs is not None and not 0 <= sampling.logprobs <= MAX_LOGPROBS:
        raise InvalidRequestError(f"{prefix}logprobs", f"must be in [0, {MAX_LOGPROBS}], got {sampling.logprobs}")
    for i, token in enumerate(sampling.stop_token_ids or ()):
        if not 0 <= token < limits.vocab_size:
            raise InvalidRequestError(
                f"{prefix}stop_token_ids[{i}]", f"{token} is outside the vocabulary [0, {limits.vocab_size})")


def resolved_length_and_stops(request: GenerateRequest, limits: ModelLimits, default_max_tokens: int,
                              default_stop_token_ids: tuple[int, ...]) -> tuple[int, tuple[int, ...]]:
    """(max_tokens, stop token ids) of a validated request with the engine's defaults filled in, the
    same for every engine: unset max_tokens is the default capped by the room left in the context;
    ignore_stop means no stop ids, else the request's own or the defaults (harmony's)."""
    sampling = request.sampling
    room = limits.context_length - len(request.prompt_token_ids)
    max_tokens = sampling.max_tokens if sampling.max_tokens is not None else min(default_max_tokens, room)
    if sampling.ignore_stop:
        return max_tokens, ()
    if request.constraint is not None and request.constraint.active:
        # The grammar ends the turn at <|return|> or <|call|>; <|end|> only closes the analysis.
        return max_tokens, tuple(dict.fromkeys(CONSTRAINED_STOP_TOKEN_IDS + tuple(sampling.stop_token_ids or ())))
    return max_tokens, tuple(sampling.stop_token_ids or ()) or default_stop_token_ids
