"""bf16 linear layers on CPU at decode batch sizes, at memory speed: the AVX-512 kernel bf16_avx512.c.

torch's bf16 matrix-vector product runs below the read bandwidth on CPU (measured on AVX-512 with BF16,
one core, 2880-wide gpt-oss-20b shapes: 8-10 GB/s, the kernel 18-21 GB/s), while a batch-1 decode
step is bound by reading the weights. The kernel widens each bf16 weight to float32 in
registers and sums in float32, as torch does; it runs for bf16 weights on CPU, C a multiple of 32, at
most MAX_TOKENS rows (batch-1 decode), without autograd. Everything else, and every CPU where the kernel cannot be built
(native.py), goes to F.linear. The model's projections are `Linear` modules, not calls of `linear`
on their weights: a module call keeps forward hooks running (expert parallelism all-reduces the
sharded attention output in a hook on attn.out, parallel/sharding.py).
"""

from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F
from torch import nn

from cluster.model.kernels import native

MAX_TOKENS = 1  # from 2 rows on torch's blocked GEMM is as fast or faster (measured, 2880-wide bf16)
ROWS_PER_ITEM = 64  # output rows per work item: enough items to balance threads

_kernel = None  # the native function (ctypes); False once it cannot be had


def _native():
    global _kernel
    if _kernel is None:
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        _kernel = native.function("bf16_avx512", "bf16_linear", [ptr, ptr, ptr, i64, i64, i64, i64, ctypes.c_int]) or False
    return _kernel or None


def applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `linear(x, weight)` runs the native kernel."""
    return (weight.dtype == torch.bfloat16 and weight.device.type == "cpu" and x.device.type == "cpu"
            and weight.dim() == 2 and weight.is_contiguous() and weight.shape[1] % 32 == 0
            and x.numel() // max(x.shape[-1], 1) <= MAX_TOKENS
            and not (torch.is_grad_enabled() and (weight.requires_grad or x.requires_grad))
            and _native() is not None)


def linear_float32(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., C] @ weight [R, C].T (+ bias) as float32 [..., R], where `applies`; else F.linear, as float32."""
    if not applies(x, weight):
        return F.linear(x, weight, bias).float()
    R, C = weight.shape
    flat = x.reshape(-1, C).to(torch.float32).contiguous()
    out = torch.empty(flat.shape[0], R, dtype=torch.float32)
    if flat.shape[0]:
        _native()(weight.data_ptr(), flat.data_ptr(), out.data_ptr(), R, C, flat.shape[0], ROWS_PER_ITEM,
                  torch.get_num_threads())
    if bias is not None:
        out += bias
    return out.view(*x.shape[:-1], R)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) in x's dtype, on the native kernel where it `applies`."""
    if not applies(x, weight):
        return F.linear(x, weight, bias)
    return linear_float32(x, weight, bias).to(x.dtype)


class Linear(nn.Linear):
    """nn.Linear (same parameters, same state dict) whose forward is `linear`: the kernel where it applies."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
