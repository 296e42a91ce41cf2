"""A free TCP port, for the servers and process groups this package starts (and its tests)."""

from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on at `host` right now ("" : every interface). Another process may
    take it before the caller binds it; callers that can, bind port 0 themselves instead."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
