"""The front door's ports: a port in use is refused (not shared through SO_REUSEPORT), named with the
setting that chose it, and a failed start leaves nothing listening."""

from __future__ import annotations

import asyncio
import socket

import grpc
import pytest
from prometheus_client import CollectorRegistry

from cluster.config import load_config
from cluster.frontdoor.ports import PortUnavailable, check_free
from cluster.frontdoor.server import FrontdoorServer
from cluster.metrics import FrontdoorMetrics
from cluster.sockets import free_port


def listener(*, reuseport: bool) -> socket.socket:
    """A TCP listener on a free loopback port, as grpcio makes them by default (SO_REUSEPORT) or not."""
    sock = socket.socket()
    if reuseport:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


@pytest.mark.parametrize("reuseport", [False, True])
def test_check_free_names_the_port_and_the_setting(reuseport):
    with listener(reuseport=reuseport) as held:
        port = held.getsockname()[1]
        with pytest.raises(PortUnavailable) as caught:
            check_free("127.0.0.1", port, "frontdoor.grpc_port")
    assert str(caught.value) == f"cannot listen on 127.0.0.1:{port} (frontdoor.grpc_port): address already in use"
    assert caught.value.setting == "frontdoor.grpc_port" and caught.value.port == port
    check_free("127.0.0.1", port, "frontdoor.grpc_port")  # free again once closed
    check_free("127.0.0.1", 0, "frontdoor.grpc_port")  # 0 picks a free port: nothing to check


@pytest.mark.slow
def test_a_second_server_cannot_share_the_front_doors_port(frontdoor):
    """grpcio listens with SO_REUSEPORT unless told not to: a second server (grpcio's defaults) on the
    front door's port would then start and take a share of its connections."""
    async def bind_second() -> int:
        second = grpc.aio.server()
        try:
            return second.add_insecure_port(frontdoor.target)
        except RuntimeError:
            return 0
        finally:
            await second.stop(None)

    assert asyncio.run(bind_second()) == 0


@pytest.mark.slow
def test_a_metrics_port_in_use_fails_the_start_and_releases_the_grpc_port(ray_serving):
    grpc_port = free_port()
    with listener(reuseport=False) as held:
        metrics_port = held.getsockname()[1]
        config = load_config(env={}, overrides={"frontdoor.grpc_port": grpc_port,
                                                "frontdoor.metrics_port": metrics_port})
        server = FrontdoorServer(ray_serving.handle, config.frontdoor, FrontdoorMetrics(CollectorRegistry()))

        async def start() -> None:
            await server.start()

        with pytest.raises(PortUnavailable) as caught:
            asyncio.run(start())
    assert caught.value.setting == "frontdoor.metrics_port" and caught.value.port == metrics_port
    check_free("127.0.0.1", grpc_port, "frontdoor.grpc_port")  # the gRPC server it had bound is gone
