"""Reading google.rpc error details off a failed call, for assertions."""

from __future__ import annotations

from google.rpc import error_details_pb2
from grpc_status import rpc_status

KINDS = {"BadRequest": error_details_pb2.BadRequest, "ErrorInfo": error_details_pb2.ErrorInfo,
         "RetryInfo": error_details_pb2.RetryInfo, "QuotaFailure": error_details_pb2.QuotaFailure,
         "RequestInfo": error_details_pb2.RequestInfo}


def details(err) -> dict[str, object]:
    """{"BadRequest": msg, "RetryInfo": msg, ...} of an RpcError (empty without a status detail)."""
    status = rpc_status.from_call(err)
    found = {}
    for any_detail in (status.details if status is not None else ()):
        for name, kind in KINDS.items():
            message = kind()
            if any_detail.Unpack(message):
                found[name] = message
    return found


def bad_fields(err) -> list[str]:
    return [v.field for v in details(err)["BadRequest"].field_violations]


def retry_delay_s(err) -> float:
    return details(err)["RetryInfo"].retry_delay.ToTimedelta().total_seconds()
