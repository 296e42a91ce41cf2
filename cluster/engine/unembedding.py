"""The step's last matmul: normed hidden states -> float32 vocabulary logits, on the fastest kernel.

The unembedding (hidden -> 201088 logits) is the largest matmul of a step on small models. On
CPU, MKL's sgemm runs this shape (inner dimension = the hidden size) several times slower than
oneDNN does with a weight reordered once for it (tiny preset, 2 threads: 32 rows 11.8 -> 2.7 ms,
1 row 2.3 -> 0.9 ms, measured). The reordered copy costs the weight's size again, so only float32
weights up to PACKED_UNEMBEDDING_BYTES get one; everything else runs the model's own Linear (which
takes the AVX-512 bf16 kernel for a bf16 weight at batch 1, model/kernels/bf16_cpu.py: 2.5x torch's
bf16 GEMV, one core, 32768 x 2880, measured).

The model knows nothing of this: the engine's runner wraps `model.unembedding` in an `Unembedding`
and applies it to the hidden states `paged_hidden` (or an expert-parallel group) returns. The
reordered copies are kept per layer for the process (`_reordered`, dropped with the layer), so
engines sharing a model share one.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

PACKED_UNEMBEDDING_BYTES = 256 << 20
# layer -> (weight stamp, reordered weight); one assignment per update, so a thread stepping
# meanwhile sees the old or the new pair
_reordered: weakref.WeakKeyDictionary[nn.Linear, tuple[tuple, torch.Tensor]] = weakref.WeakKeyDictionary()


class Unembedding:
    """`unembed(x)`: x [..., H] (normed) -> float32 logits [..., V], as `linear` computes them, on
    the oneDNN-reordered copy of its weight where that applies (remade when the weight changes:
    its storage, version or shape)."""

    def __init__(self, linear: nn.Linear):
        self.linear = linear

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        packed = self._packed_weight()
        if packed is None:
            return self.linear(x).float()
        flat = x.reshape(-1, x.shape[-1]).contiguous()
        logits = torch.ops.mkldnn._linear_pointwise(flat, packed, None, "none", [], "")
        return logits.view(*x.shape[:-1], logits.shape[-1])

    def _packed_weight(self) -> torch.Tensor | None:
        linear = self.linear
        weight = linear.weight
        if (linear.bias is not None or weight.device.type != "cpu" or weight.dtype != torch.float32
                or not torch.backends.mkldnn.is_available()
                or weight.numel() * weight.element_size() > PACKED_UNEMBEDDING_BYTES):
            return None
        stamp = (weight.data_ptr(), weight._version, tuple(weight.shape))
        entry = _reordered.get(linear)
        if entry is None or entry[0] != stamp:
            # The batch-size hint only picks the blocking; 32 measured best for 1..32 rows.
            entry = (stamp, torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 32))
            _reordered[linear] = entry
        return entry[1]
