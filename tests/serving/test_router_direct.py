"""GptossRouter.choose_direct on its own (no Ray cluster: the replicas are stand-ins carrying what
Serve's RunningReplica carries): it routes by the same policy and in-flight accounting as
choose_replicas, and declines when the chosen replica cannot take a direct stream."""

from __future__ import annotations

import asyncio
import functools
from dataclasses import dataclass, field

import pytest
from ray.serve._private.common import DeploymentHandleSource, DeploymentID, ReplicaID

from cluster.engine.request import GenerateRequest
from cluster.serving.direct_stream import METADATA_KEY
from cluster.serving.router import ROUTERS


@dataclass
class StandInReplica:
    replica_id: ReplicaID
    replica_metadata: dict = field(default_factory=dict)
    routing_stats: dict = field(default_factory=dict)
    max_ongoing_requests: int = 2

    async def get_queue_len(self, *, deadline_s: float) -> int:  # Serve probes new replicas
        return 0


def replica(name: str, direct: bool = True, **kwargs) -> StandInReplica:
    metadata = {METADATA_KEY: {"address": f"10.0.0.{len(name)}:{1000 + ord(name[-1])}", "token": "t-" + name}} \
        if direct else {}
    return StandInReplica(ReplicaID(name, DeploymentID("ModelReplica", "app")), metadata, **kwargs)


def router(policy: str, replicas: list[StandInReplica]):
    r = ROUTERS[policy](deployment_id=DeploymentID("ModelReplica", "app"), handle_source=DeploymentHandleSource.UNKNOWN)
    r.initialize_state()
    r.update_replicas(replicas)
    return r


REQUEST = GenerateRequest(prompt_token_ids=(1, 2, 3))


def on_a_loop(test):
    """Routers live on the caller's event loop (Serve's RequestRouter asks for the running loop)."""

    @functools.wraps(test)
    def run(*args, **kwargs):
        async def body():
            test(*args, **kwargs)
        asyncio.run(body())
    return run


@on_a_loop
def test_least_loaded_routes_direct_counts_in_flight_and_releases():
    a, b = replica("a"), replica("b")
    r = router("least_loaded", [a, b])
    first = r.choose_direct(REQUEST, lambda target: True)
    second = r.choose_direct(REQUEST, lambda target: True)
    assert {first.replica, second.replica} == {"a", "b"}  # the first one counts as load
    assert first.target.token == "t-" + first.replica
    assert r._load(a) == 1 and r._load(b) == 1
    first.release()
    assert r._load(a) + r._load(b) == 1
    second.release()
    assert r._load(a) == r._load(b) == 0


@on_a_loop
def test_declines_a_replica_at_its_max_ongoing_requests_then_takes_it_again():
    only = replica("a", max_ongoing_requests=2)
    r = router("round_robin", [only])
    routes = [r.choose_direct(REQUEST, lambda target: True) for _ in range(2)]
    assert all(routes) and r.choose_direct(REQUEST, lambda target: True) is None
    routes[0].release()
    assert r.choose_direct(REQUEST, lambda target: True) is not None


@pytest.mark.parametrize("case", ["no address published", "channel not connected", "no replicas"])
@on_a_loop
def test_declines_when_the_replica_takes_no_direct_stream(case):
    replicas = [] if case == "no replicas" else [replica("a", direct=case != "no address published")]
    r = router("least_loaded", replicas)
    asked: list[str] = []

    def ready(target) -> bool:
        asked.append(target.address)
        return case != "channel not connected"

    assert r.choose_direct(REQUEST, ready) is None
    assert r._in_flight.get("a", 0) == 0  # nothing was counted
    assert asked == (["10.0.0.1:1097"] if case == "channel not connected" else [])


@on_a_loop
def test_session_routes_a_session_to_the_same_replica_and_the_set_version_follows_changes():
    replicas = [replica(name) for name in "abc"]
    r = router("session", replicas)
    request = GenerateRequest(prompt_token_ids=(1,), session_id="s-1")
    chosen = set()
    for _ in range(5):
        route = r.choose_direct(request, lambda target: True)
        chosen.add(route.replica)
        route.release()
    assert len(chosen) == 1
    version = r.replica_set_version
    r.update_replicas(replicas[:2])
    assert r.replica_set_version > version
    assert r.direct_addresses() == {rep.replica_metadata[METADATA_KEY]["address"] for rep in replicas[:2]}
