"""The fused CPU MXFP4 kernel against unpack-then-matmul, and the MoE layer that uses it."""

from __future__ import annotations

import copy

import pytest
import torch

from cluster.model import moe as moe_module
from cluster.model import mxfp4
from cluster.model.checkpoint import load_model
from cluster.model.config import GptOssConfig
from cluster.model.kernels import mxfp4_cpu
from cluster.model.moe import MoE

pytestmark = pytest.mark.skipif(not mxfp4_cpu.available(), reason="neither MXFP4 CPU kernel runs here")
# Every kernel where it runs: the AVX-512 ones (bf16, native) need an AVX512 CPU (bf16: with AVX512_BF16)
# and a C compiler. The bf16 kernel takes bf16 activations: its tests round theirs to bf16 first.
KERNELS = [pytest.param("bf16", marks=pytest.mark.skipif(not mxfp4_cpu.bf16_available(),
                                                          reason="no AVX512_BF16 CPU or C compiler")),
           pytest.param("native", marks=pytest.mark.skipif(not mxfp4_cpu.native_available(),
                                                            reason="no AVX512 CPU or C compiler")),
           pytest.param("numba", marks=pytest.mark.skipif(mxfp4_cpu.numba is None, reason="no numba"))]


def _activations(x: torch.Tensor, kernel: str) -> torch.Tensor:
    return x.to(torch.bfloat16) if kernel == "bf16" else x


def _only(monkeypatch, kernel: str) -> None:
    """Make `kernel` the first that runs, as on a machine without the ones before it."""
    if kernel != "bf16":
        monkeypatch.setattr(mxfp4_cpu, "_native_bf16", False)
    if kernel == "numba":
        monkeypatch.setattr(mxfp4_cpu, "_native", False)


def _packed(gen: torch.Generator, E: int, R: int, C: int):
    blocks = torch.randint(0, 256, (E, R, C // 32, 16), dtype=torch.uint8, generator=gen)
    scales = torch.randint(117, 131, (E, R, C // 32), dtype=torch.uint8, generator=gen)
    return blocks, scales


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("tokens_per_expert", [[1, 1, 1], [3, 0, 5], [1, 7, 2], [11, 1, 9]],
                         ids=["decode", "skip", "batched", "more-than-a-register-group"])
# 3 blocks a row: the native kernel's two-block steps and its odd last block; 22: the bf16 kernel's
# 16-block spans for one token, then a group of four and a padded group of two; 90: gpt-oss-20b's rows
@pytest.mark.parametrize("C", [96, 704, 2880], ids=["3-blocks", "22-blocks", "90-blocks"])
def test_grouped_matmul_matches_unpack_then_matmul(tokens_per_expert, kernel, C):
    gen = torch.Generator().manual_seed(0)
    E, R = 4, 40
    blocks, scales = _packed(gen, E, R, C)
    scales[0, :3, :5] = 0  # the smallest scale, 2^-127 (a subnormal float)
    experts = torch.tensor([2, 0, 3])
    counts = torch.tensor(tokens_per_expert)
    offsets = torch.cat((torch.zeros(1, dtype=torch.long), counts.cumsum(0)))
    x = _activations(torch.randn(int(counts.sum()), C, generator=gen), kernel)

    got = mxfp4_cpu.grouped_matmul(blocks, scales, x, experts, offsets, kernel=kernel)

    dense = mxfp4.unpack(blocks, scales, torch.float64)
    expected = torch.cat([x[offsets[m]:offsets[m + 1]].double() @ dense[e].T for m, e in enumerate(experts.tolist())])
    assert got.dtype == torch.float32 and got.shape == (x.shape[0], R)
    # float32 products are exact (codes * power-of-two scales); only the summation order differs
    tol = 1e-5 * (x.double().abs() @ dense.abs().amax(dim=(0, 1)).unsqueeze(1)).max().item()
    assert (got.double() - expected).abs().max().item() <= tol


@pytest.mark.parametrize("kernel", KERNELS)
def test_grouped_matmul_is_exact_when_every_sum_is_representable(kernel):
    """Small integers times powers of two sum exactly in float32 in any order: then the kernel is bitwise."""
    gen = torch.Generator().manual_seed(1)
    blocks, scales = _packed(gen, 2, 16, 64)
    scales.fill_(127)  # scale 1
    x = torch.randint(-4, 5, (3, 64), generator=gen).float()
    experts, offsets = torch.tensor([1, 0]), torch.tensor([0, 1, 3])
    got = mxfp4_cpu.grouped_matmul(blocks, scales, _activations(x, kernel), experts, offsets, kernel=kernel)
    dense = mxfp4.unpack(blocks, scales)
    expected = torch.cat((x[:1] @ dense[1].T, x[1:] @ dense[0].T))
    assert torch.equal(got, expected)


@pytest.mark.parametrize("kernel", KERNELS)
def test_a_ranks_shard_of_experts_gives_the_whole_layers_rows(kernel):
    """An expert-parallel rank holds some of a layer's experts (parallel/sharding.py): a copy in its
    slot order, or a contiguous range, which is a view at a storage offset. Local slot indices into
    the shard must give, bitwise, what global indices give in the whole layer."""
    gen = torch.Generator().manual_seed(4)
    blocks, scales = _packed(gen, 6, 40, 96)
    x = _activations(torch.randn(5, 96, generator=gen), kernel)
    offsets = torch.tensor([0, 2, 3, 5])
    whole = mxfp4_cpu.grouped_matmul(blocks, scales, x, torch.tensor([4, 3, 5]), offsets, kernel=kernel)

    slots = [5, 3, 4]  # the rank's slots: experts 4, 3, 5 are its slots 2, 1, 0
    copied = mxfp4_cpu.grouped_matmul(blocks[slots].clone(), scales[slots].clone(), x, torch.tensor([2, 1, 0]),
                                      offsets, kernel=kernel)
    assert torch.equal(copied, whole)
    view_blocks, view_scales = blocks[3:], scales[3:]  # experts 3..5 as slots 0..2, no copy
    assert view_blocks.storage_offset() > 0 and view_blocks.is_contiguous()
    viewed = mxfp4_cpu.grouped_matmul(view_blocks, view_scales, x, torch.tensor([1, 0, 2]), offsets, kernel=kernel)
    assert torch.equal(viewed, whole)


def _random_packed_moe(config: GptOssConfig, dtype: torch.dtype) -> MoE:
    """A packed MoE layer with random MXFP4 bytes (scales near 1) and small random biases and router."""
    torch.manual_seed(0)
    layer = MoE(config, packed=True)
    gen = torch.Generator().manual_seed(2)
    for name in ("gate_up", "down"):
        b, s = _packed(gen, *getattr(layer, f"{name}_scales").shape[:2], getattr(layer, f"{name}_blocks").shape[2] * 32)
        getattr(layer, f"{name}_blocks").copy_(b)
        getattr(layer, f"{name}_scales").copy_(s - 4)
    with torch.no_grad():
        for p in (layer.gate_up_bias, layer.down_bias, layer.router.weight, layer.router.bias):
            p.normal_(0, 0.1)
    return layer.to(dtype)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 9])
def test_moe_fused_path_matches_the_unpacking_path(monkeypatch, kernel, dtype, tokens):
    _only(monkeypatch, kernel)
    config = GptOssConfig.from_preset("tiny-small-vocab")
    layer = _random_packed_moe(config, dtype)
    x = torch.randn(1, tokens, config.hidden_size).to(dtype)

    with torch.no_grad():
        monkeypatch.setattr(moe_module, "DENSE_CACHE_BYTES", 0)  # a "large" layer: the fused kernel
        assert layer.kernel(x, tokens * layer.top_k) == moe_module.FUSED
        fused = layer(x)
        monkeypatch.setattr(mxfp4_cpu, "available", lambda: False)  # the unpack-then-matmul path
        assert layer.kernel(x, tokens * layer.top_k) != moe_module.FUSED
        unpacked = layer(x)
        exact = copy.deepcopy(layer).double()(x.double())  # the same weights and input, in float64
    _assert_as_accurate(fused, unpacked, exact, dtype)


def _assert_as_accurate(fused: torch.Tensor, unpacked: torch.Tensor, exact: torch.Tensor, dtype: torch.dtype):
    """float32: within float32 rounding of the unpacking path; bf16: no less accurate than it against float64."""
    assert fused.dtype == unpacked.dtype == dtype
    if dtype == torch.float32:
        assert (fused - unpacked).abs().max().item() <= 1e-5 * unpacked.abs().max().item()
    else:  # both round the experts' outputs to bf16 at the same points: the fused path is no less accurate
        fused_err = (fused.double() - exact).abs().max().item()
        unpacked_err = (unpacked.double() - exact).abs().max().item()
        assert fused_err <= 1.25 * unpacked_err


def _count_kernel_calls(monkeypatch) -> list:
    """Record each call of mxfp4_cpu.grouped_matmul from now on (the list grows by one per call)."""
    calls, kernel = [], mxfp4_cpu.grouped_matmul
    monkeypatch.setattr(mxfp4_cpu, "grouped_matmul", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    return calls


# Two ranks' slots over tiny-small-vocab's 4 experts, in a local order unlike the global one: one copy
# of each expert, or expert 2 on both ranks (its tokens then alternate between the copies).
PLACEMENTS = [pytest.param(((3, 0), (1, 2)), id="one-copy-each"), pytest.param(((2, 0), (3, 1, 2)), id="replicated")]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("slots", PLACEMENTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 9])
def test_expert_parallel_ranks_run_their_shard_on_the_fused_kernel(monkeypatch, kernel, slots, dtype, tokens):
    """Each rank's ExpertParallelMoE (parallel/sharding.py) takes the fused kernel on its packed slots
    and matches its own unpack-then-matmul path; the ranks' partial outputs sum to the whole layer's."""
    from cluster.parallel.expert_map import ExpertPlacement
    from cluster.parallel.sharding import ExpertParallelMoE

    _only(monkeypatch, kernel)
    monkeypatch.setattr(moe_module, "DENSE_CACHE_BYTES", 0)  # "large" layers: no dense copy
    config = GptOssConfig.from_preset("tiny-small-vocab")
    layer = _random_packed_moe(config, dtype)
    placement = ExpertPlacement(config.num_local_experts, slots)
    x = torch.randn(1, tokens, config.hidden_size, generator=torch.Generator().manual_seed(5)).to(dtype)

    partials = []
    calls = _count_kernel_calls(monkeypatch)
    with torch.no_grad():
        whole = layer(x)
        x2 = x.reshape(tokens, -1)
        top_idx = torch.topk(layer.router(x2), layer.top_k, dim=-1).indices
        for rank in range(placement.num_ranks):
            shard = ExpertParallelMoE(layer, placement, rank, reduce=lambda t: None)
            rows, cols, local = shard.routing.local_pairs(top_idx)
            assert shard.kernel(x, 1) == moe_module.FUSED
            calls.clear()
            fused = shard(x)
            assert len(calls) == (2 if rows.numel() else 0)  # gate_up and down: the forward took the kernel
            with monkeypatch.context() as m:
                m.setattr(mxfp4_cpu, "available", lambda: False)
                assert shard.kernel(x, 1) != moe_module.FUSED
                unpacked = shard(x)
                exact = copy.deepcopy(shard).double()(x.double())
            _assert_as_accurate(fused, unpacked, exact, dtype)
            partials.append(fused)
            if slots == PLACEMENTS[0].values[0]:
                # one copy each: a rank groups each of its experts' tokens exactly as the whole layer does,
                # so every (token, expert) product is bitwise the whole layer's
                assert torch.equal(shard.fused_pairs(x2, rows, local), layer.fused_pairs(x2, rows, top_idx[rows, cols]))
    if dtype == torch.float32:  # the sum over ranks is the whole layer within float32 rounding
        total = torch.stack(partials).sum(0)
        assert (total - whole).abs().max().item() <= 1e-5 * whole.abs().max().item()


def test_fused_experts_keep_transformers_parity(checkpoint_dir, monkeypatch):
    """The whole model with the fused kernel against transformers' dequantized MXFP4 (greedy and logits)."""
    transformers = pytest.importorskip("transformers")
    monkeypatch.setattr(moe_module, "DENSE_CACHE_BYTES", 0)
    path = checkpoint_dir("tiny-small-vocab", True)
    ours = load_model(path)
    ref = transformers.GptOssForCausalLM.from_pretrained(
        path, dtype=torch.float32, quantization_config=transformers.Mxfp4Config(dequantize=True)).eval()
    ids = torch.randint(0, ours.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(ids).logits
        got = ours(ids, ours.new_cache(ids.shape[1] + 8))
        assert ours.blocks[0].mlp.kernel(ids.float(), ids.numel()) == moe_module.FUSED
    assert (got - expected).abs().max().item() < 1e-4


def test_numba_kernel_threads_follow_the_callers_torch_threads():
    """Under Ray an actor gives torch its CPU share; the kernel must not run more threads than that.
    (The native kernel is handed torch's count per call: nothing of it outlives the call to inspect.)"""
    numba = pytest.importorskip("numba")

    gen = torch.Generator().manual_seed(3)
    blocks, scales = _packed(gen, 1, 8, 32)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        mxfp4_cpu.grouped_matmul(blocks, scales, torch.randn(1, 32), torch.tensor([0]), torch.tensor([0, 1]),
                                 kernel="numba")
        assert numba.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
