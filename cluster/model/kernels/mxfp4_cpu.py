"""MXFP4 expert matmuls on CPU without a dense copy: codes and scales are decoded in registers.

`grouped_matmul(blocks, scales, x, experts, offsets)` computes, for each chosen expert m, the
rows x[offsets[m]:offsets[m+1]] (tokens grouped by expert) times that expert's packed matrix,
transposed: out[t, r] = sum_c x[t, c] * W[experts[m], r, c], with W = mxfp4.unpack(blocks, scales).
Shape letters: E experts, R output rows, G = C/32 blocks per row, N grouped token rows, M experts used.

The kernel is numba (compiled for the host CPU on first use and cached beside this file), so it
needs no compiler at install time and runs on any CPU numba supports, AVX-512 or not. Without numba,
`available()` is False and callers keep the unpack-then-matmul path.

Each block's 16 bytes are read once; a 256-entry table turns a byte into its two E2M1 values, and
the block's E8M0 scale (a power of two) multiplies the block's partial sum, so every product is
the one unpack-then-matmul forms (the scale is exact) and only the float32 summation order differs.
With one token per expert (decode) the codes feed the dot product directly; with several, a block
is decoded once into 32 floats and reused for every token.
"""

from __future__ import annotations

import threading

import numpy as np
import torch

from cluster.model import mxfp4

try:
    import numba
    from numba import njit, prange
except ImportError:  # pragma: no cover - numba is a dependency; this keeps a broken install running
    numba = None


def available() -> bool:
    return numba is not None


if numba is not None:

    @njit(parallel=True, fastmath={"reassoc", "contract"}, cache=True, nogil=True)
    def _grouped(blocks, scales, x, experts, offsets, out, pairs, powers):  # pragma: no cover - compiled
        R, G = scales.shape[1], scales.shape[2]
        for i in prange(experts.shape[0] * R):
            m = i // R
            r = i - m * R
            e = experts[m]
            t0, t1 = offsets[m], offsets[m + 1]
            if t1 - t0 == 1:
                total = np.float32(0.0)
                for g in range(G):
                    acc = np.float32(0.0)
                    base = g * 32
                    for j in range(16):
                        b = blocks[e, r, g, j]
                        acc += pairs[b, 0] * x[t0, base + 2 * j] + pairs[b, 1] * x[t0, base + 2 * j + 1]
                    total += acc * powers[scales[e, r, g]]
                out[t0, r] = total
            else:
                w = np.empty(32, dtype=np.float32)
                totals = np.zeros(t1 - t0, dtype=np.float32)
                for g in range(G):
                    for j in range(16):
                        b = blocks[e, r, g, j]
                        w[2 * j] = pairs[b, 0]
                        w[2 * j + 1] = pairs[b, 1]
                    s = powers[scales[e, r, g]]
                    base = g * 32
                    for t in range(t0, t1):
                        acc = np.float32(0.0)
                        for k in range(32):
                            acc += w[k] * x[t, base + k]
                        totals[t - t0] += acc * s
                for t in range(t0, t1):
                    out[t, r] = totals[t - t0]


_tables_np: tuple[np.ndarray, np.ndarray] | None = None
_compile_lock = threading.Lock()


def _tables() -> tuple[np.ndarray, np.ndarray]:
    global _tables_np
    if _tables_np is None:
        pairs, powers = mxfp4._tables(torch.device("cpu"))
        _tables_np = (pairs.numpy(), powers.numpy())
    return _tables_np


def grouped_matmul(blocks: torch.Tensor, scales: torch.Tensor, x: torch.Tensor, experts: torch.Tensor,
                   offsets: torch.Tensor) -> torch.Tensor:
    """blocks [E, R, G, 16] u8, scales [E, R, G] u8, x [N, G*32] (grouped by expert), experts [M],
    offsets [M+1] -> float32 [N, R]; row t of x meets expert experts[m] for offsets[m] <= t < offsets[m+1]."""
    if not blocks.is_contiguous() or not scales.is_contiguous():
        raise ValueError("packed expert blocks and scales must be contiguous")
    N, R = x.shape[0], scales.shape[1]
    out = torch.empty(N, R, dtype=torch.float32)
    if N == 0:
        return out
    xs = x.to(torch.float32).contiguous()
    args = (blocks.numpy(), scales.numpy(), xs.numpy(), experts.to(torch.int64).contiguous().numpy(),
            offsets.to(torch.int64).contiguous().numpy(), out.numpy(), *_tables())
    # numba's thread count is per OS thread, like torch's: follow what this thread gave torch (the
    # actor's CPU share under Ray), so the two never run more threads than that between them.
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))
    if not _grouped.signatures:
        with _compile_lock:  # the first call compiles (or loads the cache); others wait for it
            _grouped(*args)
            return out
    _grouped(*args)
    return out
