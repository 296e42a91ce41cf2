"""Expert parallelism against ep_size 1: real processes, gloo, the engine's own batches.

Each run drives EngineCore (continuous batching, paged KV) with greedy sequences; the EP run's
forward is the group driver (rank 0 here, ranks 1..N-1 as Ray actors). Every step's float32 logits
(the hidden states it returns, through the unembedding) must agree to 1e-5 and the greedy tokens must be identical.
"""

from __future__ import annotations

import pytest
import torch
from conftest import prompts_of

from cluster.config import EngineConfig
from cluster.engine.core import EngineCore, run_to_completion
from cluster.engine.sequence import SamplingSettings, Sequence
from cluster.model.checkpoint import load_model
from cluster.model.paged import PagedKVCache, paged_hidden
from cluster.parallel.expert_map import plan_placement
from cluster.parallel.workers import ep_forward_factory

ENGINE = EngineConfig(block_size=4, max_num_seqs=8, max_num_batched_tokens=24, kv_cache_memory_mib=4)


def local_factory(model, record):
    def factory(spec, num_blocks):
        locations = [spec.cache_location(layer) for layer in range(spec.num_layers)]
        cache = PagedKVCache.allocate(num_blocks, spec.block_size, spec.num_kv_heads, spec.head_dim,
                                      [g for g, _ in locations], [j for _, j in locations], model.dtype)

        def forward(batch):
            hidden = paged_hidden(model, batch, cache)
            with torch.inference_mode():
                record.append(model.unembedding(hidden).float())
            return hidden
        return forward
    return factory


def recording(factory, record):
    def wrapped(spec, num_blocks):
        driver = factory(spec, num_blocks)

        def forward(batch):
            hidden = driver(batch)
            with torch.inference_mode():
                record.append(driver.runtime.model.unembedding(hidden).float())
            return hidden
        return forward
    return wrapped


def run(core, prompts, new_tokens):
    settings = SamplingSettings(max_tokens=new_tokens, temperature=0.0, stop_token_ids=())
    out = run_to_completion(core, [Sequence(f"r{i}", p, settings) for i, p in enumerate(prompts)])
    return [out[f"r{i}"] for i in range(len(prompts))]


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    torch.set_num_threads(1)
    model = load_model(tiny_checkpoint)
    prompts = prompts_of([3, 9, 17, 5], model.config.vocab_size, seed=1)
    logits: list[torch.Tensor] = []
    tokens = run(EngineCore(model, ENGINE, local_factory(model, logits)), prompts, 6)
    return prompts, tokens, logits


@pytest.mark.parametrize("ep_size", [2, 4])
def test_ep_matches_ep1_logits_tokens_and_divides_memory(ray_cluster, tiny_checkpoint, reference, ep_size):
    prompts, tokens, ref_logits = reference
    groups, logits = [], []
    model = load_model(tiny_checkpoint)
    full_bytes = _expert_and_attention_bytes(model)
    factory = ep_forward_factory(str(tiny_checkpoint), ep_size, model=model, on_start=groups.append)
    core = EngineCore(model, ENGINE, recording(factory, logits))
    group = groups[0]
    try:
        got = run(core, prompts, 6)
        assert got == tokens
        assert len(logits) == len(ref_logits)
        for a, b in zip(logits, ref_logits):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)

        reports = group.memory_reports()  # each rank reads its own tensors
        assert [r["rank"] for r in reports] == list(range(ep_size))
        experts = [r["expert_bytes"] for r in reports]
        assert sum(experts) == full_bytes["experts"]  # contiguous: every expert exactly once
        assert max(experts) - min(experts) <= full_bytes["experts"] // model.config.num_local_experts
        assert all(abs(e - full_bytes["experts"] / ep_size) <= full_bytes["experts"] / 8 for e in experts)
        # attention weights: 1/N of the query heads (kv heads shared when fewer than ranks)
        assert all(r["q_heads"] * ep_size == model.config.num_attention_heads for r in reports)
        kv_heads = max(1, model.config.num_key_value_heads // ep_size)
        assert all(r["kv_heads"] == kv_heads for r in reports)
        full_kv = num_blocks_bytes(core) * model.config.num_key_value_heads
        assert all(r["kv_cache_bytes"] == num_blocks_bytes(core) * kv_heads for r in reports)
        assert all(r["kv_cache_bytes"] < full_kv for r in reports)
        assert all(r["attention_bytes"] < full_bytes["attention"] / ep_size * 1.5 for r in reports)
    finally:
        group.shutdown()


def num_blocks_bytes(core):
    """K+V bytes of one kv head over every cache tensor."""
    spec = core.spec
    return 2 * spec.num_cache_tensors * core.kv_cache.pool.num_blocks * spec.block_size * spec.head_dim * 4


def _expert_and_attention_bytes(model):
    from cluster.parallel.sharding import memory_report

    r = memory_report(model)
    return {"experts": r["expert_bytes"], "attention": r["attention_bytes"]}


def test_rebalance_with_redundant_experts_keeps_parity(ray_cluster, tiny_checkpoint, reference):
    """Apply a planned placement with redundant copies between steps; later steps still match ep 1."""
    prompts, tokens, ref_logits = reference
    groups, logits = [], []
    model = load_model(tiny_checkpoint)
    E, L = model.config.num_local_experts, model.config.num_hidden_layers
    factory = ep_forward_factory(str(tiny_checkpoint), 2, model=model, on_start=groups.append)
    core = EngineCore(model, ENGINE, recording(factory, logits))
    group = groups[0]
    try:
        settings = SamplingSettings(max_tokens=6, temperature=0.0, stop_token_ids=())
        seqs = [Sequence(f"r{i}", p, settings) for i, p in enumerate(prompts)]
        for s in seqs:
            core.add_request(s)
        core.step()
        core.step()
        skew = [[100.0 * (e == 0) + 50.0 * (e == 1) + 1 for e in range(E)] for _ in range(L)]
        placements = [plan_placement(loads, 2, redundant=2) for loads in skew]
        assert placements[0].copies(0) == [0, 1]  # the hot expert now lives on both ranks
        moved = group.driver.apply_placements(placements)
        assert moved > 0
        while core.has_unfinished():
            core.step()
        assert [list(s.output_token_ids) for s in seqs] == tokens
        for a, b in zip(logits, ref_logits):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
        reports = group.memory_reports()
        assert [r["experts"][0] for r in reports] == [list(p) for p in placements[0].slots]
    finally:
        group.shutdown()
