"""Collectives: the all-reduce and broadcast of one expert-parallel group (shared memory, pairwise
gloo, or torch.distributed), with counters of what they moved.

torch.distributed is imported in parallel/ only; cluster/model never sees it.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from cluster.parallel.shm_collectives import ShmCollectives


class Collectives:
    """The group's collectives, with a count of the bytes handed to them (for the benchmark).

    NCCL groups use dist.all_reduce and dist.broadcast. CPU ranks on one node meet in shared memory
    (shm_collectives.py; `use_shm`, chosen at setup): a decode step's two all-reduces per layer
    took 26-210 us there against 0.3-1.9 ms on gloo (`bench experts` combine, 2 ranks, 2-core VM;
    results in docs/performance.md). Otherwise, on gloo, the SUM all-reduce is a pairwise exchange:
    every rank sends its tensor to every other rank (point-to-point, all in flight at once) and adds
    the N parts in rank order, so every rank gets bitwise the same sum; for the small [T, H] tensors
    of a decode step it beat gloo's own all_reduce (~0.15 ms against ~0.9 ms, 2 ranks, 2 KiB). For
    N = 2 it moves exactly the all-reduce minimum, 2 (N - 1) T H b bytes; for larger N, N / 2 times that.
    """

    def __init__(self, rank: int = 0, world: int = 1, pairwise: bool = False) -> None:
        self.rank, self.world, self.pairwise = rank, world, pairwise
        self.all_reduce_bytes = 0
        self.all_reduce_calls = 0
        self.broadcast_bytes = 0
        self.broadcast_calls = 0
        self.wait_s = 0.0  # time inside collectives (waiting for peers included)
        self.shm: ShmCollectives | None = None

    def use_shm(self, shm: ShmCollectives | None) -> None:
        """Run all_reduce and broadcast over shared memory from now on (None: stay on torch.distributed)."""
        self.shm = shm

    @property
    def shm_bytes(self) -> int:
        """Bytes this rank copied into the shared segment (what it "sent"; no socket counter sees them)."""
        return self.shm.bytes_copied_in if self.shm is not None else 0

    def all_reduce(self, t: torch.Tensor) -> None:
        t0 = time.perf_counter()
        if self.shm is not None:
            self.shm.all_reduce(t)
        elif self.pairwise and self.world > 1:
            self._exchange_sum(t)
        else:
            dist.all_reduce(t)
        self.wait_s += time.perf_counter() - t0
        self.all_reduce_bytes += t.numel() * t.element_size()
        self.all_reduce_calls += 1

    def _exchange_sum(self, t: torch.Tensor) -> None:
        if not t.is_contiguous():
            raise ValueError("all_reduce needs a contiguous tensor")
        parts: list[torch.Tensor] = []
        ops = []
        for peer in range(self.world):
            if peer == self.rank:
                parts.append(t)
                continue
            buf = torch.empty_like(t)
            parts.append(buf)
            ops += [dist.P2POp(dist.isend, t, peer), dist.P2POp(dist.irecv, buf, peer)]
        for work in dist.batch_isend_irecv(ops):
            work.wait()
        total = parts[0] + parts[1]
        for part in parts[2:]:
            total += part
        t.copy_(total)

    def broadcast(self, t: torch.Tensor) -> None:
        t0 = time.perf_counter()
        if self.shm is not None:
            self.shm.broadcast(t)
        else:
            dist.broadcast(t, src=0)
        self.wait_s += time.perf_counter() - t0
        self.broadcast_bytes += t.numel() * t.element_size()
        self.broadcast_calls += 1
