"""gptoss.v1.Admin is for admin credentials only: with no API keys configured it is refused
(naming how to enable it) unless the operator allows it from this host; a tenant key without the
admin role is refused too."""

from __future__ import annotations

import grpc
import pytest
from prometheus_client import CollectorRegistry

from cluster.config import load_config
from cluster.frontdoor.auth import ApiKeys
from cluster.frontdoor.call import peer_is_local
from cluster.metrics import FrontdoorMetrics
from gptoss.v1 import admin_pb2, admin_pb2_grpc
from tests.conftest import BackgroundFrontdoor
from tests.frontdoor.status_details import details


@pytest.mark.parametrize("peer,local", [
    ("ipv4:127.0.0.1:40000", True), ("ipv6:[::1]:40000", True), ("unix:/tmp/x.sock", True),
    ("ipv4:10.1.2.3:40000", False), ("ipv6:[fd00::1]:40000", False), ("", False), ("ipv4:garbage", False),
])
def test_peer_is_local(peer, local):
    assert peer_is_local(peer) is local


def _door(ray_serving, **overrides):
    config = load_config(env={}, overrides={"frontdoor.grpc_port": 0, "frontdoor.metrics_port": -1, **overrides})
    return BackgroundFrontdoor(ray_serving.handle, config.frontdoor, FrontdoorMetrics(CollectorRegistry()),
                               api_keys=ApiKeys([]))


def _drain(door):
    with grpc.insecure_channel(door.target) as channel:
        return admin_pb2_grpc.AdminStub(channel).Drain(admin_pb2.DrainRequest(timeout_s=0.1), timeout=10)


@pytest.mark.slow
def test_without_keys_admin_is_refused_even_from_loopback(ray_serving):
    door = _door(ray_serving)
    try:
        with pytest.raises(grpc.RpcError) as info:
            _drain(door)
        err = info.value
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED
        assert details(err)["ErrorInfo"].reason == "ADMIN_REQUIRED"
        assert "frontdoor.auth.admin_tenants" in err.details() and "loopback_admin" in err.details()
        assert not door.server.draining
    finally:
        door.close()


@pytest.mark.slow
def test_loopback_admin_opt_in_allows_admin_from_this_host(ray_serving):
    door = _door(ray_serving, **{"frontdoor.auth.loopback_admin": True})
    try:
        assert _drain(door).in_flight_at_end == 0
        assert door.server.draining
    finally:
        door.close()
