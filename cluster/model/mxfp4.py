"""MXFP4: the 4.25-bit format gpt-oss ships its expert matrices in (OCP Microscaling spec).

A weight matrix [rows, cols] is cut into blocks of 32 consecutive values along `cols` (the input
dimension). Each value is an E2M1 float (a 4-bit code indexing `FP4_VALUES`); each block shares
one E8M0 scale, a biased power of two: value = FP4_VALUES[code] * 2**(scale - 127).

On disk (and in memory while packed):
    blocks  uint8 [..., rows, cols/32, 16]  two codes per byte, low nibble = even element
    scales  uint8 [..., rows, cols/32]

`unpack` turns (blocks, scales) back into [..., rows, cols]; `pack` rounds a float tensor to the
nearest representable values. Values that are already representable survive pack -> unpack exactly.
"""

from __future__ import annotations

import torch

BLOCK = 32  # values per scale
BYTES_PER_BLOCK = BLOCK // 2

# E2M1 codes 0..15: sign bit, 2 exponent bits, 1 mantissa bit.
FP4_VALUES = (+0.0, +0.5, +1.0, +1.5, +2.0, +3.0, +4.0, +6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
SCALE_BIAS = 127

_LUT_CACHE: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}


def _tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(byte -> two fp4 values [256, 2], scale byte -> 2**(s-127) [256]), float32 on `device`."""
    key = (device, torch.float32)
    if key not in _LUT_CACHE:
        lut = torch.tensor(FP4_VALUES, dtype=torch.float32, device=device)
        byte = torch.arange(256, device=device)
        pairs = torch.stack((lut[byte & 0x0F], lut[byte >> 4]), dim=-1)
        # 2**-127 is a float32 subnormal, still exact; byte 255 (E8M0 NaN) never appears in checkpoints.
        powers = torch.ldexp(torch.ones(256, dtype=torch.float32, device=device), byte.to(torch.int32) - SCALE_BIAS)
        _LUT_CACHE[key] = (pairs, powers)
    return _LUT_CACHE[key]


def unpack(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[..., R, G, 16] uint8 codes and [..., R, G] uint8 scales -> [..., R, G*32] values in `dtype`."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise TypeError(f"MXFP4 blocks and scales must be uint8, got {blocks.dtype} and {scales.dtype}")
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != BYTES_PER_BLOCK:
        raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} do not match scales {tuple(scales.shape)}")
    pairs, powers = _tables(blocks.device)
    # index_select on flat indices: much faster on CPU than advanced indexing with a shaped index
    values = pairs.index_select(0, blocks.flatten().int()).view(*scales.shape, BLOCK)  # [..., R, G, 32]
    scale = powers.index_select(0, scales.flatten().int()).view(*scales.shape, 1)
    return (values * scale).flatten(-2).to(dtype)  # exact: scaling by a power of two


def pack(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Round [..., R, C] floats (C a multiple of 32) to MXFP4; returns (blocks, scales) as in `unpack`.

    Each block takes the smallest scale that fits its largest magnitude under 6 (the largest code),
    then every value rounds to the nearest code.
    """
    if weight.shape[-1] % BLOCK:
        raise ValueError(f"MXFP4 needs the last dim to be a multiple of {BLOCK}, got {tuple(weight.shape)}")
    w = weight.detach().float().reshape(*weight.shape[:-1], weight.shape[-1] // BLOCK, BLOCK)
    amax = w.abs().amax(dim=-1)
    # smallest e with amax <= 6 * 2**e; frexp gives amax/6 = m * 2**x with m in [0.5, 1)
    mantissa, exponent = torch.frexp(amax / 6.0)
    exponent = exponent - (mantissa == 0.5).to(exponent.dtype)  # an exact power of two needs no round-up
    exponent = torch.where(amax > 0, exponent, torch.full_like(exponent, -SCALE_BIAS))
    exponent = exponent.clamp(-SCALE_BIAS, SCALE_BIAS)
    scaled = w / torch.ldexp(torch.ones_like(amax), exponent).unsqueeze(-1)

    magnitudes = torch.tensor(FP4_VALUES[:8], device=w.device)
    midpoints = (magnitudes[1:] + magnitudes[:-1]) / 2
    code = torch.bucketize(scaled.abs().clamp(max=6.0), midpoints)  # nearest magnitude, ties to the lower
    code = code + 8 * ((scaled < 0) & (code > 0)).long()  # zero is always +0
    code = code.to(torch.uint8)
    blocks = code[..., 0::2] | (code[..., 1::2] << 4)
    scales = (exponent + SCALE_BIAS).to(torch.uint8)
    return blocks.contiguous(), scales.contiguous()
