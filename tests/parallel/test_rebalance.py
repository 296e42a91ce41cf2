"""Expert load statistics, their metrics, and rebalancing applied while requests run."""

from __future__ import annotations

import torch
from conftest import prompts_of
from prometheus_client import CollectorRegistry

from cluster.config import EngineConfig
from cluster.engine.core import EngineCore, run_to_completion
from cluster.engine.protocol import EngineStats, ExpertLoad
from cluster.engine.sequence import SamplingSettings, Sequence
from cluster.metrics import ReplicaLoadCollector
from cluster.model.checkpoint import load_model
from cluster.parallel.expert_map import contiguous
from cluster.parallel.rebalance import ExpertLoadStats
from cluster.parallel.rebalance import Rebalancer
from cluster.parallel.workers import ep_forward_factory

L, E = 4, 8


def skewed_routing(stats: ExpertLoadStats, steps: int = 20, tokens: int = 16, seed: int = 0) -> None:
    """Synthetic routing: experts 0 and 1 (both on rank 0 when contiguous) get most of the tokens."""
    g = torch.Generator().manual_seed(seed)
    weights = torch.tensor([8.0, 6.0] + [1.0] * (E - 2))
    for _ in range(steps):
        for layer in range(L):
            idx = torch.stack([torch.multinomial(weights, 4, generator=g) for _ in range(tokens)])  # [S, 4]
            stats.record(layer, idx)
        stats.end_step()


def test_window_loads_are_the_last_window_steps():
    stats = ExpertLoadStats(L, E, window=5)
    g = torch.Generator().manual_seed(1)
    steps = []
    for step in range(12):  # fills the window, then every step pushes the oldest out
        before = stats.totals.clone()
        for layer in range(L):
            stats.record(layer, torch.randint(0, E, (3 + step, 4), generator=g))
        stats.end_step()
        steps.append(stats.totals - before)
        assert torch.equal(stats.window_loads(), torch.stack(steps[-5:]).sum(0)), step


def test_window_stats_rebalancer_and_metrics():
    stats = ExpertLoadStats(L, E, window=10)
    skewed_routing(stats, steps=30)
    loads = stats.window_loads()
    assert int(loads.sum()) == 10 * L * 16 * 4  # only the last 10 steps count
    assert int(stats.totals.sum()) == 30 * L * 16 * 4
    current = [contiguous(E, 2) for _ in range(L)]
    rebalancer = Rebalancer(stats, 2, redundant=2)
    before = rebalancer.imbalance(current)
    new, result = rebalancer.plan(current)
    after = rebalancer.imbalance(new)
    print(f"\nskewed synthetic load, 2 ranks: max/mean before {max(before):.3f} -> after {max(after):.3f}")
    assert max(before) > 1.2 and max(after) < 1.1 and result.imbalance_after == max(after)

    # As the front door exports them: from an expert-parallel replica's load report.
    registry = CollectorRegistry()
    collector = ReplicaLoadCollector()
    registry.register(collector)
    load = ExpertLoad(tokens_per_expert_total=stats.totals.tolist(), imbalance=after, rebalances_total=1)
    # r3 runs with parallel.expert_token_series off: its report carries no per-expert counts.
    quiet = ExpertLoad(tokens_per_expert_total=[], imbalance=after, rebalances_total=0)
    collector.update([("r1", EngineStats(0, 0, 0, 0, 0, 0, expert_load=load)), ("r2", EngineStats(0, 0, 0, 0, 0, 0)),
                      ("r3", EngineStats(0, 0, 0, 0, 0, 0, expert_load=quiet))])
    sample = registry.get_sample_value
    assert sample("gptoss_expert_tokens_total", {"replica": "r1", "layer": "0", "expert": "0"}) == int(stats.totals[0, 0])
    assert sample("gptoss_expert_imbalance_ratio", {"replica": "r1", "layer": "3"}) == after[3]
    assert sample("gptoss_expert_rebalances_total", {"replica": "r1"}) == 1
    assert sample("gptoss_expert_rebalances_total", {"replica": "r2"}) is None  # not expert-parallel
    assert sample("gptoss_expert_imbalance_ratio", {"replica": "r3", "layer": "3"}) == after[3]
    assert not [s for m in registry.collect() if m.name == "gptoss_expert_tokens" for s in m.samples
                if s.labels["replica"] == "r3"]


def test_rebalancing_while_serving_drops_nothing_and_keeps_parity(ray_cluster, tiny_checkpoint):
    torch.set_num_threads(1)
    engine = EngineConfig(block_size=4, max_num_seqs=8, max_num_batched_tokens=24, kv_cache_memory_mib=4)
    settings = SamplingSettings(max_tokens=10, temperature=0.0, stop_token_ids=())
    prompts = prompts_of([4, 11, 6, 15, 2, 8], 201088, seed=3)
    expected = run_to_completion(EngineCore(load_model(tiny_checkpoint), engine),
                                 [Sequence(f"r{i}", p, settings) for i, p in enumerate(prompts)])

    stats = ExpertLoadStats(L, E, window=64)
    skewed_routing(stats)
    groups = []
    model = load_model(tiny_checkpoint)
    factory = ep_forward_factory(str(tiny_checkpoint), 2, model=model, stats=stats, redundant=2,
                                 rebalance_interval_s=0.01, on_start=groups.append)
    core = EngineCore(model, engine, factory)
    group = groups[0]
    try:
        seqs = [Sequence(f"r{i}", p, settings) for i, p in enumerate(prompts)]
        for s in seqs[:3]:
            core.add_request(s)
        steps = 0
        while core.has_unfinished() or steps < 3:
            if steps == 3:  # more requests arrive after the first placements were applied
                for s in seqs[3:]:
                    core.add_request(s)
            core.step()
            steps += 1
        rebalances = group.driver.rebalances
        assert rebalances, "the rebalancer applied a placement while requests ran"
        first = rebalances[0]
        print(f"\nrebalanced {len(rebalances)}x while serving; first: max/mean {first.imbalance_before:.3f} -> "
              f"{first.imbalance_after:.3f} ({first.layers_changed} layers)")
        assert first.imbalance_after < first.imbalance_before
        assert all(s.finish_reason is not None for s in seqs)  # every request finished, none failed
        assert {s.request_id: list(s.output_token_ids) for s in seqs} == expected
        placements = group.runtime.placements
        assert any(len(p.copies(e)) > 1 for p in placements for e in range(E)), "redundant copies in use"
        reports = group.memory_reports()
        assert [r["experts"] for r in reports] == [[list(p.slots[r]) for p in placements] for r in range(2)]
    finally:
        group.shutdown()
