"""A free TCP port, for the servers and process groups this package starts (and its tests).

The port is drawn at random between Ray's worker ports and the kernel's ephemeral range, not
taken from a bind to port 0. The kernel hands ephemeral ports to every outgoing connection and
to every listener that binds port 0 (Ray's daemons do, many times), so a port picked there can be
taken between the pick and the caller's bind: CI saw `gptoss-cluster serve` fail to listen on the
gRPC port its test had picked, taken by the Ray instance that serve had just started.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

RAY_WORKER_PORTS_END = 19999  # Ray's default max_worker_port: its workers listen in 10002..19999
LINUX_EPHEMERAL_START = 32768
TRIES = 64

_draw = random.SystemRandom()  # not the `random` module's state, which tests and libraries seed
_handed_out: set[int] = set()  # never the same port twice from one process, bound yet or not


def ephemeral_start() -> int:
    """The first port of the kernel's ephemeral range (Linux's default where it cannot be read)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return LINUX_EPHEMERAL_START


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on at `host` right now ("" : every interface), outside the ranges
    that Ray and the kernel hand out by themselves. Another program may still bind it before the
    caller does; callers that can, bind port 0 themselves instead."""
    low, high = RAY_WORKER_PORTS_END + 1, ephemeral_start() - 1
    if high - low >= TRIES:
        for port in _draw.sample(range(low, high + 1), TRIES):
            if port not in _handed_out and bindable(host, port):
                _handed_out.add(port)
                return port
    port = kernel_port(host)  # a range this narrow (or this full) is a box set up unusually
    _handed_out.add(port)
    return port


def bindable(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def kernel_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
