"""bf16 linear layers on CPU at decode batch sizes, at memory speed: the AVX-512 kernel bf16_avx512.c.

torch's bf16 matrix-vector product runs below the read bandwidth on CPU (measured on AVX-512 with BF16,
one core, 2880-wide gpt-oss-20b shapes: 8-10 GB/s, the kernel 18-21 GB/s), while a batch-1 decode
step is bound by reading the weights. Two kernels, both summing exact bf16 products in float32 as
torch does: bf16 activations (the bf16 model's) go to bf16_avx512bf16.c, one vdpbf16ps per 32 weights,
where the CPU has AVX512_BF16; float32 activations, or a CPU without it, to bf16_avx512.c, which
widens each weight to float32 in registers. They run for bf16 weights on CPU, C a multiple of 32, at
most MAX_TOKENS rows (batch-1 decode), without autograd. Everything else, and every CPU where the kernel cannot be built
(native.py), goes to F.linear. The model's projections are `Linear` modules, not calls of `linear`
on their weights: a module call keeps forward hooks running (expert parallelism all-reduces the
sharded attention output in a hook on attn.out, parallel/sharding.py).
"""

from __future__ import annotations

import ctypes
import functools

import torch
import torch.nn.functional as F
from torch import nn

from cluster.model.kernels import native

MAX_TOKENS = 1  # from 2 rows on torch's blocked GEMM is as fast or faster (measured, 2880-wide bf16)
ROWS_PER_ITEM = 64  # output rows per work item: enough items to balance threads

KERNELS = ("bf16", "float32")  # the activations each kernel takes
_ARGTYPES = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 4 + [ctypes.c_int]
_kernel = None  # the float32-activation function (ctypes); False once it cannot be had
_kernel_bf16 = None  # the bf16-activation one, where the CPU has AVX512_BF16; False once it cannot be had


def _native():
    global _kernel
    if _kernel is None:
        _kernel = native.function("bf16_avx512", "bf16_linear", _ARGTYPES) or False
    return _kernel or None


def _native_bf16():
    global _kernel_bf16
    if _kernel_bf16 is None:
        _kernel_bf16 = native.supported_function("bf16_avx512bf16", "bf16_dot_supported", "bf16_linear_bf16",
                                                 _ARGTYPES) or False
    return _kernel_bf16 or None


@functools.cache
def _native_bf16_out():
    """The bf16-activation kernel with the bias added and bf16 written: a bf16 layer's whole forward."""
    return native.supported_function("bf16_avx512bf16", "bf16_dot_supported", "bf16_linear_bf16_out",
                                     [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 4 + [ctypes.c_int])


def applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `linear(x, weight)` runs the native kernel."""
    return (weight.dtype == torch.bfloat16 and weight.device.type == "cpu" and x.device.type == "cpu"
            and weight.dim() == 2 and weight.is_contiguous() and weight.shape[1] % 32 == 0
            and x.numel() // max(x.shape[-1], 1) <= MAX_TOKENS
            and not (torch.is_grad_enabled() and (weight.requires_grad or x.requires_grad))
            and _native() is not None)


def linear_float32(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                   kernel: str | None = None) -> torch.Tensor:
    """x [..., C] @ weight [R, C].T (+ bias) as float32 [..., R], where `applies`; else F.linear, as float32.
    `kernel` (tests, benchmarks) forces one of KERNELS; by default bf16 activations take the bf16 one
    where it runs."""
    if not applies(x, weight):
        return F.linear(x, weight, bias).float()
    if kernel is None:
        kernel = "bf16" if x.dtype == torch.bfloat16 and _native_bf16() is not None else "float32"
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    fn = _native_bf16() if kernel == "bf16" else _native()
    if fn is None:
        raise RuntimeError(f"the {kernel} kernel cannot run here")
    if kernel == "bf16" and x.dtype != torch.bfloat16:
        raise ValueError(f"the bf16 kernel takes bf16 activations, got {x.dtype}")
    R, C = weight.shape
    flat = x.reshape(-1, C).to(torch.bfloat16 if kernel == "bf16" else torch.float32).contiguous()
    out = torch.empty(flat.shape[0], R, dtype=torch.float32)
    if flat.shape[0]:
        fn(weight.data_ptr(), flat.data_ptr(), out.data_ptr(), R, C, flat.shape[0], ROWS_PER_ITEM,
           torch.get_num_threads())
    if bias is not None:
        out += bias
    return out.view(*x.shape[:-1], R)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) in x's dtype, on the native kernel where it `applies`."""
    if not applies(x, weight):
        return F.linear(x, weight, bias)
    if (x.dtype == torch.bfloat16 and (bias is None or bias.dtype == torch.bfloat16 and bias.is_contiguous())
            and (fn := _native_bf16_out()) is not None):
        R, C = weight.shape
        flat = x.reshape(-1, C).contiguous()
        out = torch.empty(flat.shape[0], R, dtype=torch.bfloat16)
        if flat.shape[0]:  # the float32 sum + bias, rounded once: linear_float32's result .to(bfloat16)
            fn(weight.data_ptr(), flat.data_ptr(), 0 if bias is None else bias.data_ptr(), out.data_ptr(), R, C,
               flat.shape[0], ROWS_PER_ITEM, torch.get_num_threads())
        return out.view(*x.shape[:-1], R)
    return linear_float32(x, weight, bias).to(x.dtype)


class Linear(nn.Linear):
    """nn.Linear (same parameters, same state dict) whose forward is `linear`: the kernel where it applies."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
