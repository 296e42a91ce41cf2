"""The process group of one expert-parallel replica: per-step metadata, the shard runtime, the driver.

Rank 0 lives in the Serve replica beside the scheduler; ranks 1..N-1 are worker actors
(workers.py). Every collective is driven by rank 0's per-step metadata, sent as ONE broadcast
(in shared memory when the ranks share a node, else torch.distributed) of a fixed-size int64
message (a second one only when a payload outgrows it):

    [HEADER] op, payload length, 0...   then the first MESSAGE - HEADER payload values
    [n - (MESSAGE - HEADER)] the rest of the payload (second broadcast, only for big payloads)

The payload is the encoded PagedBatch or a placement. ops: STEP (run the forward on the batch: two
SUM all-reduces per layer), NOOP (keepalive, so an idle worker's wait never reaches the collective
timeout), PLACE (new expert placement: experts move between ranks with point-to-point sends),
STOP. No Ray call happens per step or per layer.

torch.distributed is imported here and in workers.py only; cluster/model never sees it.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from cluster.model.paged import PagedBatch, PagedKVCache, paged_hidden
from cluster.model.transformer import GptOssModel
from cluster.parallel.expert_map import ExpertPlacement, static_placement
from cluster.parallel.sharding import ExpertParallelMoE, ShardInfo, memory_report, shard_model_
from cluster.parallel.shm_collectives import ShmCollectives, join_shm

log = logging.getLogger(__name__)

STEP, NOOP, PLACE, STOP = 1, 2, 3, 4
HEADER = 8
# int64 values per metadata broadcast. A decoding sequence takes ~6 values plus its block tables,
# so a decode step of the bench's 8 short sequences (~110) is one broadcast; prefill chunks and
# big batches add a second. On CPU a broadcast costs gloo's latency far more than its 2 KiB.
MESSAGE = 256


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _ray_node() -> str:
    """This process's Ray node id ("" outside Ray): ranks share memory only within one node."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
    except Exception:  # noqa: BLE001 - no Ray context: a single-host test group
        return ""


def node_ip() -> str:
    try:
        import ray

        return ray.util.get_node_ip_address()
    except Exception:  # outside Ray (unit tests): loopback
        return "127.0.0.1"


@dataclass
class GroupSpec:
    """Everything a rank needs to build its shard and join the group (plain data: crosses Ray)."""

    checkpoint: str
    world: int
    address: str
    port: int
    dtype: str = "float32"
    device: str = "cpu"
    placements: list[dict] = field(default_factory=list)  # per layer ExpertPlacement.to_dict()
    num_blocks: int = 0
    block_size: int = 16
    layer_group: list[int] = field(default_factory=list)
    layer_tensor: list[int] = field(default_factory=list)
    timeout_s: float = 10.0
    # torch threads of ranks 1..N-1, and of rank 0's layers on CPU. Rank 0 keeps its process's (the
    # engine's) for the unembedding and sampling: it alone runs them, while the workers wait, so it
    # may use the cores they leave idle (ShardRuntime.execute).
    torch_threads: int = 1

    @property
    def backend(self) -> str:
        return "nccl" if self.device.startswith("cuda") else "gloo"


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


# ---- metadata encoding -------------------------------------------------------------------------

def encode_batch(batch: PagedBatch) -> torch.Tensor:
    """A PagedBatch as one int64 tensor (lengths first, then every field)."""
    S, B, R, G = len(batch.input_ids), len(batch.context_lens), len(batch.logits_indices), len(batch.block_tables)
    widths = [t.shape[1] for t in batch.block_tables]
    parts = [torch.tensor([S, B, R, G, *widths]), batch.input_ids.cpu(), batch.positions.cpu(),
             torch.tensor(batch.query_start), torch.tensor(batch.context_lens)]
    parts += [s.cpu() for s in batch.slot_mapping] + [t.cpu().flatten() for t in batch.block_tables]
    parts.append(batch.logits_indices.cpu())
    return torch.cat([p.to(torch.long) for p in parts])


def decode_batch(t: torch.Tensor, device: torch.device | str) -> PagedBatch:
    t = t.cpu()
    S, B, R, G = t[:4].tolist()
    widths = t[4:4 + G].tolist()
    pos = 4 + G

    def take(n: int) -> torch.Tensor:
        nonlocal pos
        out = t[pos:pos + n]
        pos += n
        return out

    input_ids, positions = take(S), take(S)
    query_start, context_lens = take(B + 1).tolist(), take(B).tolist()
    slot_mapping = [take(S).to(device) for _ in range(G)]
    block_tables = [take(B * w).view(B, w).to(device) for w in widths]
    logits_indices = take(R)
    return PagedBatch(input_ids.to(device), positions.to(device), query_start, context_lens, slot_mapping,
                      block_tables, logits_indices.to(device))


def encode_placements(placements: list[ExpertPlacement]) -> torch.Tensor:
    values = [len(placements), placements[0].num_ranks, placements[0].num_experts]
    for p in placements:
        for slots in p.slots:
            values += [len(slots), *slots]
    return torch.tensor(values, dtype=torch.long)


def decode_placements(t: torch.Tensor) -> list[ExpertPlacement]:
    values = t.tolist()
    L, N, E = values[:3]
    pos, out = 3, []
    for _ in range(L):
        slots = []
        for _ in range(N):
            n = values[pos]
            slots.append(tuple(values[pos + 1:pos + 1 + n]))
            pos += 1 + n
        out.append(ExpertPlacement(E, tuple(slots)))
    return out


# ---- load statistics (rank 0) ------------------------------------------------------------------

class ExpertLoadStats:
    """Tokens routed to each expert of each layer: totals since start and over the last `window` steps."""

    def __init__(self, num_layers: int, num_experts: int, window: int = 256):
        self.totals = torch.zeros(num_layers, num_experts, dtype=torch.long)
        self._step = torch.zeros(num_layers, num_experts, dtype=torch.long)
        self._window: deque[torch.Tensor] = deque(maxlen=window)
        self._window_sum = torch.zeros_like(self.totals)  # kept with the window: every load report reads it
        self._lock = threading.Lock()

    def record(self, layer: int, top_idx: torch.Tensor) -> None:
        self._step[layer] += torch.bincount(top_idx.flatten().cpu(), minlength=self._step.shape[1])

    def end_step(self) -> None:
        with self._lock:
            self.totals += self._step
            if len(self._window) == self._window.maxlen:
                self._window_sum -= self._window[0]  # about to fall out of the window
            self._window.append(self._step.clone())
            self._window_sum += self._step
        self._step.zero_()

    def window_loads(self) -> torch.Tensor:
        """[L, E] tokens over the window."""
        with self._lock:
            return self._window_sum.clone()

    def to_dict(self) -> dict:
        return {"tokens_per_expert": self.window_loads().tolist(), "tokens_per_expert_total": self.totals.tolist()}


# ---- one rank ----------------------------------------------------------------------------------

class ShardRuntime:
    """One rank's shard of the model, its slice of the KV cache, and its place in the group."""

    def __init__(self, spec: GroupSpec, rank: int, model: GptOssModel | None = None,
                 stats: ExpertLoadStats | None = None):
        from cluster.model.checkpoint import load_model

        if rank > 0:  # rank 0 shares its process with the engine and keeps the engine's thread count
            torch.set_num_threads(spec.torch_threads)
        self.spec, self.rank = spec, rank
        self.device = torch.device(spec.device)
        if model is None:
            model = load_model(spec.checkpoint, dtype=getattr(torch, spec.dtype), device=spec.device)
        self.model = model
        self.comm = Collectives(rank, spec.world, pairwise=spec.backend == "gloo")
        self.stats = stats
        placements = [ExpertPlacement.from_dict(p) for p in spec.placements] or [
            static_placement("contiguous", model.config.num_local_experts, spec.world)
            for _ in range(model.config.num_hidden_layers)]
        self.placements = placements
        record = stats.record if stats is not None else None
        self.info: ShardInfo = shard_model_(model, rank, spec.world, placements, self.comm.all_reduce, record)
        self.cache = PagedKVCache.allocate(spec.num_blocks, spec.block_size, len(self.info.kv_heads),
                                           model.config.head_dim, spec.layer_group, spec.layer_tensor,
                                           model.dtype, self.device)
        if spec.backend == "nccl":
            torch.cuda.set_device(self.device)
        # Rendezvous waits for the slowest rank to load its shard (generous); collectives use the
        # short timeout, so a stalled peer fails a step in seconds rather than hanging it.
        store = dist.TCPStore(spec.address, spec.port, spec.world, is_master=rank == 0,
                              timeout=timedelta(seconds=max(120.0, spec.timeout_s)))
        dist.init_process_group(spec.backend, store=store, rank=rank, world_size=spec.world,
                                timeout=timedelta(seconds=spec.timeout_s))
        warm = torch.ones(1, device=self.device)
        dist.all_reduce(warm)  # every rank is here: the group works
        if int(warm.item()) != spec.world:
            raise RuntimeError(f"warm-up all_reduce gave {warm.item()}, expected {spec.world}")
        if spec.backend == "gloo" and spec.world > 1:  # None unless every rank is on one node
            self.comm.use_shm(join_shm(store, rank, spec.world, spec.timeout_s, node=_ray_node()))

    def execute(self, batch: PagedBatch) -> torch.Tensor:
        """The step's forward on this rank's shard -> normed hidden states [R, H] (the engine unembeds)."""
        # CPU rank 0 runs its layers on the workers' thread count: more threads there contend for
        # the cores the workers compute on. Its unembedding and the engine's sampling, while the
        # workers wait, get its own count back. Tiny preset, 2-core VM, shared-memory collectives,
        # ep2 tok/s best of 4: rank 0 on 2 threads all through ~740-890; on 1 ~1090-1270; 1 for
        # the layers and 2 for the unembedding (3.1 ms at 1 thread, 1.9 ms at 2) 1270-1340 on a
        # quiet box, less steady when other processes want the cores.
        outer = torch.get_num_threads()
        split = self.rank == 0 and self.spec.backend == "gloo" and outer != self.spec.torch_threads
        if split:
            torch.set_num_threads(self.spec.torch_threads)
        try:
            hidden = paged_hidden(self.model, batch, self.cache)
        finally:
            if split:
                torch.set_num_threads(outer)
        if self.stats is not None:
            self.stats.end_step()
        return hidden

    def moe_layers(self) -> list[ExpertParallelMoE]:
        return [block.mlp for block in self.model.blocks]

    def apply_placements(self, new: list[ExpertPlacement]) -> int:
        """Switch to `new` placements; experts this rank lacks arrive from a current holder. Returns experts received."""
        ops, received, keep = [], [], []
        tag = 0
        for layer, (moe, old, nxt) in enumerate(zip(self.moe_layers(), self.placements, new)):
            old_local = {e: x for x, e in enumerate(old.slots[self.rank])}
            incoming: dict[int, dict[str, torch.Tensor]] = {}
            for dst in range(nxt.num_ranks):
                for e in nxt.slots[dst]:
                    if e in old.slots[dst]:
                        continue
                    src = old.copies(e)[0]
                    for name in moe.tensor_names:
                        proto = getattr(moe, name)
                        if self.rank == src:
                            ops.append(dist.isend(proto[old_local[e]].contiguous(), dst, tag=tag))
                        elif self.rank == dst:
                            buf = torch.empty_like(proto[0])
                            incoming.setdefault(e, {})[name] = buf
                            ops.append(dist.irecv(buf, src, tag=tag))
                        tag += 1
            keep.append((moe, nxt, old_local, incoming))
            received.append(len(incoming))
        for op in ops:
            op.wait()
        for moe, nxt, old_local, incoming in keep:
            tensors = {}
            for name in moe.tensor_names:
                current = getattr(moe, name)
                rows = [current[old_local[e]] if e in old_local else incoming[e][name] for e in nxt.slots[self.rank]]
                tensors[name] = torch.stack(rows).contiguous()
            moe.set_experts(nxt, tensors)
        self.placements = list(new)
        return sum(received)

    def memory_report(self) -> dict:
        report = memory_report(self.model)
        kv = sum(t.numel() * t.element_size() for t in self.cache.k + self.cache.v)
        return {**report, "kv_cache_bytes": kv, "rank": self.rank, "q_heads": len(self.info.q_heads),
                "kv_heads": len(self.info.kv_heads),
                "experts": [list(p.slots[self.rank]) for p in self.placements]}

    def close(self) -> None:
        if self.comm.shm is not None:
            self.comm.shm.close()
            self.comm.use_shm(None)
        if dist.is_initialized():
            dist.destroy_process_group()


def _recv_message(runtime: ShardRuntime) -> tuple[int, torch.Tensor | None]:
    message = torch.empty(MESSAGE, dtype=torch.long, device=runtime.device)
    runtime.comm.broadcast(message)
    op, n = int(message[0]), int(message[1])
    if not n:
        return op, None
    first = message[HEADER:HEADER + n]
    if n <= MESSAGE - HEADER:
        return op, first
    rest = torch.empty(n - (MESSAGE - HEADER), dtype=torch.long, device=runtime.device)
    runtime.comm.broadcast(rest)
    return op, torch.cat((first, rest))


def worker_loop(runtime: ShardRuntime) -> int:
    """Ranks 1..N-1: follow rank 0's messages until STOP; returns the number of steps run."""
    steps = 0
    torch.set_num_threads(runtime.spec.torch_threads)  # per OS thread under OpenMP: the actor's call thread
    with torch.inference_mode():
        while True:
            op, payload = _recv_message(runtime)
            if op == STEP:
                batch = decode_batch(payload, runtime.device)
                # Only rank 0 samples: the unembedding (vocab x hidden, the largest matmul of a small
                # model's step) is skipped here; every collective sits before it.
                batch.logits_indices = batch.logits_indices[:0]
                runtime.execute(batch)
                steps += 1
            elif op == PLACE:
                runtime.apply_placements(decode_placements(payload))
            elif op == STOP:
                return steps
            elif op != NOOP:
                raise RuntimeError(f"rank {runtime.rank}: unknown op {op}")


class GroupDriver:
    """Rank 0: sends each message to the group, then does its own part. Thread-safe; one message at a time.

    Use as the engine runner's forward: `driver(batch) -> hidden states` (the runner unembeds). A
    keepalive thread sends NOOP when no message went out for `keepalive_s`, so idle workers never hit the collective timeout.
    """

    def __init__(self, runtime: ShardRuntime, keepalive_s: float = 1.0, rebalancer=None):
        self.runtime = runtime
        self.rebalancer = rebalancer  # rebalance.Rebalancer: consulted before each step
        self.rebalances: list = []  # RebalanceResult of each placement applied
        self._lock = threading.Lock()
        self._last = time.monotonic()
        self._closed = False
        self.error: BaseException | None = None
        self._keepalive_s = keepalive_s
        self._thread = threading.Thread(target=self._keepalive, name="ep-keepalive", daemon=True)
        self._thread.start()

    def _send(self, op: int, payload: torch.Tensor | None = None) -> None:
        if self.error is not None:
            raise RuntimeError("the expert-parallel group failed earlier") from self.error
        n = 0 if payload is None else payload.numel()
        message = torch.zeros(MESSAGE, dtype=torch.long)
        message[0], message[1] = op, n
        fits = min(n, MESSAGE - HEADER)
        if fits:
            message[HEADER:HEADER + fits] = payload[:fits]
        device = self.runtime.device
        try:
            self.runtime.comm.broadcast(message.to(device))
            if n > fits:
                self.runtime.comm.broadcast(payload[fits:].contiguous().to(device))
        except BaseException as err:
            self.error = err
            raise
        self._last = time.monotonic()

    @torch.inference_mode()
    def __call__(self, batch: PagedBatch) -> torch.Tensor:
        with self._lock:
            if self.rebalancer is not None:
                planned = self.rebalancer.maybe_plan(self.runtime.placements)
                if planned is not None:  # between steps: every rank switches before this step
                    self._send(PLACE, encode_placements(planned[0]))
                    self.runtime.apply_placements(planned[0])
                    self.rebalances.append(planned[1])
            self._send(STEP, encode_batch(batch))
            try:
                return self.runtime.execute(batch)
            except BaseException as err:  # a peer died mid-collective: the group is unusable
                self.error = err
                raise

    def apply_placements(self, placements: list[ExpertPlacement]) -> int:
        """Between steps: every rank switches to `placements` (experts move by point-to-point sends)."""
        with self._lock, torch.inference_mode():
            self._send(PLACE, encode_placements(placements))
            return self.runtime.apply_placements(placements)

    def _keepalive(self) -> None:
        while not self._closed:
            time.sleep(self._keepalive_s / 4)
            if self._closed or self.error is not None:
                return
            if time.monotonic() - self._last < self._keepalive_s:
                continue
            with self._lock:
                if self._closed or time.monotonic() - self._last < self._keepalive_s:
                    continue
                try:
                    self._send(NOOP)
                except BaseException:
                    log.exception("expert-parallel keepalive failed; the group is down")
                    return

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self.error is None:
                try:
                    self._send(STOP)
                except BaseException:
                    pass
        self.runtime.close()
