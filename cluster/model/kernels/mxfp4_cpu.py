"""MXFP4 expert matmuls on CPU without a dense copy: codes and scales are decoded in registers.

`grouped_matmul(blocks, scales, x, experts, offsets)` computes, for each chosen expert m, the
rows x[offsets[m]:offsets[m+1]] (tokens grouped by expert) times that expert's packed matrix,
transposed: out[t, r] = sum_c x[t, c] * W[experts[m], r, c], with W = mxfp4.unpack(blocks, scales).
Shape letters: E experts, R output rows, G = C/32 blocks per row, N grouped token rows, M experts used.
One call covers every chosen expert of a layer; threads split (expert, row range) items.

Three kernels, the first that can run (`kernel=` forces one):
- bf16: mxfp4_avx512bf16.c, for bf16 activations (the bf16 model's) on a CPU with AVX-512 BF16.
  `vpermw` looks both nibbles of a byte up as a bf16 pair and one `vdpbf16ps` multiplies a block's 32
  weights by 32 activations: about half the instructions per block of the float32 kernel, 1.5x its
  speed on a 20b expert at one token and 2x at two (docs/performance.md).
- native: mxfp4_avx512.c (built on first use, see native.py), called through ctypes, for any
  activations (converted to float32). A block's bytes widen to 16 lanes and `vpermps` looks both
  nibbles up in the 16 E2M1 values.
- numba: the same loop in numba (any CPU numba supports). A nibble's doubled E2M1 magnitude is read
  from one 32-bit constant (4 bits per code), so the decode vectorizes without a table gather.
Where none runs, `available()` is False and callers keep the unpack-then-matmul path.

All multiply a block's decoded codes by its E8M0 scale (a power of two, so exact) and sum the whole
row in float32 lanes: every product is the one unpack-then-matmul forms (a bf16 weight times a bf16
activation is exact in float32), only the order of the float32 sum differs. The float32 kernels split
activations into even and odd columns once per call (low and high nibbles); the bf16 one reads them as
they are.
"""

from __future__ import annotations

import ctypes
import threading

import numpy as np
import torch

from cluster.model import mxfp4
from cluster.model.kernels import native

try:
    import numba
    from numba import njit, prange
except ImportError:  # pragma: no cover - numba is a dependency; this keeps a broken install running
    numba = None

ROWS_PER_ITEM = 32  # output rows per work item of the native kernel: enough items to balance threads
DOUBLED_E2M1 = 0xC8643210  # 2 * |E2M1| of codes 0..7 (0, 1, 2, 3, 4, 6, 8, 12), 4 bits each


def available() -> bool:
    """Whether either kernel runs here."""
    return numba is not None or native_available()


if numba is not None:

    @njit(parallel=True, fastmath=True, cache=True, nogil=True)
    def _grouped_numba(blocks, scales, xe, xo, experts, offsets, out, half_powers):  # pragma: no cover - compiled
        R, G = scales.shape[1], scales.shape[2]
        for i in prange(experts.shape[0] * R):
            m = i // R
            r = i - m * R
            e = experts[m]
            t0, t1 = offsets[m], offsets[m + 1]
            acc = np.zeros((t1 - t0, 32), np.float32)  # float32 lanes per token, summed once per row
            we = np.empty(16, np.float32)
            wo = np.empty(16, np.float32)
            for g in range(G):
                s = half_powers[scales[e, r, g]]
                for j in range(16):
                    b = np.int32(blocks[e, r, g, j])
                    lo, hi = b & 15, b >> 4
                    vl = np.float32(np.int32((DOUBLED_E2M1 >> ((lo & 7) * 4)) & 15))
                    vh = np.float32(np.int32((DOUBLED_E2M1 >> ((hi & 7) * 4)) & 15))
                    we[j] = (-vl if lo & 8 else vl) * s
                    wo[j] = (-vh if hi & 8 else vh) * s
                for t in range(t1 - t0):
                    for j in range(16):
                        acc[t, j] += we[j] * xe[t0 + t, g * 16 + j]
                        acc[t, 16 + j] += wo[j] * xo[t0 + t, g * 16 + j]
            for t in range(t1 - t0):
                out[t0 + t, r] = acc[t].sum()


_native = None  # the native kernel (a ctypes function); False once it cannot be had
_native_bf16 = None  # the bf16 one, likewise
_lock = threading.Lock()
KERNELS = ("bf16", "native", "numba")


def _native_kernel():
    global _native
    if _native is None:
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        _native = native.function("mxfp4_avx512", "mxfp4_grouped",
                                  [ptr, ptr, i64, i64, ptr, ptr, ptr, ptr, i64, ptr, ptr, i64, ctypes.c_int]) or False
    return _native or None


def _bf16_kernel():
    global _native_bf16
    if _native_bf16 is None:
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        _native_bf16 = native.supported_function(
            "mxfp4_avx512bf16", "mxfp4_bf16_supported", "mxfp4_grouped_bf16",
            [ptr, ptr, i64, i64, ptr, ptr, ptr, i64, ptr, ptr, i64, ctypes.c_int], restype=ctypes.c_int) or False
    return _native_bf16 or None


_tables_np: tuple[np.ndarray, np.ndarray] | None = None


def _tables() -> tuple[np.ndarray, np.ndarray]:
    """(2**(s-127), 2**(s-128)) float32 by scale byte s: the native kernel's and numba's scales."""
    global _tables_np
    if _tables_np is None:
        powers = mxfp4._tables(torch.device("cpu"))[1].numpy()
        _tables_np = (powers, (powers * np.float32(0.5)).astype(np.float32))  # exact: powers of two
    return _tables_np


def native_available() -> bool:
    """Whether the AVX-512 kernel runs here (builds it on first call)."""
    return _native_kernel() is not None


def bf16_available() -> bool:
    """Whether the AVX-512 BF16 kernel runs here (builds it on first call)."""
    return _bf16_kernel() is not None


def grouped_matmul(blocks: torch.Tensor, scales: torch.Tensor, x: torch.Tensor, experts: torch.Tensor,
                   offsets: torch.Tensor, *, kernel: str | None = None) -> torch.Tensor:
    """blocks [E, R, G, 16] u8, scales [E, R, G] u8, x [N, G*32] (grouped by expert), experts [M],
    offsets [M+1] -> float32 [N, R]; row t of x meets expert experts[m] for offsets[m] <= t < offsets[m+1].
    `kernel` forces one of KERNELS ("bf16" takes bf16 activations only); default: the first that runs here."""
    if not blocks.is_contiguous() or not scales.is_contiguous():
        raise ValueError("packed expert blocks and scales must be contiguous")
    if kernel is None:
        kernel = ("bf16" if x.dtype == torch.bfloat16 and bf16_available() else
                  "native" if native_available() else "numba")
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    N, R = x.shape[0], scales.shape[1]
    out = torch.empty(N, R, dtype=torch.float32)
    if N == 0:
        return out
    experts_np = experts.to(torch.int64).contiguous().numpy()
    offsets_np = offsets.to(torch.int64).contiguous().numpy()
    powers, half_powers = _tables()
    # Threads follow what this OS thread gave torch (the actor's CPU share under Ray); the native
    # kernels run them in torch's own OpenMP runtime.
    threads = torch.get_num_threads()
    if kernel == "bf16":
        fn = _bf16_kernel()
        if fn is None:
            raise RuntimeError("the AVX-512 BF16 MXFP4 kernel cannot run here (needs AVX512_BF16 and a C compiler)")
        if x.dtype != torch.bfloat16:
            raise ValueError(f"the bf16 kernel takes bf16 activations, got {x.dtype}")
        xb = x.contiguous()
        if fn(blocks.data_ptr(), scales.data_ptr(), R, scales.shape[2], xb.data_ptr(), experts_np.ctypes.data,
              offsets_np.ctypes.data, len(experts_np), out.data_ptr(), powers.ctypes.data, ROWS_PER_ITEM, threads):
            raise MemoryError("the BF16 MXFP4 kernel could not allocate its split activations")
        return out
    xs = x.to(torch.float32)
    xe, xo = xs[:, 0::2].contiguous().numpy(), xs[:, 1::2].contiguous().numpy()  # low / high nibbles' columns
    if kernel == "native":
        fn = _native_kernel()
        if fn is None:
            raise RuntimeError("the AVX-512 MXFP4 kernel cannot run here (needs an AVX512 CPU and a C compiler)")
        fn(blocks.data_ptr(), scales.data_ptr(), R, scales.shape[2], xe.ctypes.data, xo.ctypes.data,
           experts_np.ctypes.data, offsets_np.ctypes.data, len(experts_np), out.data_ptr(), powers.ctypes.data,
           ROWS_PER_ITEM, threads)
        return out
    if numba is None:
        raise RuntimeError("no MXFP4 CPU kernel runs here (no AVX512 CPU or C compiler, and no numba)")
    numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
    with _lock if not _grouped_numba.signatures else _NO_LOCK:  # the first call compiles; others wait
        _grouped_numba(blocks.numpy(), scales.numpy(), xe, xo, experts_np, offsets_np, out.numpy(), half_powers)
    return out


class _NoLock:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


_NO_LOCK = _NoLock()
