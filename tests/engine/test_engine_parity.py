"""The batching engine against the plain one-sequence decode loop (cluster.model.generate.greedy), float32."""

from __future__ import annotations

import pytest
import torch
from engine_fixtures import engine_model, one_intra_op_thread  # noqa: F401  (fixtures)

from cluster.config import EngineConfig
from cluster.engine.core import EngineCore, run_to_completion
from cluster.engine.sequence import SamplingSettings, Sequence
from cluster.model.generate import greedy

NEW_TOKENS = 10


def prompts_of(lengths, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def greedy_settings(n=NEW_TOKENS):
    return SamplingSettings(max_tokens=n, temperature=0.0, stop_token_ids=())


# 32 prompts of mixed lengths; the tiny presets' windows are 8 and 16, so many straddle them.
MIXED_LENGTHS = [1, 2, 3, 5, 7, 8, 9, 12, 15, 16, 17, 20, 23, 24, 25, 31, 32, 33, 40, 47, 48, 49,
                 55, 63, 64, 65, 70, 77, 90, 100, 120, 150]


@pytest.mark.parametrize("preset", ["tiny", "tiny-small-vocab"])
def test_every_sequence_alone_equals_among_31_others(engine_model, preset):
    model = engine_model(preset)
    prompts = prompts_of(MIXED_LENGTHS, model.config.vocab_size)
    expected = [greedy(model, p, NEW_TOKENS) for p in prompts]
    # Small chunks and blocks, so prompts are prefilled over several steps beside decoding ones.
    core = EngineCore(model, EngineConfig(block_size=4, max_num_seqs=32, max_num_batched_tokens=64))
    got = run_to_completion(core, [Sequence(f"r{i}", p, greedy_settings()) for i, p in enumerate(prompts)])
    assert [got[f"r{i}"] for i in range(len(prompts))] == expected
    assert core.stats.steps_total < len(prompts) * NEW_TOKENS / 4, "sequences really were batched"
    assert core.kv_cache.pool.num_used_blocks == 0
    # ... and a few of them alone in a fresh engine
    for i in (0, 9, 31):
        alone = EngineCore(model, EngineConfig(block_size=4))
        assert run_to_completion(alone, [Sequence("x", prompts[i], greedy_settings())])["x"] == expected[i]


def test_preempted_sequences_are_recomputed_to_the_same_tokens(engine_model):
    model = engine_model("tiny")
    prompts = prompts_of([30, 41, 17, 52, 9, 60, 33, 25], model.config.vocab_size, seed=1)
    expected = [greedy(model, p, 24) for p in prompts]
    config = EngineConfig(block_size=4, max_num_seqs=8, max_num_batched_tokens=64)
    probe = EngineCore(model, config)
    # A pool of 40 blocks: all eight cannot hold their K/V at once, so some must be preempted.
    budget = 41 * probe.spec.bytes_per_block
    core = EngineCore(model, EngineConfig(block_size=4, max_num_seqs=8, max_num_batched_tokens=64,
                                          kv_cache_memory_mib=budget / (1 << 20)))
    seqs = [Sequence(f"r{i}", p, greedy_settings(24)) for i, p in enumerate(prompts)]
    got = run_to_completion(core, seqs)
    assert core.stats.preemptions_total > 0
    assert any(s.num_preemptions for s in seqs)
    assert [got[f"r{i}"] for i in range(len(prompts))] == expected
    core.kv_cache.check_invariants()
    assert core.kv_cache.pool.num_used_blocks == 0


def test_shared_256_token_prefix_hits_the_cache_and_changes_nothing(engine_model):
    model = engine_model("tiny")
    prefix, tail_a, tail_b = prompts_of([256, 11, 7], model.config.vocab_size, seed=2)
    config = EngineConfig(block_size=16, max_num_batched_tokens=128)
    cached = EngineCore(model, config)
    first = run_to_completion(cached, [Sequence("a", prefix + tail_a, greedy_settings())])["a"]
    assert cached.kv_cache.prefix_hit_tokens == 0
    second = run_to_completion(cached, [Sequence("b", prefix + tail_b, greedy_settings())])["b"]
    assert cached.kv_cache.prefix_hit_tokens == 256
    assert cached.stats.prefix_cache_hit_rate == pytest.approx(256 / (267 + 263))

    uncached = EngineCore(model, EngineConfig(block_size=16, max_num_batched_tokens=128, enable_prefix_caching=False))
    assert run_to_completion(uncached, [Sequence("b", prefix + tail_b, greedy_settings())])["b"] == second
    assert uncached.kv_cache.prefix_hit_tokens == 0
    assert second == greedy(model, prefix + tail_b, NEW_TOKENS)
    assert first == greedy(model, prefix + tail_a, NEW_TOKENS)


def test_seeded_sampling_is_the_same_alone_and_in_a_busy_batch(engine_model):
    model = engine_model("tiny-small-vocab")
    prompt, *others = prompts_of([20, 5, 33, 12, 48, 7, 26], model.config.vocab_size, seed=3)
    settings = SamplingSettings(max_tokens=16, temperature=0.9, top_p=0.95, top_k=50, seed=42, stop_token_ids=())
    alone = run_to_completion(EngineCore(model, EngineConfig(block_size=4)), [Sequence("s", prompt, settings)])["s"]
    busy = EngineCore(model, EngineConfig(block_size=4, max_num_batched_tokens=32))
    neighbours = [Sequence(f"n{i}", p, SamplingSettings(max_tokens=10 + i, temperature=1.3, stop_token_ids=()))
                  for i, p in enumerate(others)]
    in_batch = run_to_completion(busy, neighbours[:3] + [Sequence("s", prompt, settings)] + neighbours[3:])["s"]
    assert in_batch == alone
    other_seed = run_to_completion(EngineCore(model, EngineConfig(block_size=4)),
                                   [Sequence("t", prompt, SamplingSettings(max_tokens=16, temperature=0.9, top_p=0.95,
                                                                           top_k=50, seed=43, stop_token_ids=()))])["t"]
    assert other_seed != alone


def test_stop_token_ends_the_sequence_and_is_returned(engine_model):
    model = engine_model("tiny-small-vocab")
    (prompt,) = prompts_of([12], model.config.vocab_size, seed=4)
    free_run = greedy(model, prompt, 8)
    stop = free_run[3]
    core = EngineCore(model, EngineConfig(block_size=4))
    seq = Sequence("s", prompt, SamplingSettings(max_tokens=8, temperature=0.0, stop_token_ids=(stop,)))
    run_to_completion(core, [seq])
    assert seq.output_token_ids == free_run[: free_run.index(stop) + 1]
    assert seq.finish_reason.value == "stop"


def test_logprobs_are_returned_per_token(engine_model):
    model = engine_model("tiny-small-vocab")
    (prompt,) = prompts_of([10], model.config.vocab_size, seed=5)
    core = EngineCore(model, EngineConfig(block_size=4))
    seq = Sequence("s", prompt, SamplingSettings(max_tokens=3, temperature=0.0, logprobs=2, stop_token_ids=()))
    run_to_completion(core, [seq])
    assert len(seq.output_logprobs) == 3
    for token, lp in zip(seq.output_token_ids, seq.output_logprobs):
        assert lp.token_id == token == lp.top_token_ids[0] and lp.logprob == pytest.approx(lp.top_logprobs[0])
        assert lp.top_logprobs[0] >= lp.top_logprobs[1]


def test_the_step_unembedding_matches_the_model_layer(engine_model):
    # The unembedding may run on a reordered (oneDNN) copy of the weight: same logits as the
    # nn.Linear up to float rounding, for one row and for a batch, and remade when the weight changes.
    from cluster.engine.unembedding import Unembedding

    model = engine_model("tiny")
    unembed = Unembedding(model.unembedding)
    x = torch.randn(33, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        for rows in (x[:1], x[:32], x):
            torch.testing.assert_close(unembed(rows), model.unembedding(rows).float(), rtol=1e-5, atol=1e-5)
    before = model.unembedding.weight.detach().clone()
    try:
        with torch.no_grad():
            model.unembedding.weight.mul_(2)
        with torch.inference_mode():
            torch.testing.assert_close(unembed(x[:4]), model.unembedding(x[:4]).float(), rtol=1e-5, atol=1e-5)
    finally:
        with torch.no_grad():
            model.unembedding.weight.copy_(before)


def test_a_lone_sequence_and_the_same_sequence_in_a_batch_get_the_same_logprobs(engine_model):
    # Alone, a decoding sequence reads exactly its visible keys (paged.py's lone-decode path);
    # beside another it reads whole blocks under a visibility mask. Across window and block
    # boundaries (windows 8 and 16, blocks of 4) both must give the same distributions.
    model = engine_model("tiny-small-vocab")
    prompt, other = prompts_of([6, 11], model.config.vocab_size, seed=7)

    def logprobs_of(sequences):
        core = EngineCore(model, EngineConfig(block_size=4))
        run_to_completion(core, sequences)
        return sequences[0].output_logprobs

    settings = SamplingSettings(max_tokens=30, temperature=0.0, logprobs=5, stop_token_ids=())
    alone = logprobs_of([Sequence("a", prompt, settings)])
    batched = logprobs_of([Sequence("a", prompt, settings), Sequence("b", other, settings)])
    assert [lp.top_token_ids for lp in alone] == [lp.top_token_ids for lp in batched]
    for a, b in zip(alone, batched):
        assert a.top_logprobs == pytest.approx(b.top_logprobs, abs=1e-5)
