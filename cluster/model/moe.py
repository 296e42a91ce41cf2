"""Mixture of experts: a top-k router over local experts, each a clamped-SwiGLU MLP. No collectives.

Shape letters are defined in layers.py (S tokens, H, E experts, A chosen per token, I).

The router takes the top A of its E logits and softmaxes over those A only. Each expert is
    gate_up [2I, H] (+ bias) -> swiglu -> [I] -> down [H, I] (+ bias)
with gate and linear rows interleaved in gate_up. Expert weights are [E, out, in], the row layout
of MXFP4. How they are stored and which kernel applies them is decided in one place,
`ExpertWeights`, which both this file's `MoE` and the expert-parallel MoE (parallel/sharding.py) are.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cluster.model import mxfp4
from cluster.model.config import GptOssConfig
from cluster.model.kernels import bf16_cpu, expert_epilogue_cpu, mxfp4_cpu
from cluster.model.layers import swiglu

# Up to this many gathered weight elements per call, the chosen experts are gathered into one
# batched matmul (no Python loop, no host sync); beyond it, a loop over experts avoids the copy.
GATHER_LIMIT = 1 << 19  # tiny preset on CPU: gathering wins up to ~10 tokens, looping beyond (measured)

# A packed layer whose experts take at most this many bytes dense is unpacked once, on first use,
# and the copy kept beside the packed bytes: tiny models decode at dense speed, big ones stay at
# 4.25 bits per weight and unpack only the experts each token chose.
DENSE_CACHE_BYTES = 32 << 20

PACKED_TENSORS = ("gate_up_blocks", "gate_up_scales", "down_blocks", "down_scales", "gate_up_bias", "down_bias")
DENSE_TENSORS = ("gate_up_weight", "down_weight", "gate_up_bias", "down_bias")

FUSED, GATHERED, LOOPED = "fused", "gathered", "looped"  # ExpertWeights.kernel


class ExpertWeights(nn.Module):
    """The strategy for a layer's expert matrices: three representations, two kernels, one place.

    Representations (`packed`, and whether `_dense` is filled):
      dense            gate_up_weight [X, 2I, H], down_weight [X, H, I] in the model dtype
                       (bf16 checkpoints, or MXFP4 unpacked at load: `dequantize_`)
      packed           MXFP4 gate_up/down blocks [X, rows, in/32, 16] and scales [X, rows, in/32],
                       uint8; each call unpacks only the experts it is asked for
      packed + copy    a packed layer whose X experts take at most DENSE_CACHE_BYTES dense is
                       unpacked whole on first use and the copy kept beside the packed bytes
    X is the number of experts held here (E, or a rank's slots under expert parallelism).
    `expert_weights(idx, dtype)` hides the difference: dense matrices of the experts `idx`.

    Kernels (`kernel(x, pairs)` chooses): FUSED multiplies packed experts that have no dense copy
    in place, on CPU (kernels/mxfp4_cpu.py); else GATHERED copies the chosen (token, expert) pairs'
    matrices into one batched matmul (no Python loop, no host sync: small batches, decode) up to
    GATHER_LIMIT gathered weight elements; beyond it LOOPED runs one matmul per expert used over
    its tokens (large batches, prefill: no weight copies). All three work on (token, expert) pairs
    (`fused_pairs`, `gathered_pairs`, `add_looped_pairs_`), which the expert-parallel MoE also calls on its shard;
    subclasses set `alpha` and `limit` (the clamped SwiGLU's).
    """

    def _init_experts(self, X: int, H: int, I: int, packed: bool) -> None:
        self.packed = packed
        if packed:
            u8 = torch.uint8
            self.register_buffer("gate_up_blocks", torch.zeros(X, 2 * I, H // 32, 16, dtype=u8))
            self.register_buffer("gate_up_scales", torch.zeros(X, 2 * I, H // 32, dtype=u8))
            self.register_buffer("down_blocks", torch.zeros(X, H, I // 32, 16, dtype=u8))
            self.register_buffer("down_scales", torch.zeros(X, H, I // 32, dtype=u8))
        else:
            self.gate_up_weight = nn.Parameter(torch.zeros(X, 2 * I, H))
            self.down_weight = nn.Parameter(torch.zeros(X, H, I))
        self.gate_up_bias = nn.Parameter(torch.zeros(X, 2 * I))
        self.down_bias = nn.Parameter(torch.zeros(X, H))
        self._matrix_elements = 3 * I * H  # gate_up + down, per expert
        self._dense: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def tensor_names(self) -> tuple[str, ...]:
        """The per-expert tensors of the current representation (each [X, ...])."""
        return PACKED_TENSORS if self.packed else DENSE_TENSORS

    def expert_bytes(self) -> int:
        """Resident bytes of the expert tensors (packed as loaded; a dense copy not counted)."""
        return sum(getattr(self, n).numel() * getattr(self, n).element_size() for n in self.tensor_names)

    def kernel(self, x: torch.Tensor, pairs: int) -> str:
        """The kernel for `pairs` (token, expert) products of the activations `x`: FUSED, GATHERED or LOOPED."""
        if (self.packed and x.device.type == "cpu" and mxfp4_cpu.available()
                and self._small_dense_copy(x.dtype) is None):
            return FUSED
        return GATHERED if pairs * self._matrix_elements <= GATHER_LIMIT else LOOPED

    def expert_weights(self, idx: torch.Tensor | int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """gate_up [..., 2I, H] and down [..., H, I] of the held experts `idx`, dense in `dtype`."""
        if not self.packed:
            return self.gate_up_weight[idx], self.down_weight[idx]
        dense = self._small_dense_copy(dtype)
        if dense is not None:
            return dense[0][idx], dense[1][idx]
        return (mxfp4.unpack(self.gate_up_blocks[idx], self.gate_up_scales[idx], dtype),
                mxfp4.unpack(self.down_blocks[idx], self.down_scales[idx], dtype))

    def _small_dense_copy(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor] | None:
        dense = self._dense
        if dense is not None and dense[0].dtype == dtype and dense[0].device == self.gate_up_blocks.device:
            return dense
        if self.gate_up_blocks.shape[0] * self._matrix_elements * dtype.itemsize > DENSE_CACHE_BYTES:
            return None
        dense = (mxfp4.unpack(self.gate_up_blocks, self.gate_up_scales, dtype),
                 mxfp4.unpack(self.down_blocks, self.down_scales, dtype))
        self._dense = dense  # one assignment: threads decoding meanwhile see the old or the new pair
        return dense

    def gathered_pairs(self, xs: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """GATHERED: row p of xs [P, H] through held expert idx[p] (biases included) -> [P, H] in xs.dtype.
        The P experts' dense matrices are gathered into one batched matmul."""
        w1, w2 = self.expert_weights(idx, xs.dtype)  # [P, 2I, H], [P, H, I]
        h = torch.bmm(w1, xs.unsqueeze(-1)).squeeze(-1) + self.gate_up_bias[idx]  # [P, 2I]
        h = swiglu(h, self.alpha, self.limit)  # [P, I]
        return torch.bmm(w2, h.unsqueeze(-1)).squeeze(-1) + self.down_bias[idx]  # [P, H]

    def fused_pairs(self, x: torch.Tensor, rows: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """FUSED: x[rows[p]] through held expert idx[p] (biases included) -> [P, H] in x.dtype, in pair order.
        The packed experts are multiplied in place by the CPU kernel over the pairs grouped by expert
        (stable: each expert's tokens in pair order); dtypes as in gathered_pairs."""
        order = torch.argsort(idx, stable=True)  # pairs grouped by expert
        grouped = idx[order]
        experts, counts = torch.unique_consecutive(grouped, return_counts=True)
        offsets = torch.cat((counts.new_zeros(1), counts.cumsum(0)))
        y = self._grouped_mlp(x[rows[order]], grouped, experts, offsets)
        y = (y + self.down_bias[grouped]).to(x.dtype)  # [P, H] in grouped order
        return torch.empty_like(y).index_copy_(0, order, y)  # back to pair order

    def _grouped_mlp(self, xs: torch.Tensor, grouped: torch.Tensor, experts: torch.Tensor,
                     offsets: torch.Tensor) -> torch.Tensor:
        """FUSED on pairs grouped by expert, all but the down projection's bias: row p of xs [P, H] through
        held expert grouped[p] -> float32 [P, H]; experts[m] holds rows offsets[m] .. offsets[m+1] - 1."""
        h = mxfp4_cpu.grouped_matmul(self.gate_up_blocks, self.gate_up_scales, xs, experts, offsets)
        if xs.dtype != torch.bfloat16 or (
                act := expert_epilogue_cpu.swiglu_bias(h, self.gate_up_bias, grouped, self.alpha, self.limit)) is None:
            act = swiglu((h + self.gate_up_bias[grouped]).to(xs.dtype), self.alpha, self.limit)  # [P, I]
        return mxfp4_cpu.grouped_matmul(self.down_blocks, self.down_scales, act, experts, offsets)

    def add_looped_pairs_(self, out: torch.Tensor, x: torch.Tensor, rows: torch.Tensor, idx: torch.Tensor,
                          weights: torch.Tensor) -> None:
        """LOOPED: out[rows[p]] += weights[p] * (x[rows[p]] through held expert idx[p]), biases included;
        one matmul per expert the pairs use, no weight copies. A token picks an expert at most once, so an
        expert's rows do not repeat and indexed += is exact; index_add_ would open an OpenMP region,
        which costs milliseconds on a busy box."""
        for e in torch.unique(idx).tolist():
            pairs = torch.where(idx == e)[0]
            r = rows[pairs]
            w1, w2 = self.expert_weights(e, x.dtype)
            h = swiglu(F.linear(x[r], w1, self.gate_up_bias[e]), self.alpha, self.limit)
            out[r] += F.linear(h, w2, self.down_bias[e]) * weights[pairs].unsqueeze(-1)

    def dequantize_(self) -> None:
        """Replace packed experts by dense ones in the dtype of the biases, in place."""
        if not self.packed:
            return
        dtype = self.gate_up_bias.dtype
        X = self.gate_up_blocks.shape[0]
        w1 = torch.stack([mxfp4.unpack(self.gate_up_blocks[e], self.gate_up_scales[e], dtype) for e in range(X)])
        w2 = torch.stack([mxfp4.unpack(self.down_blocks[e], self.down_scales[e], dtype) for e in range(X)])
        for name in ("gate_up_blocks", "gate_up_scales", "down_blocks", "down_scales"):
            delattr(self, name)
        self.gate_up_weight, self.down_weight = nn.Parameter(w1, requires_grad=False), nn.Parameter(w2, requires_grad=False)
        self.packed = False
        self._dense = None


class MoE(ExpertWeights):
    """The router and all E experts of one layer."""

    def __init__(self, config: GptOssConfig, *, packed: bool = False):
        super().__init__()
        E, H, I = config.num_local_experts, config.hidden_size, config.intermediate_size
        self.num_experts, self.top_k = E, config.num_experts_per_tok
        self.alpha, self.limit = config.swiglu_alpha, config.swiglu_limit
        self.router = bf16_cpu.Linear(H, E, bias=True)
        self._init_experts(E, H, I, packed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [S, H]
        S, A = x.shape[0], self.top_k
        top_logits, top_idx = torch.topk(self.router(x), A, dim=-1)  # [S, A]
        top_w = torch.softmax(top_logits, dim=-1)  # [S, A]

        kernel = {FUSED: self._fused, GATHERED: self._gathered, LOOPED: self._looped}[self.kernel(x, S * A)]
        return kernel(x, top_idx, top_w).view(shape)

    def _gathered(self, x: torch.Tensor, top_idx: torch.Tensor, top_w: torch.Tensor) -> torch.Tensor:
        S, A = top_idx.shape
        xs = x.repeat_interleave(A, dim=0) if S > 1 else x.expand(A, -1)  # [S*A, H]
        y = self.gathered_pairs(xs, top_idx.flatten())  # [S*A, H]
        return torch.bmm(top_w.unsqueeze(1), y.view(S, A, -1)).squeeze(1)  # weighted sum over A: [S, H]

    def _fused(self, x: torch.Tensor, top_idx: torch.Tensor, top_w: torch.Tensor) -> torch.Tensor:
        S, A = top_idx.shape
        if S == 1:
            # One token (decode): its A experts are distinct, so sorting them is the grouping, and the
            # weighted sum can take the weights in that order. Fewer small ops: each costs ~10 us here,
            # on caches the expert weights just swept.
            experts, order = top_idx[0].sort()
            offsets = torch.arange(A + 1, device=x.device)
            y = self._grouped_mlp(x.expand(A, -1), experts, experts, offsets)  # [A, H] float32
            if x.dtype == torch.bfloat16 and (
                    out := expert_epilogue_cpu.combine(y, self.down_bias, experts, top_w[0], order)) is not None:
                return out
            return top_w[0, order].unsqueeze(0) @ (y + self.down_bias[experts]).to(x.dtype)  # [1, H]
        rows = torch.arange(S * A, device=x.device) // A  # pair p = (token p // A, choice p % A)
        y = self.fused_pairs(x, rows, top_idx.flatten())  # [S*A, H]
        return torch.bmm(top_w.unsqueeze(1), y.view(S, A, -1)).squeeze(1)  # weighted sum over A: [S, H]

    def _looped(self, x: torch.Tensor, top_idx: torch.Tensor, top_w: torch.Tensor) -> torch.Tensor:
        S, A = top_idx.shape
        out = torch.zeros_like(x)
        rows = torch.arange(S * A, device=x.device) // A  # pair p = (token p // A, choice p % A)
        self.add_looped_pairs_(out, x, rows, top_idx.flatten(), top_w.flatten())
        return out
