"""The bf16 expert MLP's small steps around its MXFP4 matmuls on CPU, one kernel call each
(expert_epilogue_avx512bf16.c): the biased, clamped SwiGLU between gate_up and down, and for one token
the biased, weighted sum of its experts' outputs.

In torch these are ~15 small ops per layer, each ~10 us in a batch-1 decode step (on caches the expert
weights have just swept). They apply to float32 matmul outputs with bf16 biases on CPU where the CPU has
AVX512_BF16 (the bf16 model on the bf16 expert kernel), widths a multiple of 16, without autograd; the
functions return None for anything else, which keeps torch's path (model/moe.py).
"""

from __future__ import annotations

import ctypes
import functools

import torch

from cluster.model.kernels import native

@functools.cache
def _native():
    """(swiglu, combine) ctypes functions, or None."""
    i64, ptr, f32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float
    name, check = "expert_epilogue_avx512bf16", "expert_epilogue_supported"
    swiglu = native.supported_function(name, check, "swiglu_bias_bf16", [ptr, ptr, ptr, i64, i64, f32, f32, ptr, ctypes.c_int])
    combine = native.supported_function(name, check, "combine_bf16", [ptr, ptr, ptr, ptr, ptr, i64, i64, ptr])
    return (swiglu, combine) if swiglu and combine else None


def _applies(out: torch.Tensor, bias: torch.Tensor, width: int) -> bool:
    return (out.dtype == torch.float32 and bias.dtype == torch.bfloat16 and out.device.type == bias.device.type == "cpu"
            and width % 16 == 0 and out.is_contiguous() and bias.is_contiguous()
            and not (torch.is_grad_enabled() and bias.requires_grad) and _native() is not None)


def swiglu_bias(h: torch.Tensor, bias: torch.Tensor, experts: torch.Tensor, alpha: float,
                limit: float) -> torch.Tensor | None:
    """h [P, 2I] float32 (gate_up's output for rows grouped by expert), bias [X, 2I] bf16, experts [P] (row p's
    held expert) -> swiglu(round_bf16(h + bias[experts])) [P, I] bf16, as layers.swiglu; None where it does not apply."""
    P, I = h.shape[0], h.shape[1] // 2
    if not _applies(h, bias, I):
        return None
    experts = experts.to(torch.int64).contiguous()
    out = torch.empty(P, I, dtype=torch.bfloat16)
    _native()[0](h.data_ptr(), bias.data_ptr(), experts.data_ptr(), P, I, alpha, limit, out.data_ptr(),
                 torch.get_num_threads())
    return out


def combine(y: torch.Tensor, bias: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor,
            order: torch.Tensor) -> torch.Tensor | None:
    """One token: y [A, H] float32 (down's output, rows in `experts` order), bias [X, H] bf16, weights [A] bf16
    (the router's, in choice order), order [A] (row a's choice) -> sum_a weights[order[a]] * round_bf16(y[a] +
    bias[experts[a]]) as [1, H] bf16; None where it does not apply."""
    A, H = y.shape
    if not (_applies(y, bias, H) and weights.dtype == torch.bfloat16 and weights.is_contiguous()):
        return None
    experts, order = experts.to(torch.int64).contiguous(), order.to(torch.int64).contiguous()
    out = torch.empty(1, H, dtype=torch.bfloat16)
    _native()[1](y.data_ptr(), bias.data_ptr(), experts.data_ptr(), weights.data_ptr(), order.data_ptr(), A, H,
                 out.data_ptr())
    return out
