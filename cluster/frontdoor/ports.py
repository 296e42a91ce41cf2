"""The ports a front door listens on, checked before anything starts: a port another process holds
fails the start at once, naming the port and the setting that chose it.

The gRPC server also listens without SO_REUSEPORT (grpcio turns it on by default on Linux), so a
second server on the same port is refused instead of silently taking a share of the connections.
"""

from __future__ import annotations

import errno
import socket

# grpc server option: no SO_REUSEPORT, so a port in use is an error (see the module docstring).
NO_REUSEPORT = ("grpc.so_reuseport", 0)


class PortUnavailable(OSError):
    """`setting` (a config path such as frontdoor.grpc_port) names a port we cannot listen on."""

    def __init__(self, setting: str, host: str, port: int, reason: str) -> None:
        self.setting, self.host, self.port = setting, host, port
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        super().__init__(f"cannot listen on {where} ({setting}): {reason}")


def check_free(host: str, port: int, setting: str) -> None:
    """Raise PortUnavailable when a listener already holds `port` on `host` (port 0 picks a free one).

    Binds like a server does (SO_REUSEADDR, so a port left in TIME_WAIT counts as free) and closes
    again. Errors other than "in use" or "permission denied" (e.g. no IPv6 on this host) are left
    for the server's own bind to report."""
    if port <= 0:
        return
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as err:
        raise PortUnavailable(setting, host, port, f"unknown host ({err.strerror})") from None
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as err:
                if err.errno == errno.EADDRINUSE:
                    raise PortUnavailable(setting, host, port, "address already in use") from None
                if err.errno == errno.EACCES:
                    raise PortUnavailable(setting, host, port, "permission denied") from None
