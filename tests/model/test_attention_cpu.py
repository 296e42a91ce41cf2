"""The AVX-512 decode-attention kernel (one query token, bf16 keys and values, sinks) against float64,
next to torch's bf16 path that it replaces (cluster/model/attention.sink_attention)."""

from __future__ import annotations

import pytest
import torch

from cluster.model import attention
from cluster.model.kernels import attention_cpu

pytestmark = pytest.mark.skipif(attention_cpu._native() is None, reason="no AVX512_BF16 CPU or C compiler here")


def _case(B, N, K, L, D, *, masked: bool, layout: str, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, N, 1, D, generator=gen).bfloat16()
    if layout == "contiguous-cache":  # KVCache [B, K, max_len, D], read as a slice of its positions
        k_cache, v_cache = (torch.randn(B, K, L + 9, D, generator=gen).bfloat16() for _ in range(2))
        keys, values = k_cache[:, :, 4:4 + L], v_cache[:, :, 4:4 + L]
    else:  # the paged cache's gathered keys [B, L, K, D], transposed as paged._attend passes them
        keys, values = (torch.randn(B, L, K, D, generator=gen).bfloat16().transpose(1, 2) for _ in range(2))
    sinks = torch.randn(N, generator=gen).bfloat16()
    visible = None
    if masked:
        visible = torch.rand(B, L, generator=gen) < 0.6
        visible[:, -1] = True  # every sequence sees its own newest key
        visible = visible.view(B, 1, 1, 1, L)
    return q, keys, values, sinks, D ** -0.5, visible


@pytest.mark.parametrize("layout", ["contiguous-cache", "paged"])
@pytest.mark.parametrize("B,N,K,L,D,masked", [
    (1, 64, 8, 300, 64, False),  # gpt-oss-20b's heads, batch 1
    (3, 4, 2, 17, 32, True),  # gpt-oss-tiny's head_dim, a masked decode batch
    (2, 4, 2, 5, 16, False),  # tiny preset
    (1, 8, 8, 1, 64, False),  # one key: the first decode step
])
def test_decode_is_as_accurate_as_torchs_bf16_path(B, N, K, L, D, masked, layout, monkeypatch):
    q, keys, values, sinks, scale, visible = _case(B, N, K, L, D, masked=masked, layout=layout)
    with torch.no_grad():
        assert attention_cpu.decode(q, keys, values, sinks, scale, visible) is not None  # the kernel takes it
        got = attention.sink_attention(q, keys, values, sinks, scale, visible)
        exact = attention.sink_attention(q.double(), keys.double(), values.double(), sinks.double(), scale, visible)
        monkeypatch.setattr(attention_cpu, "_native", lambda: None)
        torch_bf16 = attention.sink_attention(q, keys, values, sinks, scale, visible)
    assert got.shape == torch_bf16.shape == (B, 1, N * D) and got.dtype == torch.bfloat16
    kernel_err = (got.double() - exact).abs().max().item()
    torch_err = (torch_bf16.double() - exact).abs().max().item()
    assert kernel_err <= max(torch_err, 2 ** -8 * exact.abs().max().item())  # within one bf16 rounding


def test_hidden_keys_do_not_count():
    """A key the mask hides changes nothing, whatever its value; the sink stays in the denominator."""
    q, keys, values, sinks, scale, _ = _case(1, 4, 2, 6, 32, masked=False, layout="paged")
    visible = torch.tensor([True, False, True, True, False, True]).view(1, 1, 1, 1, 6)
    with torch.no_grad():
        before = attention_cpu.decode(q, keys, values, sinks, scale, visible)
        keys[:, :, 1], values[:, :, 4] = 1e4, -1e4
        after = attention_cpu.decode(q, keys, values, sinks, scale, visible)
    assert before is not None and torch.equal(before, after)


def test_what_the_kernel_does_not_take_keeps_torchs_path():
    q, keys, values, sinks, scale, visible = _case(1, 4, 2, 6, 32, masked=False, layout="paged")
    assert attention_cpu.decode(q.float(), keys.float(), values.float(), sinks, scale, visible) is None  # float32
    two_queries = torch.cat((q, q), dim=2)
    assert attention_cpu.decode(two_queries, keys, values, sinks, scale, visible) is None  # prefill
    trained = q.clone().requires_grad_()
    assert attention_cpu.decode(trained, keys, values, sinks, scale, visible) is None  # autograd
