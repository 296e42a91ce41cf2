"""Per-call metadata conventions: x-request-id, x-session-id, and a logger that tags every line.

x-request-id is taken from the client when present and generated when absent; a malformed one
is refused (INVALID_ARGUMENT naming the metadata key) rather than silently replaced. Either way
the id goes back in the initial metadata before anything else is sent.
"""

from __future__ import annotations

import logging
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from cluster.frontdoor.errors import FieldError

REQUEST_ID = "x-request-id"
SESSION_ID = "x-session-id"
_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


class CallLog(logging.LoggerAdapter):
    """Prefixes every message with request_id=<id> (and tenant when known)."""

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        call: CallInfo = self.extra["call"]  # type: ignore[index]
        tenant = f" tenant={call.tenant}" if call.tenant else ""
        kwargs.setdefault("extra", {})["request_id"] = call.request_id
        return f"request_id={call.request_id}{tenant} method={call.method} {msg}", kwargs


@dataclass
class CallInfo:
    method: str
    request_id: str
    session_id: str = ""
    tenant: str = ""  # "" when auth is off
    admin: bool = False
    peer: str = ""  # grpc's context.peer(): "ipv4:127.0.0.1:5555", "ipv6:[::1]:5555", "unix:..."
    holds_stream: bool = False  # counts against the tenant's concurrent streams until Admission.leave
    announced: bool = False  # x-request-id sent in the initial metadata (announce)
    metadata: dict[str, str] = field(default_factory=dict, repr=False)  # never logged: holds the API key

    def logger(self, base: logging.Logger) -> CallLog:
        return CallLog(base, {"call": self})

    async def announce(self, context) -> None:
        """Send x-request-id in the call's initial metadata, once (before any answer; a
        streaming RPC sends it once its downstream call is on its way)."""
        if not self.announced:
            self.announced = True
            await context.send_initial_metadata(((REQUEST_ID, self.request_id),))


def peer_is_local(peer: str) -> bool:
    """Whether a grpc peer string names this host: a loopback address or a unix socket."""
    import ipaddress

    kind, _, rest = peer.partition(":")
    if kind in ("unix", "unix-abstract"):
        return True
    if kind not in ("ipv4", "ipv6"):
        return False
    host = rest.rsplit(":", 1)[0].strip("[]")
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def new_request_id() -> str:
    return uuid.uuid4().hex


def read_call(method: str, metadata) -> tuple[CallInfo, FieldError | None]:
    """The call's identity from its invocation metadata, and the metadata problem to report, if any.

    The problem is returned rather than raised so the caller can first send the request id back.
    """
    values: dict[str, str] = {}
    for key, value in metadata or ():
        if isinstance(value, str):
            values.setdefault(key.lower(), value)
    problem = None
    request_id = values.get(REQUEST_ID, "")
    if request_id and not _ID.fullmatch(request_id):
        problem = FieldError(REQUEST_ID, "must be 1-128 characters of [A-Za-z0-9._:-]")
        request_id = ""
    session_id = values.get(SESSION_ID, "")
    if session_id and not _ID.fullmatch(session_id):
        problem = problem or FieldError(SESSION_ID, "must be 1-128 characters of [A-Za-z0-9._:-]")
        session_id = ""
    return CallInfo(method, request_id or new_request_id(), session_id, metadata=values), problem
