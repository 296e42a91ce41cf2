"""The AVX-512 rotary kernel for bf16 decode heads against torch's ops in layers.apply_rotary: the same bits."""

from __future__ import annotations

import pytest
import torch

from cluster.model.config import GptOssConfig
from cluster.model.kernels import rotary_cpu
from cluster.model.layers import RotaryEmbedding, apply_rotary

pytestmark = pytest.mark.skipif(rotary_cpu._native() is None, reason="no AVX512BW CPU or C compiler here")


def _torch_rotary(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def _heads_as_the_model_views_them(B: int, T: int, heads: int, D: int, gen) -> torch.Tensor:
    """[B, heads, T, D] strided as Attention.forward's q and k heads of one qkv row (v's columns after them)."""
    qkv = (torch.randn(B, T, (heads + 4) * D, generator=gen) * 4).bfloat16()
    return qkv[..., :heads * D].view(B, T, heads, D).transpose(-3, -2)


@pytest.mark.parametrize(("preset", "B", "T"), [("gpt-oss-20b", 1, 1), ("gpt-oss-20b", 3, 2), ("tiny", 1, 1), ("gpt-oss-tiny", 2, 5)])
def test_the_kernel_gives_torchs_bits_at_real_positions(preset, B, T):
    config = GptOssConfig.from_preset(preset)
    heads, D = config.num_attention_heads + config.num_key_value_heads, config.head_dim
    gen = torch.Generator().manual_seed(0)
    x = _heads_as_the_model_views_them(B, T, heads, D, gen)
    cos, sin = RotaryEmbedding(config).tables(3000, T, torch.bfloat16)  # YaRN tables far into a context
    with torch.no_grad():
        got = apply_rotary(x, cos, sin)
        assert got is not None and rotary_cpu.rotate(x, cos, sin) is not None  # the kernel's path
        expected = _torch_rotary(x, cos, sin)
    assert got.shape == expected.shape and torch.equal(got.view(torch.int16), expected.view(torch.int16))


def test_a_flat_ragged_batch_and_special_values_keep_torchs_bits():
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(9, 4, 64, generator=gen) * 1e3).bfloat16()  # [heads, T, D]: the paged batch's layout
    x[0, 0, :4] = torch.tensor([float("inf"), -float("inf"), 0.0, -0.0])
    x[1, 1, 5] = float("nan")
    cos, sin = (torch.rand(4, 32, generator=gen) * 2 - 1).bfloat16(), (torch.rand(4, 32, generator=gen) * 2 - 1).bfloat16()
    with torch.no_grad():
        got, expected = rotary_cpu.rotate(x, cos, sin), _torch_rotary(x, cos, sin)
    assert torch.equal(got.isnan(), expected.isnan())
    assert torch.equal(got.nan_to_num(0.0).view(torch.int16), expected.nan_to_num(0.0).view(torch.int16))


def test_what_the_kernel_does_not_take_keeps_torchs_path():
    cos, sin = torch.ones(1, 8).bfloat16(), torch.zeros(1, 8).bfloat16()
    assert rotary_cpu.rotate(torch.randn(1, 4, 1, 16), cos.float(), sin.float()) is None  # float32
    assert rotary_cpu.rotate(torch.randn(1, 4, 100, 16).bfloat16(), torch.ones(100, 8).bfloat16(),
                             torch.zeros(100, 8).bfloat16()) is None  # prefill positions
    x = torch.randn(1, 4, 1, 16, requires_grad=True)
    with torch.enable_grad():
        assert rotary_cpu.rotate(x.bfloat16(), cos, sin) is None  # autograd
