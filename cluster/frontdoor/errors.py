"""THE mapping from internal errors to gRPC status codes.

Every RPC of the front door ends in `status_for(error)`; nothing else chooses a code. Clients get
a message naming the bad field (with a google.rpc.BadRequest detail) or a short, stable sentence,
never a traceback; unexpected errors are logged here with theirs.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status
from ray import exceptions as ray_exceptions
from ray.serve import exceptions as serve_exceptions

from cluster.engine.errors import EngineOverloadedError, InvalidRequestError

log = logging.getLogger(__name__)


class FieldError(InvalidRequestError):
    """A request field the front door itself rejects (same shape as the engine's)."""


@dataclass(frozen=True)
class RpcError:
    code: grpc.StatusCode
    message: str
    field: str | None = None  # set for INVALID_ARGUMENT: the offending field's path

    def to_status(self) -> grpc.Status:
        """A grpc.Status with code, message and (for a bad field) a BadRequest detail."""
        status = status_pb2.Status(code=self.code.value[0], message=self.message)
        if self.field is not None:
            violation = error_details_pb2.BadRequest.FieldViolation(field=self.field, description=self.message)
            detail = any_pb2.Any()
            detail.Pack(error_details_pb2.BadRequest(field_violations=[violation]))
            status.details.append(detail)
        return rpc_status.to_status(status)


def _root_cause(err: BaseException) -> BaseException:
    """Unwrap Ray's RayTaskError to the exception the replica raised."""
    seen = 0
    while isinstance(err, ray_exceptions.RayTaskError) and getattr(err, "cause", None) is not None and seen < 8:
        if isinstance(err, (InvalidRequestError, EngineOverloadedError)):
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
    """Map an error raised while serving an RPC to the status the client receives."""
    cause = _root_cause(err)
    harmony_error = _harmony_input_error()
    if isinstance(cause, InvalidRequestError):
        return RpcError(grpc.StatusCode.INVALID_ARGUMENT, str(cause), field=cause.field)
    if harmony_error is not None and isinstance(cause, harmony_error):
        field = getattr(cause, "field", None) or "messages"
        text = str(cause)
        message = text if text.startswith(f"{field}:") else f"{field}: {text}"
        return RpcError(grpc.StatusCode.INVALID_ARGUMENT, message, field=field)
    if isinstance(cause, (EngineOverloadedError, serve_exceptions.BackPressureError)):
        return RpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, "the model is overloaded; retry later")
    if isinstance(cause, (asyncio.TimeoutError, TimeoutError, ray_exceptions.GetTimeoutError)):
        return RpcError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")
    if isinstance(cause, (serve_exceptions.RequestCancelledError, ray_exceptions.TaskCancelledError,
                          asyncio.CancelledError)):
        return RpcError(grpc.StatusCode.CANCELLED, "request cancelled")
    if isinstance(cause, _UNAVAILABLE) or isinstance(err, _UNAVAILABLE):
        log.warning("request %s: model replica unavailable: %r", request_id or "-", cause)
        return RpcError(grpc.StatusCode.UNAVAILABLE, "no model replica is available; retry later")
    log.error("request %s failed", request_id or "-", exc_info=(type(err), err, err.__traceback__))
    return RpcError(grpc.StatusCode.INTERNAL, f"internal error (request {request_id or '-'}); see server logs")


# Status codes as Prometheus label values ("OK", "INVALID_ARGUMENT", ...).
def code_label(code: grpc.StatusCode) -> str:
    return code.name


assert code_pb2.INVALID_ARGUMENT == grpc.StatusCode.INVALID_ARGUMENT.value[0]  # the two enumerations agree
