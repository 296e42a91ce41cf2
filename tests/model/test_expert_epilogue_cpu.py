"""The bf16 expert MLP's epilogue kernels (biased SwiGLU; one token's biased, weighted sum of experts)
against float64, next to torch's bf16 ops they replace (model/moe.py)."""

from __future__ import annotations

import pytest
import torch

from cluster.model.kernels import expert_epilogue_cpu
from cluster.model.layers import swiglu

pytestmark = pytest.mark.skipif(expert_epilogue_cpu._native() is None,
                                reason="no AVX512_BF16 CPU or C compiler here")
ALPHA, LIMIT = 1.702, 7.0


@pytest.mark.parametrize("P,I", [(4, 2880), (9, 64), (1, 16)], ids=["20b-decode", "tiny-prefill", "one-chunk"])
def test_swiglu_bias_is_within_one_bf16_rounding_of_float64(P, I):
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(P, 2 * I, generator=gen) * 6  # beyond both clamps, and gates far below zero
    bias = (torch.randn(3, 2 * I, generator=gen) * 0.5).bfloat16()
    experts = torch.randint(0, 3, (P,), generator=gen)
    got = expert_epilogue_cpu.swiglu_bias(h, bias, experts, ALPHA, LIMIT)
    biased = (h + bias[experts]).bfloat16()  # the rounding point both paths share
    exact = swiglu(biased.double(), ALPHA, LIMIT)
    torch_bf16 = swiglu(biased, ALPHA, LIMIT)
    assert got is not None and got.dtype == torch.bfloat16 and got.shape == (P, I)
    err = (got.double() - exact).abs()
    assert (err <= 2 ** -8 * exact.abs() + 1e-30).all()  # one rounding of the float64 value
    assert err.max() <= (torch_bf16.double() - exact).abs().max()  # no less accurate than torch's bf16 ops


def test_combine_is_the_weighted_sum_of_the_biased_rounded_outputs():
    gen = torch.Generator().manual_seed(1)
    A, H = 4, 2880
    y = torch.randn(A, H, generator=gen)
    bias = (torch.randn(32, H, generator=gen) * 0.1).bfloat16()
    weights = torch.softmax(torch.randn(A, generator=gen), dim=0).bfloat16()  # the router's, in choice order
    experts, order = torch.tensor([3, 7, 20, 31]), torch.tensor([2, 0, 3, 1])  # sorted; row a was choice order[a]
    got = expert_epilogue_cpu.combine(y, bias, experts, weights, order)
    biased = (y + bias[experts]).bfloat16().double()
    exact = (weights[order].double().unsqueeze(1) * biased).sum(0, keepdim=True)
    assert got is not None and got.shape == (1, H) and got.dtype == torch.bfloat16
    assert ((got.double() - exact).abs() <= 2 ** -8 * exact.abs() + 1e-6).all()
    wrong_order = expert_epilogue_cpu.combine(y, bias, experts, weights, torch.arange(A))
    assert not torch.equal(wrong_order, got)  # each row takes its own choice's weight


def test_what_the_kernels_do_not_take_keeps_torchs_path():
    h, bias, experts = torch.randn(2, 64), torch.zeros(1, 64).bfloat16(), torch.zeros(2, dtype=torch.long)
    assert expert_epilogue_cpu.swiglu_bias(h, bias.float(), experts, ALPHA, LIMIT) is None  # float32 model
    assert expert_epilogue_cpu.swiglu_bias(torch.randn(2, 40), torch.zeros(1, 40).bfloat16(), experts,
                                           ALPHA, LIMIT) is None  # I = 20, not a multiple of 16
    weights = torch.ones(2).bfloat16()
    assert expert_epilogue_cpu.combine(h, bias, experts, weights.float(), torch.arange(2)) is None
