"""The AVX-512 bf16 linear kernel (batch-1 decode) against float64 and torch's own bf16 linear."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cluster.model.config import PRESETS, GptOssConfig
from cluster.model.kernels import bf16_cpu
from cluster.model.transformer import GptOssModel

pytestmark = pytest.mark.skipif(bf16_cpu._native() is None, reason="no AVX512 CPU or C compiler here")


KERNELS = [pytest.param(k, marks=pytest.mark.skipif(k == "bf16" and bf16_cpu._native_bf16() is None,
                                                     reason="no AVX512_BF16 here")) for k in bf16_cpu.KERNELS]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("shape", [(5120, 2880), (2880, 4096), (37, 64), (32, 2880), (9, 96)],
                         ids=["qkv-20b", "out-20b", "odd-rows", "router-20b", "C-not-a-multiple-of-64"])
def test_one_row_matches_float64_within_float32_rounding(shape, kernel):
    gen = torch.Generator().manual_seed(0)
    weight = (torch.randn(*shape, generator=gen) * shape[1] ** -0.5).bfloat16()
    bias = torch.randn(shape[0], generator=gen).bfloat16()
    x = torch.randn(1, 1, shape[1], generator=gen).bfloat16()
    with torch.no_grad():
        assert bf16_cpu.applies(x, weight)
        got = bf16_cpu.linear_float32(x, weight, bias, kernel=kernel)
        expected = x.double() @ weight.double().T + bias.double()
        # bf16 * bf16 is exact in float32: only the float32 summation order differs from float64
        tol = 1e-5 * (x.double().abs() @ weight.double().abs().T).max().item()
        assert got.shape == (1, 1, shape[0]) and got.dtype == torch.float32
        assert (got.double() - expected).abs().max().item() <= tol
        # in the model's dtype: within one bf16 rounding of torch's bf16 linear
        rounded, torch_bf16 = bf16_cpu.linear(x, weight, bias), F.linear(x, weight, bias)
        assert rounded.dtype == torch.bfloat16
        assert torch.allclose(rounded.float(), torch_bf16.float(), rtol=2 ** -7, atol=1e-2)


@pytest.mark.skipif(bf16_cpu._native_bf16() is None, reason="no AVX512_BF16 here")
def test_bf16_activations_take_the_bf16_kernel_and_it_refuses_float32_ones():
    weight, x = torch.randn(64, 64).bfloat16(), torch.randn(1, 64).bfloat16()
    with torch.no_grad():
        assert torch.equal(bf16_cpu.linear_float32(x, weight), bf16_cpu.linear_float32(x, weight, kernel="bf16"))
        with pytest.raises(ValueError, match="bf16 activations"):
            bf16_cpu.linear_float32(x.float(), weight, kernel="bf16")


@pytest.mark.skipif(bf16_cpu._native_bf16() is None, reason="no AVX512_BF16 here")
@pytest.mark.parametrize("with_bias", [True, False])
def test_the_bf16_layer_adds_its_bias_and_rounds_in_the_kernel_to_the_same_bits(with_bias):
    """linear() on bf16 writes bf16 with the bias added in the kernel: the bits of the float32 sum plus the
    bias, rounded once, as `linear_float32(...).to(bfloat16)` gives them (with ties, NaN and infinities)."""
    gen = torch.Generator().manual_seed(2)
    weight = (torch.randn(640, 2880, generator=gen) * 0.05).bfloat16()
    weight[0, :2] = torch.tensor([float("inf"), 1.0])  # an infinite output
    weight[1, 0] = float("nan")
    bias = (torch.randn(640, generator=gen) * 1e3).bfloat16() if with_bias else None
    x = torch.randn(1, 2880, generator=gen).bfloat16()
    with torch.no_grad():
        got = bf16_cpu.linear(x, weight, bias)
        expected = bf16_cpu.linear_float32(x, weight, bias, kernel="bf16").to(torch.bfloat16)
    assert got.dtype == torch.bfloat16 and got.isnan()[0, 1] and got[0, 0].isinf()
    assert torch.equal(got.nan_to_num(0.0).view(torch.int16), expected.nan_to_num(0.0).view(torch.int16))


def test_only_batch_1_bf16_inference_takes_the_kernel():
    weight = torch.randn(64, 64).bfloat16()
    assert bf16_cpu.applies(torch.randn(1, 64).bfloat16(), weight)
    assert not bf16_cpu.applies(torch.randn(2, 64).bfloat16(), weight)  # torch's GEMM wins from 2 rows
    assert not bf16_cpu.applies(torch.randn(1, 64), weight.float())
    assert not bf16_cpu.applies(torch.randn(1, 48).bfloat16(), torch.randn(64, 48).bfloat16())  # C % 32
    trained = torch.nn.Parameter(weight.clone())
    assert not bf16_cpu.applies(torch.randn(1, 64).bfloat16(), trained)  # autograd keeps torch's op
    with torch.no_grad():
        assert bf16_cpu.applies(torch.randn(1, 64).bfloat16(), trained)


def test_the_models_projections_on_the_kernel_run_as_module_calls():
    """Expert parallelism all-reduces attn.out's output in a forward hook (parallel/sharding.py): the
    kernel must sit inside the modules' forward, or the hook never runs and ranks diverge."""
    config = GptOssConfig(**{**PRESETS["tiny-small-vocab"], "head_dim": 32})  # every projection C % 32 == 0
    torch.manual_seed(0)
    model = GptOssModel(config).to(torch.bfloat16).eval()
    model.requires_grad_(False)  # inference weights, as loaded: autograd would keep torch's op
    seen = []
    for block in model.blocks:
        for name, linear in (("qkv", block.attn.qkv), ("out", block.attn.out), ("router", block.mlp.router)):
            assert bf16_cpu.applies(torch.zeros(1, linear.in_features, dtype=torch.bfloat16), linear.weight)
            linear.register_forward_hook(lambda _m, _i, out, name=name: seen.append((name, out.shape[-2])))
    model.unembedding.register_forward_hook(lambda _m, _i, out: out.zero_())  # in place, as the all-reduce
    with torch.inference_mode():
        logits = model(torch.tensor([[5]]), model.new_cache(4))
    assert seen == [("qkv", 1), ("out", 1), ("router", 1)] * config.num_hidden_layers
    assert not logits.any()
