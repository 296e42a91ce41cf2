"""Shared-memory SUM all-reduce and broadcast for the CPU ranks of one group on one node.

On gloo every collective wait costs ~0.5-1 ms on a small VM (gloo's TCP loop thread, condition
variable wake-ups, the vCPU halting and waking), and a decode step of the tiny preset waits nine
times. Here the ranks of a group map one file under /dev/shm and meet through counters in it.

Layout (every field on its own 64-byte line, so ranks never write the same cache line):

    line 0                     nonce (rank 0 writes it; the others check they mapped the same file)
    line 1 + r                 rank r's counters: READY (its slot holds op `seq`'s data), DONE (it
                               finished reading op `seq`). Rank r alone writes its line.
    data                       rank r's two slots (parity 0 and 1) of `slot_bytes` each

Every rank numbers its collectives 1, 2, 3, ... in the same order (they are SPMD), so op `seq`
uses parity `seq % 2`. all_reduce: copy the tensor into the own slot, publish READY = seq, wait
until every peer's READY >= seq, add the N slots IN RANK ORDER (every rank gets bitwise the same
sum), publish DONE = seq. broadcast: the root copies into its slot and publishes READY and DONE;
the others wait for the root's READY, copy out, publish DONE. The root does not wait for them.

Why a slot is never overwritten while a peer reads it: before writing its slot for op `seq`, a
rank waits until every peer's DONE >= seq - 2, i.e. every peer has finished reading op seq - 2,
the last op that used this parity. In a run of all-reduces this is always already true (finishing
op seq - 1 needed every peer's READY >= seq - 1, published after its DONE = seq - 2); it only
waits after a root ran two broadcasts ahead of a slow reader.

Memory order: the data is stored before its counter and read after the counter is seen. On
x86-64 (TSO) stores become visible to other cores in program order and loads are not reordered
with older loads, so a reader that sees READY = seq sees the data stored before it; nor are
loads reordered with later stores, so a slot's reads are over before the reader's DONE shows.
The counters are aligned 8-byte stores and loads (single instructions, never torn). The Python
interpreter makes each step an opaque C call, so no compiler reorders them either. A big copy
may run on torch's OpenMP threads: their region ends (and starts) with a barrier of locked
instructions before the counter is stored (after it is seen), and x86-64 keeps that order
transitively across cores. Other architectures (Arm, POWER) need fences that Python cannot
issue: there `available()` is False and the group keeps the gloo path.

Tensors bigger than a slot go in slot-sized chunks, one op each. Slots default to 1 MiB (a prefill
chunk of 256 tokens x hidden 1024 fp32; the tiny preset's decode step moves 2 KiB), so the
segment is 2 N MiB of tmpfs, touched only as far as messages reach.

The file is unlinked by rank 0 as soon as every rank has mapped it (the mappings keep the memory),
so a crash after setup leaves nothing in /dev/shm; it is also unlinked if setup fails.
"""

from __future__ import annotations

import mmap
import os
import platform
import secrets
import time

import torch

from cluster.procfs import alive

LINE = 64
READY, DONE = 0, 1  # int64 index within a rank's counter line
SLOT_BYTES = 1 << 20
SHM_DIR = "/dev/shm"
PREFIX = "gptoss-ep-"

# Waiting: spin first (mid-step a peer usually arrives within tens of microseconds), then sleep in
# growing naps so a rank waiting for the next step (rank 0 unembeds and samples meanwhile) does
# not take the core rank 0 needs; past IDLE_AFTER_S the group is idle (the keepalive comes once a
# second) and naps grow to IDLE_SLEEP_S: an idle waiter took ~3% of a core, against ~9% with
# naps kept at 200 us. Every LIVENESS_S the waiter checks that the late peers still live.
# Measured (`bench experts`' ep2 engine alone, tiny preset, 2-core VM, best of 4 runs, tok/s):
# spin 50 us + naps 20..200 us 1159 and 1225; spin 300 us 1137; spin 2 ms 1224; spin 10 us +
# naps 50 us..1 ms 891 (a late wake-up delays every step). Within the noise the spins tie, so the
# shortest of them stays: it takes the least from a busy peer.
SPIN_S = 50e-6
SLEEP_FIRST_S = 20e-6
SLEEP_MAX_S = 200e-6
IDLE_AFTER_S = 20e-3
IDLE_SLEEP_S = 2e-3
LIVENESS_S = 5e-3


def available() -> bool:
    """This host can run the shared-memory path: x86-64 (see the module doc) with a /dev/shm."""
    return platform.machine().lower() in ("x86_64", "amd64") and os.path.isdir(SHM_DIR) and os.access(SHM_DIR, os.W_OK)


def pid_namespace() -> str:
    """This process's pid namespace (liveness checks by pid need every rank in the same one)."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def segment_bytes(world: int, slot_bytes: int) -> int:
    return LINE * (1 + world) + 2 * world * slot_bytes


class ShmSegment:
    """One group's mapped file. Rank 0 `create`s it; the others map it by name (create=False) and
    compare its nonce with the one rank 0 published."""

    def __init__(self, name: str, world: int, slot_bytes: int, create: bool):
        if slot_bytes % LINE:
            raise ValueError(f"slot_bytes must be a multiple of {LINE}")
        self.name, self.world, self.slot_bytes = name, world, slot_bytes
        self.path = os.path.join(SHM_DIR, name)
        size = segment_bytes(world, slot_bytes)
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = os.open(self.path, flags, 0o600)
        try:
            if create:
                os.ftruncate(fd, size)
            elif os.fstat(fd).st_size != size:
                raise RuntimeError(f"shared segment {name} has {os.fstat(fd).st_size} bytes, expected {size}")
            self.mm = mmap.mmap(fd, size)
        except BaseException:
            if create:
                os.unlink(self.path)
            raise
        finally:
            os.close(fd)
        self.counters = memoryview(self.mm).cast("q")  # int64 views: aligned single loads/stores
        # Never an inference tensor, whatever the caller's mode: the engine's steps copy into the
        # slots in inference mode, the driver's idle keepalive outside it.
        with torch.inference_mode(False):
            self.bytes = torch.frombuffer(self.mm, dtype=torch.uint8)

    @classmethod
    def create(cls, world: int, slot_bytes: int = SLOT_BYTES) -> ShmSegment:
        seg = cls(PREFIX + secrets.token_hex(8), world, slot_bytes, create=True)
        seg.counters[0] = secrets.randbits(62) + 1
        return seg

    @property
    def nonce(self) -> int:
        return self.counters[0]

    def counter(self, rank: int, which: int) -> int:
        return self.counters[(LINE // 8) * (1 + rank) + which]

    def publish(self, rank: int, which: int, value: int) -> None:
        self.counters[(LINE // 8) * (1 + rank) + which] = value

    def slot(self, rank: int, parity: int) -> torch.Tensor:
        start = LINE * (1 + self.world) + (2 * rank + parity) * self.slot_bytes
        return self.bytes[start:start + self.slot_bytes]

    def unlink(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def close(self) -> None:
        self.counters.release()
        del self.bytes
        try:
            self.mm.close()
        except BufferError:  # a caller still holds a slot view: the mapping goes with it
            pass


class ShmCollectives:
    """SUM all-reduce (in place) and broadcast from rank 0 over a ShmSegment. Not thread-safe:
    like the gloo group, one caller at a time (the driver's lock, the worker's loop)."""

    def __init__(self, segment: ShmSegment, rank: int, pids: list[int], timeout_s: float):
        self.seg, self.rank, self.world = segment, rank, segment.world
        self.pids, self.timeout_s = pids, timeout_s
        self.peers = [r for r in range(self.world) if r != rank]
        self.seq = 0
        self.bytes_copied_in = 0  # bytes this rank copied into the segment (its "sent" bytes)
        self._slot_views: dict[tuple[int, int, torch.dtype], torch.Tensor] = {}

    def _view(self, rank: int, parity: int, dtype: torch.dtype) -> torch.Tensor:
        key = (rank, parity, dtype)
        view = self._slot_views.get(key)
        if view is None:
            with torch.inference_mode(False):  # a normal tensor, written in either mode (see ShmSegment)
                view = self._slot_views[key] = self.seg.slot(rank, parity).view(dtype)
        return view

    def _wait(self, ranks: list[int], which: int, seq: int) -> None:
        seg = self.seg
        if all(seg.counter(r, which) >= seq for r in ranks):
            return
        t0 = time.perf_counter()
        spin_until = t0 + SPIN_S
        while time.perf_counter() < spin_until:
            if all(seg.counter(r, which) >= seq for r in ranks):
                return
        nap, next_check = SLEEP_FIRST_S, t0 + LIVENESS_S
        while True:
            time.sleep(nap)
            if all(seg.counter(r, which) >= seq for r in ranks):
                return
            now = time.perf_counter()
            nap = min(nap * 2, SLEEP_MAX_S if now - t0 < IDLE_AFTER_S else IDLE_SLEEP_S)
            if now >= next_check:
                next_check = now + LIVENESS_S
                late = [r for r in ranks if seg.counter(r, which) < seq]
                dead = [r for r in late if not alive(self.pids[r])]
                if dead:
                    raise RuntimeError(f"rank {self.rank}: rank {dead[0]} (pid {self.pids[dead[0]]}) exited "
                                       f"during a shared-memory collective")
                if now - t0 > self.timeout_s:
                    raise RuntimeError(f"rank {self.rank}: rank {late[0]} did not reach collective {seq} "
                                       f"within {self.timeout_s:.0f} s")

    def _chunks(self, t: torch.Tensor):
        if not t.is_contiguous():
            raise ValueError("shared-memory collectives need a contiguous tensor")
        flat = t.view(-1)
        step = self.seg.slot_bytes // t.element_size()
        for start in range(0, flat.numel(), step):
            yield flat[start:start + step]

    def all_reduce(self, t: torch.Tensor) -> None:
        seg, rank = self.seg, self.rank
        for chunk in self._chunks(t):
            self.seq += 1
            seq, parity, n = self.seq, self.seq % 2, chunk.numel()
            self._wait(self.peers, DONE, seq - 2)
            self._view(rank, parity, chunk.dtype)[:n].copy_(chunk)
            self.bytes_copied_in += n * chunk.element_size()
            seg.publish(rank, READY, seq)
            self._wait(self.peers, READY, seq)
            parts = [self._view(r, parity, chunk.dtype)[:n] for r in range(self.world)]
            torch.add(parts[0], parts[1], out=chunk)
            for part in parts[2:]:
                chunk += part
            seg.publish(rank, DONE, seq)

    def broadcast(self, t: torch.Tensor) -> None:
        seg, rank = self.seg, self.rank
        for chunk in self._chunks(t):
            self.seq += 1
            seq, parity, n = self.seq, self.seq % 2, chunk.numel()
            if rank == 0:
                self._wait(self.peers, DONE, seq - 2)
                self._view(0, parity, chunk.dtype)[:n].copy_(chunk)
                self.bytes_copied_in += n * chunk.element_size()
                seg.publish(0, READY, seq)
            else:
                self._wait([0], READY, seq)
                chunk.copy_(self._view(0, parity, chunk.dtype)[:n])
            seg.publish(rank, DONE, seq)

    def close(self) -> None:
        self._slot_views.clear()
        self.seg.close()


def _map_offer(offer: dict, world: int, slot_bytes: int) -> ShmSegment | None:
    """Rank 0's segment as another rank maps it; None when there is none or this rank cannot map
    it (a container with its own /dev/shm), or the file it maps is not the one offered."""
    if not offer:
        return None
    try:
        seg = ShmSegment(offer["name"], world, slot_bytes, create=False)
    except (OSError, RuntimeError):
        return None
    if seg.nonce != offer["nonce"]:
        seg.close()
        return None
    return seg


def join_shm(store, rank: int, world: int, timeout_s: float, slot_bytes: int = SLOT_BYTES,
             node: str = "") -> ShmCollectives | None:
    """Every rank of the group calls this once, over the group's TCPStore; all get a ShmCollectives or
    all get None (then the group stays on gloo): when the ranks are on different nodes (`node`: the
    rank's Ray node id, decided by the scheduler, not by which files happen to be visible: several
    Ray nodes may share one host and its /dev/shm), when a rank is not on x86-64 with a /dev/shm,
    when the ranks are in different pid namespaces, or when a rank cannot map rank 0's file (a
    container with its own /dev/shm)."""
    import json

    store.set(f"shm/rank/{rank}", json.dumps({"pid": os.getpid(), "pidns": pid_namespace(), "ok": available(),
                                              "node": node}))
    infos = [json.loads(store.get(f"shm/rank/{r}")) for r in range(world)]
    eligible = (all(i["ok"] for i in infos) and len({i["pidns"] for i in infos}) == 1 and infos[0]["pidns"]
                and len({i["node"] for i in infos}) == 1)
    seg = None
    try:
        if rank == 0:
            if eligible:
                seg = ShmSegment.create(world, slot_bytes)
            store.set("shm/segment", json.dumps({"name": seg.name, "nonce": seg.nonce} if seg else {}))
        else:
            seg = _map_offer(json.loads(store.get("shm/segment")), world, slot_bytes)
        store.set(f"shm/mapped/{rank}", "1" if seg else "0")
        mapped = [store.get(f"shm/mapped/{r}") == b"1" for r in range(world)]
    finally:
        if rank == 0 and seg is not None:
            seg.unlink()  # every rank has mapped it (or given up): the mappings keep the memory
    if not all(mapped):
        if seg is not None:
            seg.close()
        return None
    return ShmCollectives(seg, rank, [i["pid"] for i in infos], timeout_s)
