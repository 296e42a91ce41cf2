"""THE mapping from internal errors to gRPC status codes and google.rpc error details.

Every RPC of the front door, and every call the server refuses before an RPC runs (auth, rate
limits, drain, undecodable messages), ends in `status_for(error)`; nothing else chooses a code.
Clients get a short, stable message plus machine-readable details, never a traceback:

  INVALID_ARGUMENT    BadRequest (one violation per bad field), or ErrorInfo MALFORMED_MESSAGE
  UNAUTHENTICATED     ErrorInfo API_KEY_MISSING | API_KEY_INVALID
  PERMISSION_DENIED   ErrorInfo ADMIN_REQUIRED
  NOT_FOUND           ErrorInfo RESPONSE_NOT_FOUND | MODEL_NOT_FOUND (the HTTP API's ids)
  RESOURCE_EXHAUSTED  RetryInfo + QuotaFailure (tenant limits) or ErrorInfo MODEL_OVERLOADED (the
                      engine's queue is full: RetryInfo is the engine's own estimate)
  UNAVAILABLE         RetryInfo + ErrorInfo DRAINING | NO_REPLICA (a dead engine counts as no replica)
                      | STORE_UNAVAILABLE (the HTTP API's shared response store)
  DEADLINE_EXCEEDED, CANCELLED, INTERNAL
and every status carries RequestInfo with the call's x-request-id. Unexpected errors are logged
here with their traceback.

The OpenAI-compatible HTTP routes answer the same RpcError as an HTTP status with OpenAI's error
object (`http_error`): 400 invalid_request_error with `param` naming the field, 401, 403, 404,
429 and 503 with Retry-After, 504, 500.
"""

from __future__ import annotations

import asyncio
import logging
import math
from dataclasses import dataclass

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status
from ray import exceptions as ray_exceptions
from ray.serve import exceptions as serve_exceptions

from cluster.engine.errors import DeadlineExceededError, EngineDead, EngineOverloadedError, InvalidRequestError

log = logging.getLogger(__name__)

DOMAIN = "gptoss.v1"
# How long a client should wait before retrying a call refused for overload (when the refusal
# carries no estimate of its own, e.g. Serve's back pressure) or a drain.
OVERLOADED_RETRY_S = 1.0
UNAVAILABLE_RETRY_S = 1.0


# ─────────────────────────── errors the front door raises itself ───────────────────────────

class FieldError(InvalidRequestError):
    """A request field the front door itself rejects (same shape as the engine's)."""


class FieldErrors(Exception):
    """Several bad fields at once; each becomes one BadRequest violation."""

    def __init__(self, errors: list[InvalidRequestError]) -> None:
        super().__init__("; ".join(str(e) for e in errors))
        self.errors = errors


class MalformedMessageError(Exception):
    """The request bytes are not a valid protobuf message of the method's request type."""

    def __init__(self, type_name: str) -> None:
        super().__init__(f"the request is not a valid {type_name} message")


class AuthenticationError(Exception):
    """No API key, or one that matches no tenant. `reason` is API_KEY_MISSING or API_KEY_INVALID."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class PermissionDeniedError(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class RateLimitedError(Exception):
    """A tenant is over one of its limits: `limit` is "requests", "tokens" or "concurrent_streams";
    `allowance` says what the limit is ("600 tokens per minute")."""

    def __init__(self, tenant: str, limit: str, retry_after_s: float, allowance: str = "") -> None:
        over = f" of {allowance}" if allowance else ""
        super().__init__(f"tenant {tenant or '-'} is over its {limit} limit{over}; retry in {retry_after_s:.1f} s")
        self.tenant = tenant
        self.limit = limit
        self.retry_after_s = retry_after_s


class NotFoundError(Exception):
    """An id the caller named does not exist for it (a stored response, a model). `reason` is
    RESPONSE_NOT_FOUND or MODEL_NOT_FOUND; `field` the request field that named it."""

    def __init__(self, reason: str, field: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.field = field


class StoreUnavailableError(ConnectionError):
    """The shared response store (Redis) cannot be reached."""


class DrainingError(Exception):
    def __init__(self) -> None:
        super().__init__("this front door is draining before shutdown; retry on another")


# ─────────────────────────────────────── the status ───────────────────────────────────────

@dataclass(frozen=True)
class RpcError:
    code: grpc.StatusCode
    message: str
    # (field path, description) for INVALID_ARGUMENT on named fields.
    violations: tuple[tuple[str, str], ...] = ()
    reason: str | None = None  # ErrorInfo.reason
    retry_after_s: float | None = None  # RetryInfo.retry_delay
    quota_subject: str | None = None  # QuotaFailure: who is over which limit
    request_id: str = ""

    @property
    def field(self) -> str | None:
        """The first bad field's path (None unless INVALID_ARGUMENT on a field)."""
        return self.violations[0][0] if self.violations else None

    def details(self) -> list:
        details: list = []
        if self.violations:
            details.append(error_details_pb2.BadRequest(field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=f, description=d) for f, d in self.violations]))
        if self.reason is not None:
            details.append(error_details_pb2.ErrorInfo(reason=self.reason, domain=DOMAIN))
        if self.retry_after_s is not None:
            details.append(error_details_pb2.RetryInfo(retry_delay=_duration(self.retry_after_s)))
        if self.quota_subject is not None:
            details.append(error_details_pb2.QuotaFailure(violations=[
                error_details_pb2.QuotaFailure.Violation(subject=self.quota_subject, description=self.message)]))
        if self.request_id:
            details.append(error_details_pb2.RequestInfo(request_id=self.request_id))
        return details

    def to_status(self) -> grpc.Status:
        """A grpc.Status whose trailing metadata carries the google.rpc.Status with details."""
        status = status_pb2.Status(code=self.code.value[0], message=self.message)
        for detail in self.details():
            packed = any_pb2.Any()
            packed.Pack(detail)
            status.details.append(packed)
        return rpc_status.to_status(status)


def _duration(seconds: float) -> duration_pb2.Duration:
    seconds = max(0.0, seconds)
    whole = math.floor(seconds)
    return duration_pb2.Duration(seconds=whole, nanos=int(round((seconds - whole) * 1e9)) % 1_000_000_000)


# ─────────────────────────────────────── the mapping ───────────────────────────────────────

def _root_cause(err: BaseException) -> BaseException:
    """Unwrap Ray's RayTaskError to the exception the replica raised."""
    seen = 0
    while isinstance(err, ray_exceptions.RayTaskError) and getattr(err, "cause", None) is not None and seen < 8:
        if isinstance(err, (InvalidRequestError, EngineOverloadedError, EngineDead)):
            break  # Ray's dual-class wrapper already is the cause's type
        err = err.cause
        seen += 1
    return err


def _harmony_input_error() -> type[BaseException] | None:
    try:
        from cluster.harmony.render import HarmonyInputError
    except ImportError:
        return None
    return HarmonyInputError


def _violation(err: BaseException) -> tuple[str, str]:
    field = getattr(err, "field", None) or "messages"
    text = str(err)
    return field, (text if text.startswith(f"{field}:") else f"{field}: {text}")


_UNAVAILABLE = (
    ray_exceptions.RayActorError,
    ray_exceptions.ActorUnavailableError,
    ray_exceptions.RaySystemError,
    ray_exceptions.ObjectLostError,
    serve_exceptions.DeploymentUnavailableError,
    serve_exceptions.ReplicaUnavailableError,
    ConnectionError,
)


def status_for(err: BaseException, *, request_id: str = "") -> RpcError:
    """Map an error raised while serving (or admitting) a call to the status the client receives."""
    cause = _root_cause(err)
    harmony_error = _harmony_input_error()
    code = grpc.StatusCode
    if isinstance(cause, FieldErrors):
        violations = tuple(_violation(e) for e in cause.errors)
        return RpcError(code.INVALID_ARGUMENT, "; ".join(d for _, d in violations), violations,
                        request_id=request_id)
    if isinstance(cause, InvalidRequestError) or (harmony_error is not None and isinstance(cause, harmony_error)):
        field, description = _violation(cause)
        return RpcError(code.INVALID_ARGUMENT, description, ((field, description),), request_id=request_id)
    if isinstance(cause, MalformedMessageError):
        return RpcError(code.INVALID_ARGUMENT, str(cause), reason="MALFORMED_MESSAGE", request_id=request_id)
    if isinstance(cause, AuthenticationError):
        return RpcError(code.UNAUTHENTICATED, str(cause), reason=cause.reason, request_id=request_id)
    if isinstance(cause, NotFoundError):
        return RpcError(code.NOT_FOUND, str(cause), ((cause.field, str(cause)),), reason=cause.reason,
                        request_id=request_id)
    if isinstance(cause, PermissionDeniedError):
        return RpcError(code.PERMISSION_DENIED, str(cause), reason=cause.reason, request_id=request_id)
    if isinstance(cause, RateLimitedError):
        return RpcError(code.RESOURCE_EXHAUSTED, str(cause), reason="TENANT_RATE_LIMITED",
                        retry_after_s=cause.retry_after_s, quota_subject=f"tenant:{cause.tenant}/{cause.limit}",
                        request_id=request_id)
    if isinstance(cause, (EngineOverloadedError, serve_exceptions.BackPressureError)):
        retry_after_s = getattr(cause, "retry_after_s", None) or OVERLOADED_RETRY_S
        return RpcError(code.RESOURCE_EXHAUSTED, "the model is overloaded; retry later", reason="MODEL_OVERLOADED",
                        retry_after_s=retry_after_s, request_id=request_id)
    if isinstance(cause, DrainingError):
        return RpcError(code.UNAVAILABLE, str(cause), reason="DRAINING", retry_after_s=UNAVAILABLE_RETRY_S,
                        request_id=request_id)
    if isinstance(cause, StoreUnavailableError):
        log.warning("request_id=%s %s", request_id or "-", cause)
        return RpcError(code.UNAVAILABLE, "the response store is unavailable; retry later", reason="STORE_UNAVAILABLE",
                        retry_after_s=UNAVAILABLE_RETRY_S, request_id=request_id)
    if isinstance(cause, (DeadlineExceededError, asyncio.TimeoutError, TimeoutError, ray_exceptions.GetTimeoutError)):
        return RpcError(code.DEADLINE_EXCEEDED, "deadline exceeded", request_id=request_id)
    if isinstance(cause, (serve_exceptions.RequestCancelledError, ray_exceptions.TaskCancelledError,
                          asyncio.CancelledError)):
        return RpcError(code.CANCELLED, "request cancelled", request_id=request_id)
    if isinstance(cause, (*_UNAVAILABLE, EngineDead)) or isinstance(err, _UNAVAILABLE):
        log.warning("request_id=%s model replica unavailable: %r", request_id or "-", cause)
        return RpcError(code.UNAVAILABLE, "no model replica is available; retry later", reason="NO_REPLICA",
                        retry_after_s=UNAVAILABLE_RETRY_S, request_id=request_id)
    log.error("request_id=%s failed", request_id or "-", exc_info=(type(err), err, err.__traceback__))
    return RpcError(code.INTERNAL, f"internal error (request {request_id or '-'}); see server logs",
                    request_id=request_id)


# ───────────────────────────────── the same status over HTTP ─────────────────────────────────

# status code -> (HTTP status, OpenAI error type)
_HTTP = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable_error"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout_error"),
    grpc.StatusCode.CANCELLED: (499, "cancelled"),  # nginx's "client closed request"; no client reads it
}


@dataclass(frozen=True)
class HttpError:
    status: int
    body: dict  # {"error": {"message", "type", "param", "code"}}
    headers: dict[str, str]


def http_error(status: RpcError) -> HttpError:
    """The HTTP form of a status: OpenAI's error object; Retry-After (whole seconds, rounded up)
    wherever the gRPC form carries RetryInfo."""
    http_status, kind = _HTTP.get(status.code, (500, "server_error"))
    code = status.reason.lower() if status.reason else ("invalid_value" if status.violations else None)
    if http_status == 500:
        code = "internal_error"
    headers = {}
    if status.retry_after_s is not None:
        headers["retry-after"] = str(max(1, math.ceil(status.retry_after_s)))
    error = {"message": status.message, "type": kind, "param": status.field, "code": code}
    return HttpError(http_status, {"error": error}, headers)


# Status codes as Prometheus label values ("OK", "INVALID_ARGUMENT", ...).
def code_label(code: grpc.StatusCode) -> str:
    return code.name


assert code_pb2.INVALID_ARGUMENT == grpc.StatusCode.INVALID_ARGUMENT.value[0]  # the two enumerations agree
