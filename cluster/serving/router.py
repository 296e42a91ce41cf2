"""The Serve request routers of gptoss-cluster: one RequestRouter subclass per policy, each a thin
adapter around the Ray-free policy classes of routing_policy.py (which the simulator drives too).

A router runs inside the caller of the deployment handle — the front door — so its metrics
(cluster.metrics.router_metrics) register in the front door's process and show on its /metrics.
It sees each request's GenerateRequest (PendingRequest.args[0], resolved before routing): its
prompt token ids become chained block hashes, its session_id (gRPC x-session-id) the session key.
Only `generate` calls are routed by the policy (and counted in the router metrics); the control
calls on the same handle (load_report, stats, model_info) take the replicas in turn, so the front
door's load probes reach every replica and do not disturb the policy's state.

Serve (2.60) asks choose_replicas for ranked candidates and hands the replica it picks to the
pending request whose internal id matched (no FIFOMixin: with it, a replica chosen for one
request's prefix could be handed to whichever request queued first). It calls on_request_routed
once a replica accepted a request and on_request_completed when it ends (or was rejected).

The front door also asks its router directly (choose_direct) for the requests it streams
straight from a replica (direct_stream.py, replica_streams.py): the same policy, load and
in-flight accounting, with the replica's direct-stream address taken from its replica metadata.

A replica's load comes from two sources: the engine statistics the replica reports through
record_routing_stats every serving.router.stats_period_s (waiting, running, KV use — seen by every
front door) and the requests this router has in flight on it (fresh, but only its own); the
larger of the two sequence counts is used, plus kv_weight x KV use.

Configure with RequestRouterConfig(request_router_class=ROUTERS[policy], request_router_kwargs=
{load_bound_ratio, load_bound_slack, kv_weight, block_size, prefix_blocks_per_replica}); builder.py
does this from serving.router.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any, Callable, Optional

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from cluster.metrics import router_metrics
from cluster.serving.direct_stream import DirectAddress
from cluster.serving.prefix_index import block_hashes
from cluster.serving.routing_policy import RouteDecision, RouteRequest, RoutingPolicy, make_policy, replica_load
from cluster.serving.serve_internals import router_deployment

log = logging.getLogger(__name__)

GENERATE_METHOD = "generate"  # the ModelReplica method the policy routes


@dataclass(frozen=True)
class DirectRoute:
    """A request routed for a direct stream: where to open it, and `release()` once it ends."""
    replica: str  # Serve's unique replica id
    target: DirectAddress
    release: Callable[[], None]


class GptossRouter(RequestRouter):
    policy_name = ""

    def initialize_state(self, load_bound_ratio: float = 0.5, load_bound_slack: float = 4.0,
                         kv_weight: float = 4.0, block_size: int = 16,
                         prefix_blocks_per_replica: int = 65536, **_: Any) -> None:
        self.policy: RoutingPolicy = make_policy(
            self.policy_name, load_bound_ratio=load_bound_ratio, load_bound_slack=load_bound_slack,
            prefix_blocks_per_replica=prefix_blocks_per_replica)
        self.kv_weight = kv_weight
        self.block_size = block_size
        self.metrics = router_metrics()
        self._in_flight: dict[str, int] = {}  # replica unique id -> requests this router has on it
        self._request_replica: dict[str, str] = {}  # internal request id -> replica unique id
        self._labels = router_deployment(self)  # application, deployment
        self._control_next = 0  # rotation of the control calls over the replicas
        self._direct_count = 0  # direct streams routed (their in-flight keys)
        self.replica_set_version = 0  # bumped whenever the replicas change

    # -- load -----------------------------------------------------------------------------------
    def _load(self, replica: RunningReplica) -> float:
        stats = replica.routing_stats or {}
        engine_seqs = float(stats.get("waiting", 0)) + float(stats.get("running", 0))
        seqs = max(engine_seqs, float(self._in_flight.get(replica.replica_id.unique_id, 0)))
        return replica_load(0.0, seqs, float(stats.get("kv_use", 0.0)), self.kv_weight)

    def requests_held(self) -> tuple[int, int]:
        """(requests the routable replicas hold, of those the ones this router placed): per replica
        the larger of its last engine report (waiting + running, every caller's requests, at most
        serving.router.stats_period_s old) and this router's own count (fresh, only its own)."""
        held = own = 0
        for replica in self.curr_replicas.values():
            stats = replica.routing_stats or {}
            mine = self._in_flight.get(replica.replica_id.unique_id, 0)
            held += max(int(float(stats.get("waiting", 0)) + float(stats.get("running", 0))), mine)
            own += mine
        return held, own

    def _route_request(self, pending_request: Optional[PendingRequest]) -> RouteRequest:
        if pending_request is None or not pending_request.args:
            return RouteRequest()
        return self._route_request_for(pending_request.args[0])

    def _route_request_for(self, request: Any) -> RouteRequest:
        prompt = getattr(request, "prompt_token_ids", None) or ()
        hashes = block_hashes(prompt, self.block_size) if self.policy_name == "prefix_affinity" else ()
        return RouteRequest(block_hashes=hashes, session_id=getattr(request, "session_id", "") or "")

    def _decide(self, candidates: list[RunningReplica], request: RouteRequest
                ) -> tuple[dict[str, RunningReplica], dict[str, float], RouteDecision]:
        by_id = {r.replica_id.unique_id: r for r in candidates}
        loads = {rid: self._load(r) for rid, r in by_id.items()}
        for rid, load in loads.items():
            self.metrics.replica_load.labels(*self._labels, rid).set(load)
        return by_id, loads, self.policy.choose(request, list(by_id), loads)

    def _count_decision(self, request: RouteRequest, decision: RouteDecision) -> None:
        self.metrics.decisions_total.labels(*self._labels, self.policy_name, decision.outcome).inc()
        if request.block_hashes:
            self.metrics.prefix_matched_blocks.labels(*self._labels).observe(decision.matched_blocks)

    # -- RequestRouter hooks ----------------------------------------------------------------------
    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: Optional[PendingRequest] = None) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        if pending_request is None or pending_request.metadata.call_method != GENERATE_METHOD:
            # A control call: the next replica in turn, then the rest in order.
            ordered = sorted(candidate_replicas, key=lambda r: r.replica_id.unique_id)
            start = self._control_next % len(ordered)
            self._control_next += 1
            return [[ordered[start]], ordered[start + 1:] + ordered[:start]] if len(ordered) > 1 else [ordered]
        request = self._route_request(pending_request)
        by_id, loads, decision = self._decide(candidate_replicas, request)
        if self._commit(pending_request.metadata.internal_request_id, request, decision.replica):
            self._count_decision(request, decision)  # Serve asks again when its first answer was full
        # Second rank, if the chosen replica refuses (full): the two least loaded others.
        others = sorted((r for r in by_id if r != decision.replica), key=loads.__getitem__)[:2]
        chosen = by_id[decision.replica]
        return [[chosen], [by_id[r] for r in others]] if others else [[chosen]]

    # -- the front door's direct streams (direct_stream.py) -------------------------------------
    def choose_direct(self, request: Any, ready: Callable[[DirectAddress], bool]) -> Optional[DirectRoute]:
        """Route a generate request to be streamed straight from the replica, as choose_replicas
        would route it; None when the chosen replica cannot take it that way (it publishes no
        direct address, this router already has its max_ongoing_requests on it, or the channel to
        it is not connected yet): then the request goes through the Serve handle instead."""
        replicas = list(self.curr_replicas.values())
        if not replicas:
            return None
        route_request = self._route_request_for(request)
        by_id, _, decision = self._decide(replicas, route_request)
        replica = by_id[decision.replica]
        target = DirectAddress.from_metadata(replica.replica_metadata)
        if (target is None or self._in_flight.get(decision.replica, 0) >= replica.max_ongoing_requests
                or not ready(target)):
            return None
        self._direct_count += 1
        key = f"direct-{self._direct_count}"
        self._commit(key, route_request, decision.replica)
        self._count_decision(route_request, decision)
        return DirectRoute(decision.replica, target, functools.partial(self.on_request_completed, None, key))

    def direct_targets(self) -> set[DirectAddress]:
        """Where the replicas routable now take direct streams."""
        targets = (DirectAddress.from_metadata(r.replica_metadata) for r in self.curr_replicas.values())
        return {t for t in targets if t is not None}

    def replica_metadata(self) -> dict[str, dict]:
        """Each routable replica's metadata by its direct-stream address."""
        found = {}
        for replica in self.curr_replicas.values():
            target = DirectAddress.from_metadata(replica.replica_metadata)
            if target is not None:
                found[target.address] = replica.replica_metadata
        return found

    def direct_addresses(self) -> set[str]:
        """The direct-stream addresses of the replicas routable now."""
        return {t.address for t in self.direct_targets()}

    def _commit(self, request_id: str, request: RouteRequest, replica: str) -> bool:
        """Count `request_id` in flight on `replica`; True the first time this request is routed."""
        previous = self._request_replica.get(request_id)
        if previous == replica:
            return False
        if previous is not None:  # a retry of this request chose again
            self._in_flight[previous] = max(0, self._in_flight.get(previous, 0) - 1)
        self._request_replica[request_id] = replica
        self._in_flight[replica] = self._in_flight.get(replica, 0) + 1
        self.policy.on_routed(request, replica)
        return previous is None

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        # Serve may have taken the second rank: move the in-flight count to where it went.
        request_id = pending_request.metadata.internal_request_id
        if self._request_replica.get(request_id) not in (None, replica_id.unique_id):
            self._commit(request_id, self._route_request(pending_request), replica_id.unique_id)

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        replica = self._request_replica.pop(internal_request_id, None)
        if replica is not None:
            self._in_flight[replica] = max(0, self._in_flight.get(replica, 0) - 1)

    def update_replicas(self, replicas: list[RunningReplica]):
        result = super().update_replicas(replicas)
        ids = [r.replica_id.unique_id for r in replicas]
        self.policy.update_replicas(ids)
        for rid in [r for r in self._in_flight if r not in set(ids)]:
            del self._in_flight[rid]
            try:
                self.metrics.replica_load.remove(*self._labels, rid)
            except KeyError:
                pass
        self.metrics.replicas.labels(*self._labels).set(len(ids))
        self.replica_set_version += 1
        return result


class RoundRobinRouter(GptossRouter):
    policy_name = "round_robin"


class LeastLoadedRouter(GptossRouter):
    policy_name = "least_loaded"


class PrefixAffinityRouter(GptossRouter):
    policy_name = "prefix_affinity"


class SessionRouter(GptossRouter):
    policy_name = "session"


ROUTERS = {cls.policy_name: cls for cls in (RoundRobinRouter, LeastLoadedRouter, PrefixAffinityRouter, SessionRouter)}


def router_kwargs(router_config) -> dict[str, Any]:
    """request_router_kwargs for serving.router (a cluster.config.RouterConfig)."""
    return {"load_bound_ratio": router_config.load_bound_ratio, "load_bound_slack": router_config.load_bound_slack,
            "kv_weight": router_config.kv_weight, "block_size": router_config.block_size,
            "prefix_blocks_per_replica": router_config.prefix_blocks_per_replica}
