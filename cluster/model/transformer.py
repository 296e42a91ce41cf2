"""gpt-oss: token embedding, a stack of (attention, MoE) blocks, final norm, unembedding.

Shape letters are defined in layers.py. Read top to bottom: `Block` then `GptOssModel`.
No parallelism lives here; sharding wraps this model from the outside. `run_blocks` is the one
forward through the layers: the plain decode loop (`forward`, with the contiguous KVCache) and the
serving engine (paged.py, with the paged cache) both call it; only the cache objects differ.
"""

from __future__ import annotations

import torch
from torch import nn

from cluster.model.attention import Attention, AttentionCache, KVCache
from cluster.model.config import GptOssConfig
from cluster.model.kernels import bf16_cpu
from cluster.model.layers import RMSNorm, RotaryEmbedding
from cluster.model.moe import MoE


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + moe(norm(x))."""

    def __init__(self, config: GptOssConfig, layer_idx: int, *, packed_experts: bool = False):
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = Attention(config, layer_idx)
        self.mlp_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MoE(config, packed=packed_experts)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: AttentionCache) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, cache)
        return x + self.mlp(self.mlp_norm(x))


class GptOssModel(nn.Module):
    def __init__(self, config: GptOssConfig, *, packed_experts: bool = False):
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.blocks = nn.ModuleList(
            Block(config, i, packed_experts=packed_experts) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.unembedding = bf16_cpu.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rope = RotaryEmbedding(config)

    @property
    def dtype(self) -> torch.dtype:
        return self.embedding.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embedding.weight.device

    def new_cache(self, max_len: int, batch_size: int = 1) -> KVCache:
        if not 0 < max_len <= self.config.max_position_embeddings:
            raise ValueError(f"max_len must be in 1..{self.config.max_position_embeddings}, got {max_len}")
        self.rope.ensure(max_len, self.dtype)
        return KVCache(self.config, max_len, batch_size, self.dtype, self.device)

    def forward(self, input_ids: torch.Tensor, cache: KVCache, *, last_only: bool = False) -> torch.Tensor:
        """input_ids [B, T] -> float32 logits [B, T, V] (or [B, 1, V] with `last_only`).

        Appends the T tokens to `cache`; their positions continue from `cache.length`.
        """
        B, T = input_ids.shape
        start = cache.length
        if start + T > cache.max_len:
            raise ValueError(f"KV cache holds {cache.max_len} tokens; {start} cached + {T} new do not fit")
        if B != cache.batch_size:
            raise ValueError(f"batch of {B} does not match the cache's batch size {cache.batch_size}")
        cos, sin = self.rope.tables(start, T, self.dtype)  # [T, D/2]
        x = self.run_blocks(input_ids, cos, sin, cache.layers(start))  # [B, T, H]
        cache.length = start + T
        if last_only:
            x = x[:, -1:]
        return self.unembedding(self.norm(x)).float()  # [B, T, V]

    def run_blocks(self, input_ids: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   caches: list[AttentionCache]) -> torch.Tensor:
        """input_ids [..., T] -> hidden states [..., T, H] after every block (before the final norm).

        cos/sin [T, D/2] are the rotary tables of the T tokens' positions; `caches[l]` stores layer
        l's keys and values and attends over them (attention.AttentionCache).
        """
        x = self.embedding(input_ids)
        for block, cache in zip(self.blocks, caches):
            x = block(x, cos, sin, cache)
        return x

    def dequantize_experts_(self) -> None:
        """Unpack every layer's MXFP4 experts into dense weights (faster decode, ~4x the memory)."""
        for block in self.blocks:
            block.mlp.dequantize_()
