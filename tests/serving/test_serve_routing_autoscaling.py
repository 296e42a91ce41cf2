"""The request routers and the autoscaling policy under real Ray Serve (tiny preset, torch engine).

- Routing: two dedicated 2-replica apps, `round_robin` and `prefix_affinity`, get the same
  multi-turn workload over two conversations sharing a system prompt; the replicas' own prefix-cache
  counters give the hit rate, and prefix_affinity's must be higher. Then a burst in which every
  request shares one prefix: prefix_affinity's load bound must spread it, the busiest replica
  taking at most (1 + ratio) x mean + slack of the requests.
- Autoscaling: a 1..2-replica app on EngineSignalPolicy; sustained queueing in the engine scales it
  to 2 and idleness back to 1, and the front door's load poll shows both in the
  gptoss_autoscaler_* gauges.

Each app is started in the session's Ray with its own name and deleted at the end.
"""

from __future__ import annotations

import random
import threading
import time
import urllib.request

import pytest

from cluster.engine.request import GenerateRequest, SamplingParams
from tests.waiting import wait_until

pytestmark = pytest.mark.slow

BLOCK = 16
SYSTEM_TOKENS = 4 * BLOCK
USER_TOKENS = 20
OUTPUT_TOKENS = 8
TURNS = 6  # per conversation
LOAD_BOUND_RATIO = 0.5
LOAD_BOUND_SLACK = 2.0
BURST = 40


def _config(serving_config, app_name: str, **serving):
    from cluster.config import from_dict, to_dict

    data = to_dict(serving_config)
    router = serving.pop("router", {})
    autoscaling = serving.pop("autoscaling", {})
    engine = serving.pop("engine", {})
    data["serving"].update(app_name=app_name, **serving)
    data["serving"]["router"].update(router)
    data["serving"]["autoscaling"].update(autoscaling)
    data["engine"].update(engine)
    return from_dict(data)


def _deploy(config):
    from ray import serve

    from cluster.serving.builder import build_app

    return serve.run(build_app(config), name=config.serving.app_name, route_prefix=None)


def _generate(handle, prompt, max_tokens: int, request_id: str = "") -> list[int]:
    request = GenerateRequest(prompt_token_ids=tuple(prompt), request_id=request_id,
                              sampling=SamplingParams(max_tokens=max_tokens, ignore_stop=True))
    tokens: list[int] = []
    for chunk in handle.options(stream=True).generate.remote(request):
        tokens.extend(chunk.token_ids)
    return tokens


def _replica_stats(handle, expected: int, timeout_s: float = 60.0) -> dict:
    """Every replica's EngineStats: control calls take the replicas in turn (router.py)."""
    seen: dict = {}
    deadline = time.monotonic() + timeout_s
    while len(seen) < expected:
        assert time.monotonic() < deadline, f"load reports reached only {sorted(seen)}"
        replica_id, stats = handle.load_report.remote().result(timeout_s=30)
        seen[replica_id] = stats
    return seen


def _multi_turn(handle, seed: int) -> None:
    """Two conversations sharing a system prompt, their turns interleaved in a seeded order; each
    turn's prompt is the whole conversation so far plus a new user message."""
    rng = random.Random(seed)
    system = [rng.randrange(1000, 100_000) for _ in range(SYSTEM_TOKENS)]
    history = {c: list(system) for c in ("a", "b")}
    order = ["a"] * TURNS + ["b"] * TURNS
    rng.shuffle(order)
    for i, conversation in enumerate(order):
        prompt = history[conversation] + [rng.randrange(1000, 100_000) for _ in range(USER_TOKENS)]
        output = _generate(handle, prompt, OUTPUT_TOKENS, request_id=f"{conversation}-{i}")
        assert len(output) == OUTPUT_TOKENS
        history[conversation] = prompt + output


def _hit_rate(stats: dict) -> float:
    queried = sum(s.prefix_cache_queried_tokens_total for s in stats.values())
    hits = sum(s.prefix_cache_hit_tokens_total for s in stats.values())
    assert queried > 0
    return hits / queried


def _decisions(policy: str, outcome: str) -> float:
    from prometheus_client import REGISTRY

    app = f"route-{policy.replace('_', '-')}"
    return REGISTRY.get_sample_value("gptoss_router_decisions_total", {
        "application": app, "deployment": "ModelReplica", "policy": policy, "outcome": outcome}) or 0.0


@pytest.fixture(scope="module")
def routing_apps(ray_serving, serving_config):
    from ray import serve

    apps = {}
    try:
        for policy in ("round_robin", "prefix_affinity"):
            config = _config(serving_config, f"route-{policy.replace('_', '-')}", replicas=2,
                             router={"policy": policy, "block_size": BLOCK, "stats_period_s": 0.5,
                                     "load_bound_ratio": LOAD_BOUND_RATIO, "load_bound_slack": LOAD_BOUND_SLACK})
            apps[policy] = _deploy(config)
            apps[policy + "_name"] = config.serving.app_name
        yield apps
    finally:
        for key, value in apps.items():
            if key.endswith("_name"):
                serve.delete(value)


def test_prefix_affinity_beats_round_robin_on_prefix_cache_hits(routing_apps):
    rates = {}
    for policy in ("round_robin", "prefix_affinity"):
        handle = routing_apps[policy]
        before = _decisions(policy, "affinity_hit")
        _multi_turn(handle, seed=7)  # the very same workload for both
        stats = _replica_stats(handle, expected=2)
        rates[policy] = _hit_rate(stats)
        per_replica = {rid[-6:]: (s.requests_total, s.prefix_cache_hit_tokens_total, s.prefix_cache_queried_tokens_total)
                       for rid, s in stats.items()}
        print(f"\n{policy}: prefix-cache hit rate {rates[policy]:.3f}; per replica (requests, hit, queried) "
              f"{per_replica}")
        assert sum(s.requests_total for s in stats.values()) == 2 * TURNS
        if policy == "round_robin":
            # Round robin really alternates: both replicas served half the turns.
            assert sorted(s.requests_total for s in stats.values()) == [TURNS, TURNS]
        else:
            assert _decisions(policy, "affinity_hit") - before >= 2 * TURNS - 2
    assert rates["prefix_affinity"] > rates["round_robin"] + 0.1, rates


def test_a_hot_prefix_spreads_within_the_load_bound(routing_apps):
    handle = routing_apps["prefix_affinity"]
    before = {rid: s.requests_total for rid, s in _replica_stats(handle, expected=2).items()}
    fallbacks = _decisions("prefix_affinity", "fallback")
    rng = random.Random(3)
    shared = [rng.randrange(1000, 100_000) for _ in range(8 * BLOCK)]
    requests = [GenerateRequest(prompt_token_ids=tuple(shared + [rng.randrange(1000, 100_000) for _ in range(8)]),
                                request_id=f"hot-{i}", sampling=SamplingParams(max_tokens=32, ignore_stop=True))
                for i in range(BURST)]
    streaming = handle.options(stream=True)
    responses = [streaming.generate.remote(r) for r in requests]  # all in flight at once
    for response in responses:
        assert sum(len(chunk.token_ids) for chunk in response) == 32
    after = _replica_stats(handle, expected=2)
    counts = sorted(after[rid].requests_total - before.get(rid, 0) for rid in after)
    mean = BURST / len(counts)
    bound = (1 + LOAD_BOUND_RATIO) * mean + LOAD_BOUND_SLACK
    print(f"\nhot prefix, {BURST} requests: per replica {counts}, max/mean {max(counts) / mean:.2f}, "
          f"bound {bound:.1f}, fallbacks {_decisions('prefix_affinity', 'fallback') - fallbacks:.0f}")
    assert sum(counts) == BURST
    assert max(counts) <= bound, (counts, bound)
    assert _decisions("prefix_affinity", "fallback") > fallbacks  # the bound, not luck, spread them


def _replica_states(app_name: str) -> int:
    """Running replicas of the app's deployment, from serve.status()."""
    from ray import serve

    deployment = serve.status().applications[app_name].deployments["ModelReplica"]
    return deployment.replica_states.get("RUNNING", 0)


def _gauge(metrics_port: int, name: str, app: str = "autoscale") -> float | None:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(name + "{") and f'application="{app}",deployment="ModelReplica"' in line:
                return float(line.rsplit(" ", 1)[1])
    return None


def test_engine_queueing_scales_1_to_2_and_idleness_back(ray_serving, serving_config):
    from prometheus_client import CollectorRegistry
    from ray import serve

    from cluster.metrics import FrontdoorMetrics
    from tests.conftest import BackgroundFrontdoor

    config = _config(serving_config, "autoscale", replicas=1,
                     engine={"max_num_seqs": 2, "max_waiting_requests": 32},
                     autoscaling={"enabled": True, "min_replicas": 1, "max_replicas": 2,
                                  "target_ongoing_per_replica": 3.0, "upscale_delay_s": 1.0,
                                  "downscale_delay_s": 2.0, "look_back_period_s": 2.0, "metrics_interval_s": 0.5})
    app = config.serving.app_name
    handle = _deploy(config)
    door = BackgroundFrontdoor(handle, config.frontdoor, FrontdoorMetrics(CollectorRegistry()))
    # The handle makes its router here, once. Serve's lazy router creation is not thread-safe: the 8
    # clients' first calls at once made 8 routers, and the 7 the handle dropped kept pushing metrics
    # after the session's Ray was gone, so Ray started a new local instance at the end of the suite.
    streaming = handle.options(stream=True)
    stop = threading.Event()
    errors: list[BaseException] = []

    def client(seed: int) -> None:  # one of 8 clients: always a request in flight
        rng = random.Random(seed)
        while not stop.is_set():
            try:
                _generate(streaming, [rng.randrange(1000, 100_000) for _ in range(16)], 24)
            except BaseException as err:  # noqa: BLE001 - reported below
                errors.append(err)
                return

    try:
        assert _replica_states(app) == 1
        # Serve runs our policy, not its request-count default.
        from ray.serve.context import _get_global_client

        deployment = _get_global_client().get_serve_details()["applications"][app]["deployments"]["ModelReplica"]
        policy = deployment["deployment_config"]["autoscaling_config"]["policy"]
        assert policy["policy_function"] == "cluster.serving.autoscaling.EngineSignalPolicy", policy
        assert policy["policy_kwargs"]["target_ongoing_per_replica"] == 3.0, policy
        gauges = {"desired": set(), "running": set()}

        def wait_for(replicas: int, limit_s: float) -> float:
            start = time.monotonic()
            while time.monotonic() - start < limit_s:
                for key, name in (("desired", "gptoss_autoscaler_desired_replicas"),
                                  ("running", "gptoss_autoscaler_replicas")):
                    value = _gauge(door.server.metrics_port, name)
                    if value is not None:
                        gauges[key].add(value)
                if _replica_states(app) == replicas:
                    return time.monotonic() - start
                time.sleep(0.5)
            pytest.fail(f"not {replicas} running replicas within {limit_s} s; gauges seen {gauges}")

        threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(8)]
        for t in threads:
            t.start()
        up_s = wait_for(2, 90.0)
        waiting = [s.waiting_requests for s in _replica_stats(handle, expected=2).values()]
        stop.set()
        for t in threads:
            t.join(60)
        assert not errors, errors[:3]
        down_s = wait_for(1, 90.0)

        def final_gauges():  # a later load poll sees the final count
            return {name: _gauge(door.server.metrics_port, name)
                    for name in ("gptoss_autoscaler_desired_replicas", "gptoss_autoscaler_replicas")}

        wait_until(lambda: set(final_gauges().values()) == {1.0}, 10 * config.frontdoor.load_poll_interval_s + 10,
                   0.1, "the autoscaler gauges at 1 replica")
        final = final_gauges()
        print(f"\nautoscaling: 1 -> 2 replicas in {up_s:.1f} s under 8 clients (engine waiting at 2: {waiting}); "
              f"2 -> 1 in {down_s:.1f} s idle; gauges seen {gauges}, final {final}")
        assert 2.0 in gauges["desired"] and 2.0 in gauges["running"], gauges
        assert final == {"gptoss_autoscaler_desired_replicas": 1.0, "gptoss_autoscaler_replicas": 1.0}
    finally:
        stop.set()
        door.close()
        serve.delete(app)
