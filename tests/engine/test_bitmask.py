"""The packed-bitmask kernel (cluster/engine/bitmask.py) blocks exactly the tokens whose bit is 0,
in the chosen rows only, on the CPU kernel and on the portable torch path alike."""

import pytest
import torch

from cluster.engine import bitmask as bitmask_module
from cluster.engine.bitmask import apply_bitmask


def expected(logits: torch.Tensor, rows: list[int], bitmask: torch.Tensor) -> torch.Tensor:
    """The reference, bit by bit: token t of row rows[r] allowed iff bit t % 32 of word t // 32 is 1."""
    V = logits.shape[1]
    words = bitmask.long() & 0xFFFFFFFF  # unsigned
    allowed = ((words.repeat_interleave(32, dim=1) >> torch.arange(32).repeat(words.shape[1])) & 1).bool()[:, :V]
    out = logits.clone()
    for r, row in enumerate(rows):
        out[row, ~allowed[r]] = float("-inf")
    return out


@pytest.mark.parametrize("kernel", ["numba", "torch"])
@pytest.mark.parametrize("vocab, rows", [(201088, [1, 3, 4]), (201088, [0, 1, 2, 3, 4]), (100 * 32 + 7, [2])])
def test_only_the_zero_bits_of_the_chosen_rows_are_blocked(monkeypatch, kernel, vocab, rows):
    if kernel == "numba" and bitmask_module.numba is None:
        pytest.skip("numba is not installed")
    if kernel == "torch":
        monkeypatch.setattr(bitmask_module, "numba", None)
    gen = torch.Generator().manual_seed(vocab + len(rows))
    logits = torch.randn(5, vocab, generator=gen)
    words = (vocab + 31) // 32
    bitmask = torch.randint(-2**31, 2**31 - 1, (len(rows), words), generator=gen, dtype=torch.int64).to(torch.int32)
    bitmask[0, : words // 2] = -1  # all allowed: the kernel's skip
    bitmask[-1, words // 3] = 0  # 32 blocked in a row
    bitmask[-1, words // 4] = -2**31  # only the sign bit (token 31 of the word) allowed
    want = expected(logits, rows, bitmask)
    apply_bitmask(logits, rows, bitmask)
    assert torch.equal(logits, want)
