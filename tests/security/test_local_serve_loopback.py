"""`gptoss-cluster serve` on one machine: the Ray it starts listens on the loopback interface only
(every listening socket of serve and of every process it started), and it says so at start. The
one exception is Ray Serve's own inter-deployment gRPC server in each replica, which Serve binds to
every interface (hard-coded): it must refuse a caller without Ray's token."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

import pytest

from tests.serving.test_serve_cli import (descendants, free_port, process_table, start_serve,
                                         stop_serve_and_check_nothing_left)

pytestmark = pytest.mark.slow


def _address(hex_address: str) -> tuple[str, int]:
    host, port = hex_address.split(":")
    raw = bytes.fromhex(host)
    # /proc/net/tcp{,6} print the address as 32-bit words in host (little-endian) order
    raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    return str(ipaddress.ip_address(raw)), int(port, 16)


def _assert_refused_without_ray_token(port: int) -> None:
    import grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary("/ray.serve.ASGIService/HandleRequest")
        with pytest.raises(grpc.RpcError) as refused:
            call(b"", timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED, refused.value


def _loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    return (getattr(address, "ipv4_mapped", None) or address).is_loopback


def listening_sockets(pids: set[int]) -> list[tuple[int, str, int]]:
    """(pid, ip, port) of every listening TCP socket the processes hold, from /proc."""
    inodes: dict[str, int] = {}
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes[target[8:-1]] = pid
        except OSError:
            continue
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                found.append((inodes[fields[9]], *_address(fields[1])))
    return found


def test_serve_s_ray_listens_on_loopback_only_and_says_so(tmp_path, short_tmp):
    grpc_port, metrics_port = free_port(), free_port()
    env = dict(os.environ, GPTOSS_CACHE_DIR=str(tmp_path / "cache"), GPTOSS_RAY_TEMP_DIR=str(short_tmp),
               GPTOSS_RAY_NUM_CPUS="2", GPTOSS_ENGINE_KIND="echo")
    serve, _ = start_serve(env, grpc_port, metrics_port)
    try:
        notice = serve.stdout.readline()
        assert notice.startswith("gptoss-cluster: Ray: a local instance on 127.0.0.1 only"), notice
        assert "token auth on" in notice
        processes = descendants(serve.pid) | {serve.pid}
        listening = listening_sockets(processes)
        ray_ports = [s for s in listening if s[2] not in (grpc_port, metrics_port)]
        assert len(ray_ports) >= 3, listening  # GCS, raylet, object manager, workers...
        table = process_table()
        serve_grpc = [s for s in listening if not _loopback(s[1]) and "ray::ServeReplica" in table[s[0]][1]]
        for _, _, port in serve_grpc:
            _assert_refused_without_ray_token(port)
        exposed = [s for s in listening if not _loopback(s[1]) and s not in serve_grpc]
        assert not exposed, "listening beyond loopback: " + "; ".join(
            f"{ip}:{port} {table.get(pid, (0, '?'))[1][:80]}" for pid, ip, port in exposed)
    finally:
        stop_serve_and_check_nothing_left(serve, short_tmp)
