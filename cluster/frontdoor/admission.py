"""Admission: what every gptoss.v1 call goes through before its RPC runs, and the drain state.

In order: read the call's metadata and send x-request-id back (before any answer; a streaming
RPC sends it once its downstream call is on its way, see Admission.check); refuse while draining
(UNAVAILABLE); authenticate (UNAUTHENTICATED); refuse an undecodable message (INVALID_ARGUMENT);
check admin rights (PERMISSION_DENIED); take from the tenant's request budget and, for a
streaming call, one of its concurrent streams (RESOURCE_EXHAUSTED). Each refusal is an exception that errors.status_for maps. Admission also
counts calls in flight so a drain knows when they have finished.
"""

from __future__ import annotations

import asyncio

import grpc

from cluster.frontdoor.auth import ApiKeys, ReloadingApiKeys
from cluster.frontdoor.call import CallInfo, peer_is_local, read_call
from cluster.frontdoor.errors import DrainingError, MalformedMessageError, PermissionDeniedError
from cluster.frontdoor.limits import TenantLimits


class MalformedRequest:
    """Stands in for a request whose bytes did not parse, so the RPC can answer with a status."""

    def __init__(self, type_name: str) -> None:
        self.type_name = type_name


def safe_deserializer(message_class):
    def deserialize(data: bytes):
        try:
            return message_class.FromString(data)
        except Exception:  # noqa: BLE001 - protobuf raises DecodeError and, on some inputs, others
            return MalformedRequest(message_class.DESCRIPTOR.full_name)
    return deserialize


NO_ADMIN_KEYS = ("gptoss.v1.Admin needs an admin API key and this front door has no API keys: configure "
                 "frontdoor.auth.api_keys_file (or $GPTOSS_API_KEYS) with a tenant listed in "
                 "frontdoor.auth.admin_tenants, or set frontdoor.auth.loopback_admin=true to allow it from this host")
NOT_ADMIN = "this API key may not call gptoss.v1.Admin (its tenant is not in frontdoor.auth.admin_tenants)"


class Admission:
    def __init__(self, api_keys: ApiKeys | ReloadingApiKeys | None, limits: TenantLimits, *, loopback_admin: bool = False) -> None:
        self.api_keys = api_keys  # None: auth is off
        self.limits = limits
        self.loopback_admin = loopback_admin  # Admin from this host without a key
        self.draining = False
        self.in_flight = 0

    def open(self, method: str, context: grpc.aio.ServicerContext) -> tuple[CallInfo, Exception | None]:
        """Start a call: it counts as in flight until leave(). Returns its identity and the
        metadata problem admit() will report."""
        self.in_flight += 1
        call, problem = read_call(method, context.invocation_metadata())
        call.peer = context.peer() or ""
        return call, problem

    async def admit(self, call: CallInfo, problem: Exception | None, request, context: grpc.aio.ServicerContext,
                    *, admin: bool = False) -> None:
        """Send x-request-id back, then admit the call or raise the reason it is refused."""
        await call.announce(context)
        self.check(call, problem, request, admin=admin)

    def check(self, call: CallInfo, problem: Exception | None, request, *, admin: bool = False,
              streaming: bool = False) -> None:
        """Admit the call or raise the reason it is refused, sending nothing yet: a streaming RPC
        starts its downstream call first and announces while that is on its way (the failure path
        announces before it answers, so a refusal still carries x-request-id)."""
        if self.draining and not admin:
            raise DrainingError()
        if self.api_keys is not None:
            tenant = self.api_keys.authenticate(call.metadata)
            call.tenant, call.admin = tenant.name, tenant.admin
        if admin and self.loopback_admin and peer_is_local(call.peer):
            call.admin = True
        if problem is not None:
            raise problem
        if isinstance(request, MalformedRequest):
            raise MalformedMessageError(request.type_name)
        if admin and not call.admin:
            raise PermissionDeniedError("ADMIN_REQUIRED", NOT_ADMIN if self.api_keys is not None else NO_ADMIN_KEYS)
        if not admin:
            self.limits.admit(call.tenant)
        if streaming:
            self.limits.open_stream(call.tenant)
            call.holds_stream = True

    def leave(self, call: CallInfo | None = None) -> None:
        self.in_flight -= 1
        if call is not None and call.holds_stream:
            call.holds_stream = False
            self.limits.close_stream(call.tenant)

    async def wait_idle(self, timeout_s: float, *, besides: int = 0) -> int:
        """Wait until at most `besides` calls are in flight or timeout_s passes; returns how many remain."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout_s
        while self.in_flight > besides and loop.time() < end:
            await asyncio.sleep(min(0.02, max(0.0, end - loop.time())))
        return max(0, self.in_flight - besides)
