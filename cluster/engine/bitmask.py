"""Apply a packed allowed-token bitmask (llguidance's layout) to rows of a step's logits, in place.

Letters: S logit rows, V vocabulary, R masked rows, W = V/32 words per row; bit j of word w of a
row allows token 32 w + j. A blocked token's logit becomes -inf.

On CPU a numba kernel walks the words and writes only the blocked logits (a word or byte of all
ones, the common case inside free text, is skipped), rows in parallel: no [R, V] temporary and no row copy,
which a table-lookup-and-fill in torch needs and which costs about a third of a small model's step.
Elsewhere (a GPU), or without numba, one table lookup (byte -> 8 blocked flags) and one masked fill.
"""

from __future__ import annotations

import functools
import threading

import torch

try:
    import numba
    import numpy as np
    from numba import njit, prange
except ImportError:  # pragma: no cover - numba is a dependency; this keeps a broken install running
    numba = None


if numba is not None:

    @njit(parallel=True, cache=True, nogil=True)
    def _block_rows(logits, rows, bitmask):  # pragma: no cover - compiled
        V = logits.shape[1]
        for r in prange(bitmask.shape[0]):
            row = rows[r]
            for w in range(bitmask.shape[1]):
                word = bitmask[r, w]
                if word == -1:
                    continue
                for k in range(4):  # a byte at a time: blocked tokens are sparse inside free text
                    byte = (word >> (8 * k)) & 0xFF
                    if byte == 0xFF:
                        continue
                    base = w * 32 + 8 * k
                    for j in range(min(8, V - base)):
                        if (byte >> j) & 1 == 0:
                            logits[row, base + j] = -np.inf


_compile_lock = threading.Lock()


def apply_bitmask(logits: torch.Tensor, rows: list[int], bitmask: torch.Tensor) -> None:
    """Set to -inf, in place, each logit of `rows` (of logits [S, V]) whose bit in `bitmask`
    [len(rows), W] (int32) is 0, for all rows at once."""
    if numba is not None and logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.is_contiguous():
        args = (logits.numpy(), np.asarray(rows, dtype=np.int64), bitmask.contiguous().numpy())
        # numba's thread count is per OS thread, like torch's: never more threads than torch was given.
        numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))
        if not _block_rows.signatures:
            with _compile_lock:  # the first call compiles (or loads the cache); others wait for it
                _block_rows(*args)
                return
        _block_rows(*args)
        return
    S, V = logits.shape
    packed = bitmask.to(logits.device, non_blocking=True).view(torch.uint8).flatten().long()  # little-endian words
    blocked = _blocked_table(logits.device).index_select(0, packed).view(len(rows), -1)[:, :V]
    if len(rows) == S:
        logits.masked_fill_(blocked, float("-inf"))
        return
    index = torch.tensor(rows, device=logits.device)
    logits.index_copy_(0, index, logits.index_select(0, index).masked_fill_(blocked, float("-inf")))


@functools.cache
def _blocked_table(device: torch.device) -> torch.Tensor:
    """[256, 8] bool: whether bit j of byte b is 0."""
    return ((torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1).eq(0).to(device)
