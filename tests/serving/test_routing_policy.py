"""The Ray-free parts of routing and autoscaling: prefix index, policies, load bound, scaling decision."""

from __future__ import annotations

import pytest

from cluster.config import AutoscalingSettings
from cluster.serving.autoscaling import EngineSignalPolicy, decide, wanted_replicas
from cluster.serving.prefix_index import PrefixIndex, block_hashes
from cluster.serving.routing_policy import (AFFINITY_HIT, FALLBACK, NO_AFFINITY, LoadBound, RouteRequest,
                                            make_policy)


def test_block_hashes_chain_and_ignore_partial_block():
    a = block_hashes(list(range(40)), 16)
    b = block_hashes(list(range(32)) + [99] * 8, 16)
    c = block_hashes([7] + list(range(1, 40)), 16)
    assert len(a) == 2 and a == b  # the partial third block is not hashed
    assert c[0] != a[0] and c[1] != a[1]  # a change in block 0 changes every later hash


def test_prefix_index_longest_match_and_lru_eviction():
    index = PrefixIndex(blocks_per_replica=4)
    index.insert("r1", (1, 2, 3))
    index.insert("r2", (1, 2))
    assert index.longest_match((1, 2, 3, 4)) == (3, frozenset({"r1"}))
    assert index.longest_match((1, 2, 9)) == (2, frozenset({"r1", "r2"}))
    assert index.longest_match((5,)) == (0, frozenset())
    index.insert("r1", (7, 8))  # r1 now holds 5 blocks > 4: its least recent (the tail 3) goes first
    assert index.longest_match((1, 2, 3)) == (2, frozenset({"r1", "r2"}))
    index.retain(["r2"])
    assert index.longest_match((1, 2, 3)) == (2, frozenset({"r2"}))
    assert index.longest_match((7,)) == (0, frozenset())


def test_round_robin_cycles():
    policy = make_policy("round_robin")
    picks = [policy.choose(RouteRequest(), ["a", "b", "c"], {}).replica for _ in range(6)]
    assert picks == ["a", "b", "c", "a", "b", "c"]


def test_least_loaded_never_picks_the_busier_of_two():
    policy = make_policy("least_loaded", seed=1)
    loads = {"idle": 0.0, "busy": 10.0}
    assert {policy.choose(RouteRequest(), ["idle", "busy"], loads).replica for _ in range(20)} == {"idle"}


def test_prefix_affinity_follows_the_prefix_within_the_bound_and_falls_back_past_it():
    policy = make_policy("prefix_affinity", load_bound_ratio=0.5, load_bound_slack=2.0, seed=0)
    replicas = ["a", "b", "c"]
    first = RouteRequest(block_hashes=(11, 12, 13))
    d = policy.choose(first, replicas, {"a": 0, "b": 0, "c": 0})
    assert d.outcome == NO_AFFINITY
    policy.on_routed(first, d.replica)
    home = d.replica
    follow_up = RouteRequest(block_hashes=(11, 12, 13, 14))
    loads = {r: 1.0 for r in replicas}
    loads[home] = 3.0  # 3 <= 1.5 * 1 + 2
    d = policy.choose(follow_up, replicas, loads)
    assert (d.replica, d.outcome, d.matched_blocks) == (home, AFFINITY_HIT, 3)
    loads[home] = 3.6  # > 1.5 * 1 + 2: over the bound
    d = policy.choose(follow_up, replicas, loads)
    assert d.outcome == FALLBACK and d.replica != home


def test_hot_prefix_spreads_within_the_bound():
    """Every request shares one prefix; loads grow as requests land: the max stays within the bound."""
    bound = LoadBound(ratio=0.5, slack=4.0)
    policy = make_policy("prefix_affinity", load_bound_ratio=bound.ratio, load_bound_slack=bound.slack, seed=3)
    replicas = [f"r{i}" for i in range(8)]
    loads = {r: 0.0 for r in replicas}
    for _ in range(400):
        req = RouteRequest(block_hashes=(1, 2, 3))
        d = policy.choose(req, replicas, loads)
        policy.on_routed(req, d.replica)
        loads[d.replica] += 1
    assert max(loads.values()) <= (1 + bound.ratio) * min(loads.values()) + bound.slack + 1


def test_session_is_sticky_and_consistent_under_a_replica_change():
    policy = make_policy("session", seed=0)
    replicas = [f"r{i}" for i in range(10)]
    loads = {r: 0.0 for r in replicas}
    home = {f"s{i}": policy.choose(RouteRequest(session_id=f"s{i}"), replicas, loads).replica for i in range(200)}
    assert all(policy.choose(RouteRequest(session_id=s), replicas, loads).replica == r for s, r in home.items())
    fewer = [r for r in replicas if r != "r3"]
    moved = sum(policy.choose(RouteRequest(session_id=s), fewer, {r: 0.0 for r in fewer}).replica != r
                for s, r in home.items())
    assert moved == sum(r == "r3" for r in home.values())  # only r3's sessions move
    loads["r5"] = 50.0  # over the bound: r5's sessions go elsewhere
    assert all(policy.choose(RouteRequest(session_id=s), replicas, loads).replica != "r5"
               for s, r in home.items() if r == "r5")


def test_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="unknown routing policy"):
        make_policy("random")


SETTINGS = AutoscalingSettings(min_replicas=1, max_replicas=4, target_ongoing_per_replica=4, target_kv_use=0.5,
                           upscale_delay_s=10, downscale_delay_s=30)


def test_wanted_replicas_from_queue_and_kv():
    assert wanted_replicas([{"waiting": 0, "running": 0, "kv_use": 0}], SETTINGS) == 1
    assert wanted_replicas([{"waiting": 5, "running": 4, "kv_use": 0.1}], SETTINGS) == 3
    assert wanted_replicas([{"waiting": 0, "running": 1, "kv_use": 0.9}], SETTINGS) == 2
    assert wanted_replicas([{"waiting": 100, "running": 4, "kv_use": 1}], SETTINGS) == 4  # max_replicas


def test_decide_applies_up_and_down_delays():
    busy = [{"waiting": 6, "running": 4, "kv_use": 0.2}]
    n, state = decide(1, busy, SETTINGS, {}, now=0.0)
    assert n == 1  # wanted, but not yet for upscale_delay_s
    n, state = decide(1, busy, SETTINGS, state, now=9.0)
    assert n == 1
    n, state = decide(1, busy, SETTINGS, state, now=10.0)
    assert n == 3
    idle = [{"waiting": 0, "running": 0, "kv_use": 0.0}] * 3
    n, state = decide(3, idle, SETTINGS, state, now=11.0)
    n, state = decide(3, [{"waiting": 1, "running": 0, "kv_use": 0}], SETTINGS, state, now=20.0)
    assert n == 3 and "down_since" not in state  # requests waiting: never down
    n, state = decide(3, idle, SETTINGS, state, now=21.0)
    n, state = decide(3, idle, SETTINGS, state, now=50.0)
    assert n == 3
    n, state = decide(3, idle, SETTINGS, state, now=51.0)
    assert n == 1


class _Ctx:
    def __init__(self, metrics, replicas, target, now, state=None):
        self.aggregated_metrics = metrics
        self.running_replicas = replicas
        self.target_num_replicas = target
        self.current_time = now
        self.policy_state = state or {}


def test_serve_policy_reads_aggregated_metrics():
    policy = EngineSignalPolicy(**{**SETTINGS.__dict__, "upscale_delay_s": 0, "unknown_key": 1})
    metrics = {"waiting": {"r1": 10.0}, "running": {"r1": 4.0}, "kv_use": {"r1": 0.3}}
    assert policy(_Ctx(metrics, ["r1"], 1, 100.0))[0] == 4
    assert policy(_Ctx({}, ["r1"], 2, 100.0))[0] == 2  # nothing reported yet: hold
