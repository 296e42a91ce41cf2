"""MXFP4 pack/unpack: the E2M1 table, E8M0 scales, nibble order, and agreement with transformers."""

from __future__ import annotations

import pytest
import torch

from cluster.model import mxfp4


def _random_packed(gen: torch.Generator, shape=(3, 8, 4), scale_range=(0, 255)):
    blocks = torch.randint(0, 256, (*shape, 16), generator=gen, dtype=torch.uint8)
    scales = torch.randint(*scale_range, shape, generator=gen, dtype=torch.uint8)
    return blocks, scales


def test_lut_and_nibble_order():
    # One block: byte i holds codes (lo=i % 16, hi=15 - i % 16); scale 127 means 2**0.
    codes_lo = torch.arange(16, dtype=torch.uint8)
    blocks = (codes_lo | ((15 - codes_lo) << 4)).view(1, 1, 16)
    scales = torch.full((1, 1), 127, dtype=torch.uint8)
    values = mxfp4.unpack(blocks, scales)[0]
    lut = torch.tensor(mxfp4.FP4_VALUES)
    assert torch.equal(values[0::2], lut)  # even elements come from the low nibble
    assert torch.equal(values[1::2], lut.flip(0))
    assert mxfp4.FP4_VALUES == (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def test_e8m0_scale_is_a_biased_power_of_two():
    blocks = torch.full((1, 1, 16), 0x22, dtype=torch.uint8)  # every value is code 2 = 1.0
    for s in (1, 100, 127, 130, 200):
        out = mxfp4.unpack(blocks, torch.tensor([[s]], dtype=torch.uint8))
        assert torch.equal(out, torch.full((1, 32), 2.0 ** (s - 127)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unpack_matches_transformers_bit_for_bit(dtype):
    hf_mxfp4 = pytest.importorskip("transformers.integrations.mxfp4")
    gen = torch.Generator().manual_seed(0)
    blocks, scales = _random_packed(gen, shape=(4, 24, 3))  # [E, rows, in/32]; full scale range incl. extremes
    ours = mxfp4.unpack(blocks, scales, dtype)  # [E, rows, in]
    theirs = hf_mxfp4.convert_moe_packed_tensors(blocks, scales, dtype=dtype)  # [E, in, rows]
    assert ours.dtype == theirs.dtype == dtype
    assert torch.equal(ours.transpose(1, 2), theirs)
    # identical bits, not just equal values (+0 vs -0 included)
    assert torch.equal(ours.transpose(1, 2).contiguous().view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                       theirs.contiguous().view(torch.int16 if dtype == torch.bfloat16 else torch.int32))


def test_pack_unpack_round_trip_is_exact_on_representable_values():
    gen = torch.Generator().manual_seed(1)
    blocks, scales = _random_packed(gen, shape=(5, 16, 4), scale_range=(90, 160))
    values = mxfp4.unpack(blocks, scales)
    blocks2, scales2 = mxfp4.pack(values)
    assert torch.equal(mxfp4.unpack(blocks2, scales2), values)


def test_pack_round_trips_bytes_of_canonical_blocks():
    # Canonical: each block holds a +-6 (so its scale is the smallest that fits) and no -0 codes.
    gen = torch.Generator().manual_seed(2)
    codes = torch.randint(0, 16, (6, 32, 2, 32), generator=gen, dtype=torch.uint8)
    codes[codes == 8] = 0
    codes[..., 5] = 7 + 8 * (torch.rand(6, 32, 2, generator=gen) < 0.5).to(torch.uint8)
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    scales = torch.randint(100, 150, (6, 32, 2), generator=gen, dtype=torch.uint8)
    again = mxfp4.pack(mxfp4.unpack(blocks, scales))
    assert torch.equal(again[0], blocks) and torch.equal(again[1], scales)


def test_pack_is_idempotent_on_values():
    w = torch.randn(6, 32, 64, generator=torch.Generator().manual_seed(4))
    blocks, scales = mxfp4.pack(w)
    assert blocks.shape == (6, 32, 2, 16) and scales.shape == (6, 32, 2)
    assert blocks.dtype == scales.dtype == torch.uint8
    q = mxfp4.unpack(blocks, scales)
    assert torch.equal(mxfp4.unpack(*mxfp4.pack(q)), q)


def test_pack_rounds_to_nearest_code():
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(64, 128, generator=gen) * 0.05
    blocks, scales = mxfp4.pack(w)
    q = mxfp4.unpack(blocks, scales)
    step = 2.0 ** (scales.float() - 127).repeat_interleave(32, dim=-1)  # 2**e per value
    # the gap between neighbouring codes is at most 2 * 2**e (4 -> 6), so the error is at most 2**e
    assert ((q - w).abs() <= step).all()
    # and the scale is the smallest that fits: the block maximum needs more than half the range
    amax = w.view(64, 4, 32).abs().amax(-1)
    assert (amax > 3 * 2.0 ** (scales.float() - 127)).all()
    assert (amax <= 6 * 2.0 ** (scales.float() - 127)).all()


def test_zero_block_and_shape_errors():
    blocks, scales = mxfp4.pack(torch.zeros(2, 32))
    assert torch.equal(mxfp4.unpack(blocks, scales), torch.zeros(2, 32))
    with pytest.raises(ValueError):
        mxfp4.pack(torch.zeros(2, 33))
    with pytest.raises(ValueError):
        mxfp4.unpack(torch.zeros(2, 1, 16, dtype=torch.uint8), torch.zeros(2, 2, dtype=torch.uint8))
    with pytest.raises(TypeError):
        mxfp4.unpack(torch.zeros(2, 1, 16), torch.zeros(2, 1, dtype=torch.uint8))
