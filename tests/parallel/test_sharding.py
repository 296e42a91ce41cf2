"""shard_model_ in one process: N ranks in threads, a SUM all-reduce over a barrier, against the whole model.

No Ray and no gloo here (test_ep_parity.py has those): this checks the sharding itself, on each
CPU path the model takes: bf16 weights at batch 1 run the AVX-512 bf16 kernel (kernels/bf16_cpu.py)
in attention and the unembedding, float32 runs torch's; experts run on a small layer's dense copy
(gathered) or, as in a large packed layer, on the fused MXFP4 kernel (kernels/mxfp4_cpu.py). Both must still reach the all-reduce hook
on attn.out: bypassing it left every rank with part of the attention output.
"""

from __future__ import annotations

import threading

import pytest
import torch

from cluster.model.checkpoint import load_model, write_checkpoint
from cluster.model.config import PRESETS, GptOssConfig
from cluster.model import moe as moe_module
from cluster.model.kernels import bf16_cpu, mxfp4_cpu
from cluster.parallel.expert_map import plan_placement
from cluster.parallel.sharding import ExpertParallelMoE, shard_model_

WORLD = 2
# the small test shape with head_dim 32: a rank's 3 query heads are 96 columns of attn.out, so the
# bf16 kernel (C % 32 == 0) applies to every projection of a shard
CONFIG = GptOssConfig(**{**PRESETS["tiny-small-vocab"], "head_dim": 32})


class SumOverThreads:
    """An in-place SUM all-reduce among WORLD threads, each passing its own tensor."""

    def __init__(self, world: int):
        self.slots: list[torch.Tensor | None] = [None] * world
        self.barrier = threading.Barrier(world, timeout=60)

    def for_rank(self, rank: int):
        def reduce(t: torch.Tensor) -> None:
            self.slots[rank] = t
            self.barrier.wait()
            total = torch.stack(self.slots).sum(0)  # same order on every rank: identical results
            self.barrier.wait()  # everyone has read every slot before any is overwritten
            t.copy_(total)
        return reduce


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("shard-mxfp4")
    write_checkpoint(CONFIG, out, seed=3, mxfp4=True)
    return out


def _decode(model, prompt, new_tokens, forced=None):
    """Prefill `prompt`, then greedy decode one token at a time -> (tokens, last-position logits per step).
    With `forced` (a token list), step i is fed forced[i] instead of its own choice (teacher forcing)."""
    cache = model.new_cache(len(prompt) + new_tokens)
    if model.config.num_key_value_heads != model.blocks[0].attn.num_kv_heads:  # a shard: its kv heads only
        K = model.blocks[0].attn.num_kv_heads
        cache.k = [k[:, :K].contiguous() for k in cache.k]
        cache.v = [v[:, :K].contiguous() for v in cache.v]
    ids, tokens, logits = torch.tensor([prompt]), [], []
    with torch.inference_mode():
        for _ in range(new_tokens):
            step = model(ids, cache, last_only=True)[0, -1]
            logits.append(step)
            tokens.append(int(step.argmax()))
            ids = torch.tensor([[tokens[-1] if forced is None else forced[len(tokens) - 1]]])
    return tokens, logits


@pytest.mark.parametrize("experts", ["dense-copy", "mxfp4-kernel"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "float32"])
def test_shards_in_threads_decode_like_the_whole_model(checkpoint, dtype, experts, monkeypatch):
    if experts == "mxfp4-kernel":
        if not mxfp4_cpu.available():
            pytest.skip("neither MXFP4 CPU kernel runs here")
        monkeypatch.setattr(moe_module, "DENSE_CACHE_BYTES", 0)  # as at 20b: no dense copy, the fused kernel
    fused_calls = []  # list.append is atomic: the ranks' threads may record at once
    fused_pairs = ExpertParallelMoE.fused_pairs
    monkeypatch.setattr(ExpertParallelMoE, "fused_pairs",
                        lambda self, *a: fused_calls.append(self) or fused_pairs(self, *a))
    prompt = torch.randint(0, CONFIG.vocab_size, (7,), generator=torch.Generator().manual_seed(0)).tolist()
    whole_tokens, whole_logits = _decode(load_model(checkpoint, dtype=dtype), prompt, 5)

    placements = [plan_placement([1.0] * CONFIG.num_local_experts, WORLD)] * CONFIG.num_hidden_layers
    reduce = SumOverThreads(WORLD)
    shards = []
    for rank in range(WORLD):
        model = load_model(checkpoint, dtype=dtype)
        shard_model_(model, rank, WORLD, placements, reduce.for_rank(rank))
        shards.append(model)
    attn = shards[0].blocks[0].attn
    assert attn.num_heads == CONFIG.num_attention_heads // WORLD
    if dtype == torch.bfloat16 and bf16_cpu._native() is not None:  # the kernel really runs in the shards
        assert bf16_cpu.applies(torch.zeros(1, attn.out.in_features, dtype=dtype), attn.out.weight)
    expected_kernel = moe_module.FUSED if experts == "mxfp4-kernel" else moe_module.GATHERED
    for model in shards:  # the kernel the whole model's MoE takes, on each rank's slots too
        row = torch.zeros(1, CONFIG.hidden_size, dtype=dtype)
        assert model.blocks[0].mlp.kernel(row, 1) == expected_kernel

    results: list = [None] * WORLD
    errors: list[BaseException] = []

    def run(rank):
        try:
            # bf16: fed the whole model's tokens, so one near-tie cannot make the rest incomparable
            results[rank] = _decode(shards[rank], prompt, 5, whole_tokens if dtype == torch.bfloat16 else None)
        except BaseException as e:  # noqa: BLE001 - re-raised below, after both threads end
            errors.append(e)
            reduce.barrier.abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in range(WORLD)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]

    assert bool(fused_calls) == (experts == "mxfp4-kernel")
    for tokens, logits in results:
        if dtype == torch.float32:
            assert tokens == whole_tokens
        for token, got, expected in zip(tokens, logits, whole_logits):
            if dtype == torch.float32:
                torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
            else:
                # Each rank's out projection and expert outputs round to bf16 before the sum: the logits
                # are a few bf16 roundings apart, and greedy picks the whole model's token unless its
                # margin is within those roundings (random weights have such near-ties: a 2-ulp margin
                # flipped with the fused kernel, an exact tie held with the dense copy). So the shard's
                # token must be one the whole model rates within 4 ulps of its best.
                assert (got - expected).norm() <= 0.02 * expected.norm()
                ulp = torch.finfo(torch.bfloat16).eps * expected.abs().max().item()
                assert expected[token].item() >= expected.max().item() - 4 * ulp


@pytest.mark.parametrize("slots", [((3, 0), (1, 2)), ((2, 0), (3, 1, 2))], ids=["one-copy-each", "replicated"])
def test_ranks_loop_over_their_experts_for_a_prefill_sized_batch(slots, monkeypatch):
    """Many (token, expert) pairs on dense experts (a GPU, or no MXFP4 kernel): each rank runs LOOPED
    over its slots, one matmul per local expert and no gathered weight copies, as the whole layer
    does; the ranks' partial outputs sum to the whole layer's, also when an expert has two copies and
    its tokens alternate between them."""
    from cluster.parallel.expert_map import ExpertPlacement

    torch.manual_seed(0)
    layer = moe_module.MoE(CONFIG)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.05)
    x = torch.randn(1, 96, CONFIG.hidden_size, generator=torch.Generator().manual_seed(6))
    pairs = 96 * layer.top_k
    assert layer.kernel(x, pairs) == moe_module.LOOPED

    def no_gathering(*args):
        raise AssertionError("a prefill-sized batch gathered its experts' weights")

    monkeypatch.setattr(moe_module.ExpertWeights, "gathered_pairs", no_gathering)
    placement = ExpertPlacement(CONFIG.num_local_experts, slots)
    with torch.no_grad():
        whole = layer(x)
        partials = []
        for rank in range(placement.num_ranks):
            shard = ExpertParallelMoE(layer, placement, rank, reduce=lambda t: None)
            assert shard.kernel(x, pairs // placement.num_ranks) == moe_module.LOOPED
            partials.append(shard(x))
    assert all(p.abs().sum() > 0 for p in partials)  # both ranks computed some of the pairs
    torch.testing.assert_close(torch.stack(partials).sum(0), whole, rtol=0, atol=1e-5 * whole.abs().max().item())
