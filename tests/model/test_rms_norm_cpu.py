"""The AVX-512 RMS-norm kernel for bf16 decode rows against torch's F.rms_norm on the same rows."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cluster.model.kernels import rms_norm_cpu
from cluster.model.layers import RMSNorm

pytestmark = pytest.mark.skipif(rms_norm_cpu._native() is None, reason="no AVX512_BF16 CPU or C compiler here")


@pytest.mark.parametrize("shape", [(1, 1, 2880), (8, 64), (3, 1, 16)], ids=["20b-decode", "batch-8", "tiny"])
def test_the_kernel_matches_torch_within_one_bf16_rounding(shape):
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(*shape, generator=gen) * 3).bfloat16()
    scale = torch.rand(shape[-1], generator=gen) + 0.5
    with torch.no_grad():
        got = rms_norm_cpu.rms_norm(x, scale, 1e-5)
        norm = RMSNorm(shape[-1], 1e-5)
        norm.scale.copy_(scale)
        through_the_layer = norm(x)
    expected = F.rms_norm(x.float(), scale.shape, scale, 1e-5)  # float32, before rounding
    assert got is not None and got.dtype == torch.bfloat16 and got.shape == x.shape
    assert torch.equal(through_the_layer, got)  # RMSNorm takes the kernel for these rows
    # only the order of the float32 sum of squares differs: each value within one bf16 rounding
    assert ((got.float() - expected).abs() <= 2 ** -8 * expected.abs() + 1e-6).all()
    assert (got == expected.bfloat16()).float().mean() > 0.99


def test_rows_the_kernel_does_not_take_keep_torchs_path():
    scale = torch.ones(64)
    assert rms_norm_cpu.rms_norm(torch.randn(2, 64), scale, 1e-5) is None  # float32
    assert rms_norm_cpu.rms_norm(torch.randn(100, 64).bfloat16(), scale, 1e-5) is None  # prefill rows
    assert rms_norm_cpu.rms_norm(torch.randn(64, 2).bfloat16().T, scale, 1e-5) is None  # not contiguous
    assert rms_norm_cpu.rms_norm(torch.randn(1, 48).bfloat16(), torch.ones(48), 1e-5) is not None
    assert rms_norm_cpu.rms_norm(torch.randn(1, 40).bfloat16(), torch.ones(40), 1e-5) is None  # H % 16
