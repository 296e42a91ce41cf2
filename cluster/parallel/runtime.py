"""One rank of an expert-parallel group: its shard of the model, its slice of the KV cache, its
place in the process group (ShardRuntime), and the loop ranks 1..N-1 run (`worker_loop`).

The protocol the loop follows, and the invariants every rank keeps, are in protocol.py.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from cluster.model.paged import PagedBatch, PagedKVCache, paged_hidden
from cluster.model.transformer import GptOssModel
from cluster.parallel.collectives import Collectives
from cluster.parallel.expert_map import ExpertPlacement, static_placement
from cluster.parallel.protocol import NOOP, PLACE, STEP, STOP, decode_batch, decode_placements, recv_message
from cluster.parallel.rebalance import ExpertLoadStats
from cluster.parallel.sharding import ExpertParallelMoE, ShardInfo, memory_report, shard_model_
from cluster.parallel.shm_collectives import join_shm


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
        """Switch to `new` placements; experts this rank lacks arrive from a current holder. Returns experts received.

        Every rank posts the same sends and receives in the same order (one tag each), then waits
        for all of them, then rebuilds its experts from what it kept and what arrived."""
        tags = itertools.count()
        ops: list = []
        layers = []
        for moe, old, nxt in zip(self.moe_layers(), self.placements, new):
            layers.append((moe, old, nxt, self._post_moves(moe, old, nxt, tags, ops)))
        for op in ops:
            op.wait()
        for moe, old, nxt, incoming in layers:
            kept = {e: x for x, e in enumerate(old.slots[self.rank])}
            tensors = {name: torch.stack([getattr(moe, name)[kept[e]] if e in kept else incoming[e][name]
                                          for e in nxt.slots[self.rank]]).contiguous()
                       for name in moe.tensor_names}
            moe.set_experts(nxt, tensors)
        self.placements = list(new)
        return sum(len(incoming) for *_, incoming in layers)

    def _post_moves(self, moe: ExpertParallelMoE, old: ExpertPlacement, nxt: ExpertPlacement, tags, ops: list
                    ) -> dict[int, dict[str, torch.Tensor]]:
        """Post this rank's part of one layer's expert moves (each expert a rank gains comes from its
        first current holder); returns the receive buffers, by expert and tensor name."""
        kept = {e: x for x, e in enumerate(old.slots[self.rank])}
        incoming: dict[int, dict[str, torch.Tensor]] = {}
        arrivals = [(dst, e) for dst in range(nxt.num_ranks) for e in nxt.slots[dst] if e not in old.slots[dst]]
        for dst, e in arrivals:
            src = old.copies(e)[0]
            for name in moe.tensor_names:
                tag = next(tags)
                if self.rank == src:
                    ops.append(dist.isend(getattr(moe, name)[kept[e]].contiguous(), dst, tag=tag))
                elif self.rank == dst:
                    buf = incoming.setdefault(e, {})[name] = torch.empty_like(getattr(moe, name)[0])
                    ops.append(dist.irecv(buf, src, tag=tag))
        return incoming

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



def worker_loop(runtime: ShardRuntime) -> int:
    """Ranks 1..N-1: follow rank 0's messages until STOP; returns the number of steps run."""
    steps = 0
    torch.set_num_threads(runtime.spec.torch_threads)  # per OS thread under OpenMP: the actor's call thread
    with torch.inference_mode():
        while True:
            op, payload = recv_message(runtime.comm, runtime.device)
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
