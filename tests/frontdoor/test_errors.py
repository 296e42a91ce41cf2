"""The one status mapping: every internal error gets a canonical code and a safe message."""

from __future__ import annotations

import grpc
import pytest
from ray import exceptions as ray_exceptions
from ray.serve.exceptions import BackPressureError

from cluster.engine.errors import DeadlineExceededError, EngineOverloadedError, InvalidRequestError
from cluster.frontdoor.errors import (AuthenticationError, DrainingError, FieldError, NotFoundError,
                                     PermissionDeniedError, RateLimitedError, StoreUnavailableError, http_error,
                                     status_for)
from cluster.harmony.render import HarmonyInputError


def test_invalid_input_is_invalid_argument_naming_the_field():
    status = status_for(InvalidRequestError("prompt_token_ids[3]", "250000 is outside the vocabulary [0, 201088)"))
    assert status.code == grpc.StatusCode.INVALID_ARGUMENT
    assert status.message == "prompt_token_ids[3]: 250000 is outside the vocabulary [0, 201088)"
    assert status.field == "prompt_token_ids[3]"
    assert status_for(FieldError("messages", "must contain at least one message")).field == "messages"
    harmony = status_for(HarmonyInputError("messages[2].channel", "must be one of analysis, commentary, final"))
    assert (harmony.code, harmony.field) == (grpc.StatusCode.INVALID_ARGUMENT, "messages[2].channel")
    assert harmony.message.startswith("messages[2].channel: ")


def test_invalid_input_raised_in_a_replica_keeps_its_field():
    cause = InvalidRequestError("sampling.max_tokens", "must be >= 1, got 0")
    wrapped = ray_exceptions.RayTaskError("generate", "Traceback (most recent call last): ...", cause)
    for err in (wrapped, wrapped.as_instanceof_cause()):
        status = status_for(err)
        assert (status.code, status.field) == (grpc.StatusCode.INVALID_ARGUMENT, "sampling.max_tokens")
        assert "Traceback" not in status.message


@pytest.mark.parametrize("err, code", [
    (EngineOverloadedError(32, 32), grpc.StatusCode.RESOURCE_EXHAUSTED),
    (BackPressureError(num_queued_requests=64, max_queued_requests=64), grpc.StatusCode.RESOURCE_EXHAUSTED),
    (ray_exceptions.RayActorError(), grpc.StatusCode.UNAVAILABLE),
    (ray_exceptions.ActorUnavailableError("gone", None), grpc.StatusCode.UNAVAILABLE),
    (TimeoutError(), grpc.StatusCode.DEADLINE_EXCEEDED),
    (DeadlineExceededError("r1", 0.25), grpc.StatusCode.DEADLINE_EXCEEDED),
    (ray_exceptions.RayTaskError("generate", "Traceback ...", DeadlineExceededError("r1", 0.25)),
     grpc.StatusCode.DEADLINE_EXCEEDED),
    (ray_exceptions.TaskCancelledError(), grpc.StatusCode.CANCELLED),
])
def test_overload_failure_deadline_and_cancel_codes(err, code):
    assert status_for(err).code == code


def test_unexpected_errors_are_internal_without_details():
    secret = RuntimeError("/home/me/secret.py line 3: KeyError 'password'")
    wrapped = ray_exceptions.RayTaskError("generate", "Traceback (most recent call last): ...", secret)
    for err in (secret, wrapped):
        status = status_for(err, request_id="abc")
        assert status.code == grpc.StatusCode.INTERNAL
        assert status.message == "internal error (request abc); see server logs"


def test_status_carries_a_bad_request_detail():
    from google.rpc import error_details_pb2

    grpc_status = status_for(InvalidRequestError("messages[0].role", "bad")).to_status()
    assert grpc_status.code == grpc.StatusCode.INVALID_ARGUMENT
    assert grpc_status.details == "messages[0].role: bad"
    key, value = grpc_status.trailing_metadata[0]
    assert key == "grpc-status-details-bin"
    from google.rpc import status_pb2

    detail = status_pb2.Status.FromString(value).details[0]
    bad = error_details_pb2.BadRequest()
    assert detail.Unpack(bad) and bad.field_violations[0].field == "messages[0].role"


def test_overload_from_a_replica_carries_the_engines_retry_estimate():
    import pickle

    from google.rpc import error_details_pb2

    cause = pickle.loads(pickle.dumps(EngineOverloadedError(12, 12, retry_after_s=2.5)))
    assert (cause.queued, cause.limit, cause.retry_after_s) == (12, 12, 2.5)
    wrapped = ray_exceptions.RayTaskError("generate", "Traceback ...", cause)
    for err in (cause, wrapped, wrapped.as_instanceof_cause()):
        status = status_for(err)
        assert (status.code, status.reason, status.retry_after_s) == (
            grpc.StatusCode.RESOURCE_EXHAUSTED, "MODEL_OVERLOADED", 2.5)
    retry = next(d for d in status.details() if isinstance(d, error_details_pb2.RetryInfo))
    assert (retry.retry_delay.seconds, retry.retry_delay.nanos) == (2, 500_000_000)


def test_a_dead_engine_is_unavailable_and_a_too_long_request_names_max_tokens():
    import pickle

    from cluster.engine.errors import EngineDead, RequestTooLong

    dead = pickle.loads(pickle.dumps(EngineDead("step loop failed: RuntimeError('boom')")))
    wrapped = ray_exceptions.RayTaskError("generate", "Traceback ...", dead)
    for err in (dead, wrapped.as_instanceof_cause()):
        assert (status_for(err).code, status_for(err).reason) == (grpc.StatusCode.UNAVAILABLE, "NO_REPLICA")
    too_long = pickle.loads(pickle.dumps(RequestTooLong(5000, 4096)))
    status = status_for(too_long)
    assert (status.code, status.field) == (grpc.StatusCode.INVALID_ARGUMENT, "sampling.max_tokens")
    assert "5000 tokens" in status.message


@pytest.mark.parametrize("err, grpc_code, http_status, kind, code, retry_after", [
    (FieldError("messages[1].role", "must be one of system, user"), grpc.StatusCode.INVALID_ARGUMENT, 400,
     "invalid_request_error", "invalid_value", None),
    (AuthenticationError("API_KEY_MISSING", "missing API key"), grpc.StatusCode.UNAUTHENTICATED, 401,
     "authentication_error", "api_key_missing", None),
    (PermissionDeniedError("ADMIN_REQUIRED", "admin only"), grpc.StatusCode.PERMISSION_DENIED, 403,
     "permission_error", "admin_required", None),
    (NotFoundError("RESPONSE_NOT_FOUND", "response_id", "no stored response 'resp_1'"), grpc.StatusCode.NOT_FOUND,
     404, "not_found_error", "response_not_found", None),
    (RateLimitedError("acme", "requests", 2.2), grpc.StatusCode.RESOURCE_EXHAUSTED, 429, "rate_limit_error",
     "tenant_rate_limited", "3"),
    (EngineOverloadedError(4, 4, retry_after_s=0.2), grpc.StatusCode.RESOURCE_EXHAUSTED, 429, "rate_limit_error",
     "model_overloaded", "1"),
    (DrainingError(), grpc.StatusCode.UNAVAILABLE, 503, "service_unavailable_error", "draining", "1"),
    (StoreUnavailableError("redis down"), grpc.StatusCode.UNAVAILABLE, 503, "service_unavailable_error",
     "store_unavailable", "1"),
    (DeadlineExceededError("r1", 0.5), grpc.StatusCode.DEADLINE_EXCEEDED, 504, "timeout_error", None, None),
    (RuntimeError("secret internals"), grpc.StatusCode.INTERNAL, 500, "server_error", "internal_error", None),
])
def test_one_internal_error_maps_to_both_a_grpc_status_and_an_openai_error(err, grpc_code, http_status, kind, code,
                                                                           retry_after):
    status = status_for(err, request_id="r1")
    assert status.code == grpc_code
    answer = http_error(status)
    assert answer.status == http_status
    error = answer.body["error"]
    assert (error["type"], error["code"]) == (kind, code)
    assert error["message"] == status.message and "secret" not in error["message"]
    assert answer.headers.get("retry-after") == retry_after
    assert error["param"] == {400: "messages[1].role", 404: "response_id"}.get(http_status)
