"""Weights in 2 MB pages: copies of large checkpoint tensors in anonymous memory that the kernel backs
with transparent huge pages, instead of the checkpoint's mapped 4 KB pages.

A batch-1 CPU decode step streams every weight it uses once; over 4 KB pages that is a TLB miss every
4 KB, and the hardware prefetchers stop at each page boundary. On gpt-oss-20b's shapes, 2 MB pages made
a layer ~12% faster (docs/performance.md). The cost: the copies are this process's own memory, where the
mapped pages were shared page cache (replicas on one host loading one checkpoint share it).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
from pathlib import Path

import torch

PAGE = 2 << 20
MIN_BYTES = PAGE  # smaller tensors would not fill one 2 MB page
_MADV_DONTNEED, _MADV_HUGEPAGE = 4, 14
_THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")
_libc = None


def _madvise(address: int, length: int, advice: int) -> int:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return _libc.madvise(address, length, advice)


def available() -> bool:
    """Whether the kernel gives transparent huge pages to memory that asks for them (mode always or madvise)."""
    try:
        mode = _THP_MODE.read_text()
    except OSError:
        return False
    return "[always]" in mode or "[madvise]" in mode


def copy_to_hugepages(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of CPU tensor `t` in memory advised for 2 MB pages (its start 2 MB-aligned).

    The memory is a fresh anonymous mapping: memory from the allocator may be pages already touched
    (4 KB ones), which the advice does not turn into 2 MB pages."""
    nbytes = t.numel() * t.element_size()
    region = mmap.mmap(-1, nbytes + PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    buffer = torch.frombuffer(region, dtype=torch.uint8)  # keeps `region` mapped while it lives
    start = -buffer.data_ptr() % PAGE
    _madvise(buffer.data_ptr() + start, (nbytes + PAGE - 1) // PAGE * PAGE, _MADV_HUGEPAGE)
    copy = buffer[start:start + nbytes].view(t.dtype).view(t.shape)  # keeps `buffer` alive as its base
    copy.copy_(t)
    return copy


def release_mapped(t: torch.Tensor) -> None:
    """Drop this process's pages of `t`, a view of a private read-only file mapping that nothing wrote
    (a loaded checkpoint tensor, once copied): they stop counting as resident; the page cache keeps them."""
    page = 4096
    first = -(-t.data_ptr() // page) * page  # whole pages inside the tensor only: neighbours stay mapped
    last = (t.data_ptr() + t.numel() * t.element_size()) // page * page
    if last > first:
        _madvise(first, last - first, _MADV_DONTNEED)
