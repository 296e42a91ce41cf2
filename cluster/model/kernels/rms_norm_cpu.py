"""RMS norm of bf16 activations on CPU in one call of the AVX-512 kernel rms_norm_avx512bf16.c.

torch's F.rms_norm on x.float() is five or six small ops (cast, square, mean, rsqrt, two products,
cast back); at batch-1 decode each costs ~10 us on caches the layer's weights have just swept. The
kernel applies to bf16 rows on CPU (H a multiple of 16, a float32 scale), without autograd, where the
CPU has AVX512_BF16; `rms_norm` returns None for anything else, which keeps torch's path.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from cluster.model.kernels import native

MAX_ROWS = 8  # decode batches; prefill's thousands of rows stay on torch's threaded op

@functools.cache
def _native():
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    return native.supported_function("rms_norm_avx512bf16", "rms_norm_bf16_supported", "rms_norm_bf16",
                                     [ptr, ptr, ptr, i64, i64, ctypes.c_float])


def rms_norm(x: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor | None:
    """x [..., H] bf16 / sqrt(mean(x^2) + eps) * scale [H] float32, as bf16; None where the kernel does not apply."""
    H = x.shape[-1]
    rows = x.numel() // max(H, 1)
    if not (x.dtype == torch.bfloat16 and scale.dtype == torch.float32 and x.device.type == scale.device.type == "cpu"
            and H % 16 == 0 and 0 < rows <= MAX_ROWS and x.is_contiguous() and scale.is_contiguous()
            and not (torch.is_grad_enabled() and (x.requires_grad or scale.requires_grad))
            and _native() is not None):
        return None
    out = torch.empty_like(x)
    _native()(x.data_ptr(), scale.data_ptr(), out.data_ptr(), rows, H, eps)
    return out
