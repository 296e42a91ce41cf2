"""Rotary position embedding of bf16 decode heads on CPU in one call of rotary_avx512.c.

layers.apply_rotary is eight small ops (two halves, four products, a difference, a sum, a concat); at
batch-1 decode each costs ~10 us on caches the layer's weights have just swept. The kernel rounds every
product and sum to bf16 as torch does, so its result is torch's bit for bit. It applies to bf16 heads on
CPU with at most MAX_TOKENS positions (decode), without autograd, where the CPU has AVX512BW; `rotate`
returns None for anything else, which keeps torch's path.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from cluster.model.kernels import native

MAX_TOKENS = 64  # decode batches; prefill's thousands of positions stay on torch's threaded ops


@functools.cache
def _native():
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    return native.supported_function("rotary_avx512", "rotary_supported", "rotary_bf16",
                                     [ptr, i64, i64, i64, i64, i64, i64, i64, ptr, ptr, ptr])


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor | None:
    """x [..., Hh, T, D] rotated by cos/sin [T, D/2] (layers.apply_rotary's contract), contiguous; None where
    the kernel does not apply."""
    if not (2 < x.dim() <= 4 and x.dtype == cos.dtype == sin.dtype == torch.bfloat16
            and x.device.type == cos.device.type == sin.device.type == "cpu"
            and x.shape[-2] <= MAX_TOKENS and x.shape[-1] % 2 == 0 and x.stride(-1) == 1
            and cos.shape == sin.shape == (x.shape[-2], x.shape[-1] // 2) and cos.is_contiguous() and sin.is_contiguous()
            and not (torch.is_grad_enabled() and x.requires_grad)
            and _native() is not None):
        return None
    x4 = x if x.dim() == 4 else x.unsqueeze(0)
    B, Hh, T, D = x4.shape
    out = torch.empty(x.shape, dtype=x.dtype)
    _native()(x4.data_ptr(), B, Hh, T, D, x4.stride(0), x4.stride(1), x4.stride(2), cos.data_ptr(), sin.data_ptr(),
              out.data_ptr())
    return out
