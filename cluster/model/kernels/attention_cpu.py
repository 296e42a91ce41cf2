"""Decode attention with sinks on CPU: one query token over bf16 keys and values in one call of the
AVX-512 kernel attention_avx512bf16.c, where torch's path is about ten small ops.

At batch 1 each of those ops costs ~10 us in a decode step (they run on caches the layer's weights
have just swept), several times their cost alone; the kernel does scores, the softmax with the sink
and the weighted sum in float32 and rounds once. It applies to bf16 tensors on CPU, one query per
sequence, without autograd, where the CPU has AVX512_BF16 (native.py builds it); anything else keeps
torch's path (`decode` returns None).
"""

from __future__ import annotations

import ctypes
import functools

import torch

from cluster.model.kernels import native

@functools.cache
def _native():
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    return native.supported_function(
        "attention_avx512bf16", "attention_bf16_supported", "decode_attention_bf16",
        [ptr, i64, i64, ptr, i64, i64, i64, ptr, i64, i64, i64, ptr, ptr, ctypes.c_float, ptr, i64, i64, i64, i64,
         i64, ctypes.c_int], restype=ctypes.c_int)


def decode(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, sinks: torch.Tensor, sm_scale: float,
           visible: torch.Tensor | None) -> torch.Tensor | None:
    """q [B, N, 1, D], keys/values [B, K, L, D], visible bool broadcastable to [B, 1, 1, 1, L] (None: every
    key) -> [B, 1, N*D], as attention.sink_attention; None where the kernel does not apply."""
    B, N, T, D = q.shape
    K, L = keys.shape[1], keys.shape[2]
    if not (T == 1 and q.dtype == keys.dtype == values.dtype == sinks.dtype == torch.bfloat16 and sinks.is_contiguous()
            and q.device.type == keys.device.type == values.device.type == "cpu"
            and q.stride(-1) == keys.stride(-1) == values.stride(-1) == 1
            and not (torch.is_grad_enabled() and (q.requires_grad or keys.requires_grad or values.requires_grad))
            and _native() is not None):
        return None
    if visible is not None:
        visible = visible.expand(B, 1, 1, 1, L).reshape(B, L).contiguous()
    out = torch.empty(B, 1, N * D, dtype=torch.bfloat16)
    failed = _native()(q.data_ptr(), q.stride(0), q.stride(1), keys.data_ptr(), *keys.stride()[:3],
                       values.data_ptr(), *values.stride()[:3], 0 if visible is None else visible.data_ptr(),
                       sinks.data_ptr(), sm_scale, out.data_ptr(), B, N, K, L, D, torch.get_num_threads())
    return None if failed else out
