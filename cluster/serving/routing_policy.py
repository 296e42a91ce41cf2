"""The routing policies themselves, free of Ray: the Serve request routers (router.py) and the
simulator (cluster/simulate/) both call these classes, so what the simulator measures is the code
that routes in production.

A policy sees the request's prompt as chained block hashes (prefix_index.block_hashes) and its
session id, and every replica's load — one number, `replica_load()`: waiting + running sequences
plus `kv_weight` x the KV-cache fraction in use. It answers a `RouteDecision`: the replica and
the outcome (for the router metrics). The load bound shared by prefix_affinity and session:
a preferred replica is taken only while

    load(preferred) <= (1 + load_bound_ratio) * min_load + load_bound_slack

otherwise the request falls back to least_loaded (power of two choices), so a hot prefix or a hot
session spreads over more replicas instead of piling onto one.
"""

from __future__ import annotations

import bisect
import hashlib
import random
from dataclasses import dataclass
from typing import Hashable, Mapping, Sequence

from cluster.serving.prefix_index import PrefixIndex

POLICIES = ("round_robin", "least_loaded", "prefix_affinity", "session")

# Outcomes of one decision, the `outcome` label of gptoss_router_decisions_total.
CHOSEN = "chosen"  # round_robin / least_loaded: no preference involved
AFFINITY_HIT = "affinity_hit"  # the preferred replica (cached prefix / session owner) was taken
FALLBACK = "fallback"  # a preferred replica existed but was over the load bound
NO_AFFINITY = "no_affinity"  # nothing to prefer (no cached prefix, no session id)


def replica_load(waiting: float, running: float, kv_use: float, kv_weight: float) -> float:
    """One replica's load: sequences queued or decoding, plus KV-cache pressure."""
    return waiting + running + kv_weight * kv_use


@dataclass(frozen=True)
class RouteRequest:
    block_hashes: tuple[int, ...] = ()
    session_id: str = ""


@dataclass(frozen=True)
class RouteDecision:
    replica: Hashable
    outcome: str
    matched_blocks: int = 0


@dataclass(frozen=True)
class LoadBound:
    ratio: float = 0.5
    slack: float = 4.0

    def allows(self, load: float, min_load: float) -> bool:
        return load <= (1.0 + self.ratio) * min_load + self.slack


class RoutingPolicy:
    """Base: `choose` picks a replica; `on_routed` learns from the choice; `update_replicas`
    follows the replica set."""

    name = ""

    def __init__(self, seed: int | None = None) -> None:
        self._rng = random.Random(seed)

    def choose(self, request: RouteRequest, replicas: Sequence[Hashable],
               loads: Mapping[Hashable, float]) -> RouteDecision:
        raise NotImplementedError

    def on_routed(self, request: RouteRequest, replica: Hashable) -> None:
        pass

    def update_replicas(self, replicas: Sequence[Hashable]) -> None:
        pass

    def power_of_two(self, replicas: Sequence[Hashable], loads: Mapping[Hashable, float]) -> Hashable:
        n = len(replicas)
        if n == 1:
            return replicas[0]
        i = self._rng.randrange(n)
        j = self._rng.randrange(n - 1)
        j += j >= i
        a, b = replicas[i], replicas[j]
        return a if loads.get(a, 0.0) <= loads.get(b, 0.0) else b


class RoundRobinPolicy(RoutingPolicy):
    name = "round_robin"

    def __init__(self, seed: int | None = None) -> None:
        super().__init__(seed)
        self._next = 0

    def choose(self, request, replicas, loads):
        replica = replicas[self._next % len(replicas)]
        self._next += 1
        return RouteDecision(replica, CHOSEN)


class LeastLoadedPolicy(RoutingPolicy):
    """Power of two choices on replica_load()."""

    name = "least_loaded"

    def choose(self, request, replicas, loads):
        return RouteDecision(self.power_of_two(replicas, loads), CHOSEN)


class PrefixAffinityPolicy(RoutingPolicy):
    """Prefer the replica holding the longest prefix of the prompt, within the load bound."""

    name = "prefix_affinity"

    def __init__(self, bound: LoadBound = LoadBound(), blocks_per_replica: int = 65536,
                 min_match_blocks: int = 1, seed: int | None = None) -> None:
        super().__init__(seed)
        self.bound = bound
        self.min_match_blocks = min_match_blocks
        self.index = PrefixIndex(blocks_per_replica)

    def choose(self, request, replicas, loads):
        matched, owners = self.index.longest_match(request.block_hashes)
        if matched >= self.min_match_blocks and owners:
            present = [r for r in owners if r in loads] if len(owners) < len(replicas) else list(owners)
            if present:
                best = min(present, key=lambda r: loads.get(r, 0.0))
                min_load = min(loads.values()) if loads else 0.0
                if self.bound.allows(loads.get(best, 0.0), min_load):
                    return RouteDecision(best, AFFINITY_HIT, matched)
                return RouteDecision(self.power_of_two(replicas, loads), FALLBACK, matched)
        return RouteDecision(self.power_of_two(replicas, loads), NO_AFFINITY)

    def on_routed(self, request, replica):
        if request.block_hashes:
            self.index.insert(replica, request.block_hashes)

    def update_replicas(self, replicas):
        self.index.retain(replicas)


def _hash64(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


class SessionPolicy(RoutingPolicy):
    """Consistent hashing of the session id onto a ring of replicas (bounded loads: past the
    bound, the next replicas on the ring are tried, then least_loaded)."""

    name = "session"

    def __init__(self, bound: LoadBound = LoadBound(), virtual_nodes: int = 64, ring_probes: int = 2,
                 seed: int | None = None) -> None:
        super().__init__(seed)
        self.bound = bound
        self.virtual_nodes = virtual_nodes
        self.ring_probes = ring_probes
        self._members: frozenset = frozenset()
        self._points: list[int] = []
        self._owners: list[Hashable] = []

    def update_replicas(self, replicas):
        members = frozenset(replicas)
        if members == self._members:
            return
        ring = sorted((_hash64(f"{r}#{v}"), r) for r in members for v in range(self.virtual_nodes))
        self._members = members
        self._points = [p for p, _ in ring]
        self._owners = [r for _, r in ring]

    def choose(self, request, replicas, loads):
        if not request.session_id:
            return RouteDecision(self.power_of_two(replicas, loads), NO_AFFINITY)
        self.update_replicas(replicas)
        min_load = min(loads.values()) if loads else 0.0
        i = bisect.bisect(self._points, _hash64(request.session_id))
        seen: list[Hashable] = []
        for step in range(len(self._owners)):
            replica = self._owners[(i + step) % len(self._owners)]
            if replica in seen:
                continue
            if self.bound.allows(loads.get(replica, 0.0), min_load):
                return RouteDecision(replica, AFFINITY_HIT if not seen else FALLBACK)
            seen.append(replica)
            if len(seen) >= self.ring_probes:
                break
        return RouteDecision(self.power_of_two(replicas, loads), FALLBACK)


def make_policy(name: str, *, load_bound_ratio: float = 0.5, load_bound_slack: float = 4.0,
                prefix_blocks_per_replica: int = 65536, seed: int | None = None) -> RoutingPolicy:
    bound = LoadBound(load_bound_ratio, load_bound_slack)
    if name == "round_robin":
        return RoundRobinPolicy(seed)
    if name == "least_loaded":
        return LeastLoadedPolicy(seed)
    if name == "prefix_affinity":
        return PrefixAffinityPolicy(bound, prefix_blocks_per_replica, seed=seed)
    if name == "session":
        return SessionPolicy(bound, seed=seed)
    raise ValueError(f"unknown routing policy {name!r}; one of {', '.join(POLICIES)}")
