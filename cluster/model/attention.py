"""Grouped-query attention with biases, learned sinks and an optional sliding window, plus its KV cache.

Shape letters are defined in layers.py (B, T, L, H, N, K, G, D).

A sink is one learned logit per query head. It joins each row of attention scores as an extra
column before the softmax and is dropped after it, so a head can put weight "nowhere" instead of
being forced to spread all of it over the keys. Sliding-window layers let a query at position p
see keys p - window + 1 .. p; full layers see every earlier key.
"""

from __future__ import annotations

import torch
from torch import nn

from cluster.model.config import GptOssConfig
from cluster.model.layers import apply_rotary


class KVCache:
    """Preallocated keys and values for every layer, [B, K, max_len, D] each, and how many are filled.

    `GptOssModel.forward` writes the new tokens at positions `length .. length + T - 1` of every
    layer and then advances `length`.
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
        self.qkv = nn.Linear(config.hidden_size, q_dim + 2 * kv_dim, bias=config.attention_bias)
        self.out = nn.Linear(q_dim, config.hidden_size, bias=config.attention_bias)
        self.sinks = nn.Parameter(torch.zeros(self.num_heads))

    def forward(self, x: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, start: int,
                cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        N, K, D = self.num_heads, self.num_kv_heads, self.head_dim
        G = N // K
        qk, v = self.qkv(x).split(((N + K) * D, K * D), dim=-1)
        qk = apply_rotary(qk.view(B, T, N + K, D).transpose(1, 2), cos, sin)  # q and k heads at once
        q, k = qk.split((N, K), dim=1)  # [B, N, T, D], [B, K, T, D]
        end = start + T
        k_cache[:, :, start:end] = k
        v_cache[:, :, start:end] = v.view(B, T, K, D).transpose(1, 2)

        # Keys any of the T queries may see; older ones are outside every query's window.
        lo = max(0, start - self.window + 1) if self.window else 0
        keys, values = k_cache[:, :, lo:end], v_cache[:, :, lo:end]  # [B, K, L, D]
        L = end - lo

        # Query head n = kv head (n // G), so [B, N, T, D] -> [B, K, G*T, D] lines each group up with its kv head.
        scores = torch.matmul(q.reshape(B, K, G * T, D), keys.transpose(-1, -2)) * self.sm_scale
        scores = scores.view(B, K, G, T, L)
        if T > 1:  # a single query (decode) sees every key in [lo, end) already
            q_pos = torch.arange(start, end, device=x.device)[:, None]
            k_pos = torch.arange(lo, end, device=x.device)[None, :]
            visible = k_pos <= q_pos
            if self.window:
                visible = visible & (q_pos - k_pos < self.window)
            scores = scores.masked_fill(~visible, float("-inf"))
        sinks = self.sinks.to(scores.dtype).view(1, K, G, 1, 1).expand(B, K, G, T, 1)
        probs = torch.softmax(torch.cat((scores, sinks), dim=-1), dim=-1)[..., :-1]  # [B, K, G, T, L]
        y = torch.matmul(probs.view(B, K, G * T, L), values)  # [B, K, G*T, D]
        y = y.view(B, K, G, T, D).permute(0, 3, 1, 2, 4).reshape(B, T, N * D)
        return self.out(y)

