"""Grouped-query attention with biases, learned sinks and an optional sliding window.

Shape letters are defined in layers.py (B, T, L, H, N, K, G, D).

A sink is one learned logit per query head. It joins each row of attention scores as an extra
column before the softmax and is dropped after it, so a head can put weight "nowhere" instead of
being forced to spread all of it over the keys. Sliding-window layers let a query at position p
see keys p - window + 1 .. p; full layers see every earlier key.

`Attention` projects, rotates (YaRN, layers.py) and projects back; where keys and values live is
the business of the cache object it is handed (the way gpt-fast's and vLLM's model files take a
cache): an `AttentionCache` stores the new keys/values and attends over the ones each query sees.
Two caches implement it: `KVCache` below (contiguous, one batch of equal-length sequences; the
plain decode loop) and `PagedKVCache` in paged.py (blocks, a ragged batch; what serves traffic).
Both use this file's `visible_keys`/`oldest_visible_key` for the window and `sink_attention` for the
math, so sinks, windows and GQA live here once.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from cluster.model.config import GptOssConfig
from cluster.model.kernels import attention_cpu, bf16_cpu
from cluster.model.layers import apply_rotary


def oldest_visible_key(position: int, window: int) -> int:
    """The oldest key position a query at `position` sees (window 0: full attention)."""
    return max(0, position - window + 1) if window else 0


def visible_keys(q_pos: torch.Tensor, key_pos: torch.Tensor, window: int) -> torch.Tensor:
    """Causal (and windowed) visibility, broadcast over q_pos [..., T, 1] and key_pos [..., 1, L] -> bool."""
    visible = key_pos <= q_pos
    if window:
        visible &= q_pos - key_pos < window
    return visible


def sink_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, sinks: torch.Tensor,
                   sm_scale: float, visible: torch.Tensor | None) -> torch.Tensor:
    """q [B, N, T, D], keys/values [B, K, L, D], visible bool broadcastable to [B, 1, 1, T, L]
    (None: every key) -> [B, T, N*D]: softmax over the visible keys plus each head's sink column."""
    if (decoded := attention_cpu.decode(q, keys, values, sinks, sm_scale, visible)) is not None:
        return decoded  # one query token, bf16 on CPU: one kernel call
    B, N, T, D = q.shape
    K, L = keys.shape[1], keys.shape[2]
    G = N // K
    # Query head n = kv head (n // G), so [B, N, T, D] -> [B, K, G*T, D] lines each group up with its kv head.
    scores = torch.matmul(q.reshape(B, K, G * T, D), keys.transpose(-1, -2)) * sm_scale
    scores = scores.view(B, K, G, T, L)
    if visible is not None:
        scores = scores.masked_fill(~visible, float("-inf"))
    sinks = sinks.to(scores.dtype).view(1, K, G, 1, 1).expand(B, K, G, T, 1)
    probs = torch.softmax(torch.cat((scores, sinks), dim=-1), dim=-1)[..., :-1]  # [B, K, G, T, L]
    y = torch.matmul(probs.reshape(B, K, G * T, L), values)  # [B, K, G*T, D]
    return y.view(B, K, G, T, D).permute(0, 3, 1, 2, 4).reshape(B, T, N * D)


class AttentionCache(Protocol):
    """One layer's keys and values, as `Attention.forward` uses them."""

    def attend(self, attn: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Store the new k [..., K, T, D] and v [..., T, K, D], then attend with q [..., N, T, D]
        over the keys each query sees -> [..., T, N*D] (before the out projection)."""


class Attention(nn.Module):
    def __init__(self, config: GptOssConfig, layer_idx: int):
        super().__init__()
        self.num_heads = config.num_attention_heads  # N
        self.num_kv_heads = config.num_key_value_heads  # K
        self.head_dim = config.head_dim  # D
        sliding = config.layer_types[layer_idx] == "sliding_attention"
        self.window = config.sliding_window if sliding else 0  # 0: full attention
        self.sm_scale = self.head_dim**-0.5
        q_dim, kv_dim = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        # q, k and v projections fused into one matmul; rows are [q | k | v] as in the original layout.
        self.qkv = bf16_cpu.Linear(config.hidden_size, q_dim + 2 * kv_dim, bias=config.attention_bias)
        self.out = bf16_cpu.Linear(q_dim, config.hidden_size, bias=config.attention_bias)
        self.sinks = nn.Parameter(torch.zeros(self.num_heads))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: AttentionCache) -> torch.Tensor:
        """x [..., T, H] (one leading B, or none for a flat ragged batch), cos/sin [T, D/2] -> [..., T, H]."""
        *lead, T, _ = x.shape
        N, K, D = self.num_heads, self.num_kv_heads, self.head_dim
        qk, v = self.qkv(x).split(((N + K) * D, K * D), dim=-1)
        qk = apply_rotary(qk.view(*lead, T, N + K, D).transpose(-3, -2), cos, sin)  # q and k heads at once
        q, k = qk.split((N, K), dim=-3)  # [..., N, T, D], [..., K, T, D]
        return self.out(cache.attend(self, q, k, v.view(*lead, T, K, D)))


class KVCache:
    """Preallocated keys and values for every layer, [B, K, max_len, D] each, and how many are filled.

    `GptOssModel.forward` writes the new tokens at positions `length .. length + T - 1` of every
    layer (through `layers(length)`) and then advances `length`.
    """

    def __init__(self, config: GptOssConfig, max_len: int, batch_size: int, dtype: torch.dtype,
                 device: torch.device | str):
        shape = (batch_size, config.num_key_value_heads, max_len, config.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.max_len = max_len
        self.batch_size = batch_size
        self.length = 0

    def reset(self) -> None:
        self.length = 0

    def layers(self, start: int) -> list[ContiguousLayerCache]:
        """Each layer's cache for new tokens at positions start, start + 1, ..."""
        return [ContiguousLayerCache(k, v, start) for k, v in zip(self.k, self.v)]


class ContiguousLayerCache:
    """An `AttentionCache` over one layer of `KVCache`: the new tokens go at `start`; every sequence of
    the batch has the same length."""

    def __init__(self, k_cache: torch.Tensor, v_cache: torch.Tensor, start: int):
        self.k_cache, self.v_cache, self.start = k_cache, v_cache, start

    def attend(self, attn: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        T = k.shape[2]
        start, end = self.start, self.start + T
        self.k_cache[:, :, start:end] = k
        self.v_cache[:, :, start:end] = v.transpose(1, 2)
        lo = oldest_visible_key(start, attn.window)  # keys older than this are outside every query's window
        visible = None  # a single query (decode) sees every key in [lo, end) already
        if T > 1:
            q_pos = torch.arange(start, end, device=q.device)[:, None]
            k_pos = torch.arange(lo, end, device=q.device)[None, :]
            visible = visible_keys(q_pos, k_pos, attn.window)
        keys, values = self.k_cache[:, :, lo:end], self.v_cache[:, :, lo:end]  # [B, K, L, D]
        return sink_attention(q, keys, values, attn.sinks, attn.sm_scale, visible)
