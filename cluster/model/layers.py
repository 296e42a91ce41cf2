"""The small pieces of a gpt-oss block: RMSNorm, YaRN rotary embedding, clamped SwiGLU.

Dimension letters used in this package's shape comments:
    B batch, T new tokens this call, L cached + new tokens, H hidden size,
    N query heads, K key/value heads, G query heads per kv head (N / K), D head dim,
    E experts, A experts chosen per token (top-k), I expert intermediate size, V vocab, S tokens (B*T)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from cluster.model.config import GptOssConfig
from cluster.model.kernels import rms_norm_cpu, rotary_cpu


class RMSNorm(nn.Module):
    """x / rms(x) * scale, computed in float32 whatever the activation dtype (scale stays float32)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(dim, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (normed := rms_norm_cpu.rms_norm(x, self.scale, self.eps)) is not None:
            return normed  # bf16 decode rows on CPU: one kernel call
        return F.rms_norm(x.float(), self.scale.shape, self.scale.float(), self.eps).to(x.dtype)


def yarn_inv_freq(config: GptOssConfig) -> tuple[torch.Tensor, float]:
    """YaRN ("NTK by parts") inverse frequencies [D/2] and the attention concentration.

    Frequencies that rotate fewer than `beta_slow` times over the original context are
    interpolated (divided by `factor`), those rotating more than `beta_fast` times are kept, and a
    linear ramp blends the ones between. The concentration 0.1 ln(factor) + 1 multiplies cos and
    sin, so it scales both q and k.
    """
    rope = config.rope_scaling
    d, base, factor = config.head_dim, config.rope_theta, rope["factor"]
    original_ctx = rope["original_max_position_embeddings"]
    freq = base ** (torch.arange(0, d, 2, dtype=torch.float32) / d)  # [D/2]
    if factor <= 1.0:
        return 1.0 / freq, 1.0

    def correction_dim(rotations: float) -> float:
        return d * math.log(original_ctx / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(rope["beta_fast"]), correction_dim(rope["beta_slow"])
    if rope.get("truncate", False):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(d // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: extrapolate (original frequency), 0: interpolate
    inv_freq = (1.0 / (factor * freq)) * (1 - keep) + (1.0 / freq) * keep
    return inv_freq, 0.1 * math.log(factor) + 1.0


class RotaryEmbedding(nn.Module):
    """cos/sin tables [L, D/2] (concentration folded in), grown on demand, applied to halves of D."""

    def __init__(self, config: GptOssConfig):
        super().__init__()
        inv_freq, self.concentration = yarn_inv_freq(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        # (cos, sin) replaced as one tuple, so a thread decoding meanwhile never sees a mismatched pair
        self._tables: tuple[torch.Tensor, torch.Tensor] | None = None

    def ensure(self, length: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        tables = self._tables
        if (tables is None or tables[0].shape[0] < length or tables[0].dtype != dtype
                or tables[0].device != self.inv_freq.device):
            # Grow to a power of two: a cache that grows a token per step recomputes log(L) times, not L.
            size = max(256, 1 << (length - 1).bit_length())
            t = torch.arange(size, dtype=torch.float32, device=self.inv_freq.device)
            freqs = t[:, None] * self.inv_freq[None, :]  # [L, D/2]
            tables = ((freqs.cos() * self.concentration).to(dtype), (freqs.sin() * self.concentration).to(dtype))
            self._tables = tables
        return tables

    def tables(self, start: int, length: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self.ensure(start + length, dtype)
        return cos[start : start + length], sin[start : start + length]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [..., T, D] by position: the first and second halves of D form the pairs."""
    if (rotated := rotary_cpu.rotate(x, cos, sin)) is not None:
        return rotated  # bf16 decode on CPU: one kernel call, the same bits
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def swiglu(x: torch.Tensor, alpha: float = 1.702, limit: float = 7.0) -> torch.Tensor:
    """[..., 2I] -> [..., I]. Gate and linear are interleaved (even, odd); both clamped; linear + 1."""
    gate, linear = x[..., ::2], x[..., 1::2]
    gate = gate.clamp(max=limit)
    linear = linear.clamp(min=-limit, max=limit)
    return gate * torch.sigmoid(alpha * gate) * (linear + 1)
