"""Shard a loaded GptOssModel from the outside (gpt-fast tp.py style): the model never knows.

One rank of an expert-parallel group of N keeps:
- attention: its query heads (N split evenly) and the kv heads they read; the qkv rows, the out
  projection's input columns and the sinks of those heads. The out bias stays on rank 0 only,
  so the SUM all-reduce after `attn.out` (a forward hook) gives the full projection.
- MoE: the router (replicated: every rank routes every token, identically), and only the experts
  its placement slots name — MXFP4 blocks/scales stay packed. `ExpertParallelMoE` computes just
  the (token, expert) pairs routed to a local copy (the MXFP4 kernel on CPU, as `MoE`) and SUM
  all-reduces the weighted outputs.
- embedding, unembedding, norms: replicated (small next to the experts at 120b: ~2.3 GB bf16).

`reduce` is a callable doing an in-place SUM all-reduce over the group; this module imports no
torch.distributed, so it can be tested with any reduce (e.g. summing N in-process shards).

Letters: S tokens, H hidden, A chosen experts per token, E logical experts, X local slots.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from cluster.model.attention import Attention
from cluster.model.moe import FUSED, LOOPED, ExpertWeights, MoE
from cluster.model.transformer import GptOssModel
from cluster.parallel.expert_map import ExpertPlacement, head_split

Reduce = Callable[[torch.Tensor], None]


# ---- attention --------------------------------------------------------------------------------

def shard_attention_(attn: Attention, rank: int, world: int) -> tuple[range, range]:
    """Keep only this rank's heads in `attn` (in place); returns (query heads, kv heads)."""
    N, K, D = attn.num_heads, attn.num_kv_heads, attn.head_dim
    q_heads, kv_heads = head_split(N, K, world, rank)
    q_rows = torch.arange(q_heads.start * D, q_heads.stop * D)
    k_rows = N * D + torch.arange(kv_heads.start * D, kv_heads.stop * D)
    v_rows = (N + K) * D + torch.arange(kv_heads.start * D, kv_heads.stop * D)
    rows = torch.cat((q_rows, k_rows, v_rows))
    qkv, out = attn.qkv, attn.out
    # the same Linear class as the model's (its forward picks the CPU kernel), on this rank's rows / columns
    new_qkv = type(qkv)(qkv.in_features, len(rows), bias=qkv.bias is not None, device="meta")
    new_qkv.weight = nn.Parameter(qkv.weight[rows].clone(), requires_grad=False)
    if qkv.bias is not None:
        new_qkv.bias = nn.Parameter(qkv.bias[rows].clone(), requires_grad=False)
    new_out = type(out)(len(q_rows), out.out_features, bias=out.bias is not None, device="meta")
    new_out.weight = nn.Parameter(out.weight[:, q_rows].clone(), requires_grad=False)
    if out.bias is not None:  # added once: by rank 0, before the SUM all-reduce
        bias = out.bias.clone() if rank == 0 else torch.zeros_like(out.bias)
        new_out.bias = nn.Parameter(bias, requires_grad=False)
    attn.qkv, attn.out = new_qkv, new_out
    attn.sinks = nn.Parameter(attn.sinks[q_heads.start:q_heads.stop].clone(), requires_grad=False)
    attn.num_heads, attn.num_kv_heads = len(q_heads), len(kv_heads)
    return q_heads, kv_heads


# ---- experts ----------------------------------------------------------------------------------

class RoutingTable:
    """Which rank computes each (token, choice): copy `s % copies[e]` of expert e (ranks in order)."""

    def __init__(self, placement: ExpertPlacement, rank: int, device: torch.device | str = "cpu"):
        table = placement.copy_table()
        E, N = placement.num_experts, placement.num_ranks
        self.placement = placement
        self.copies = torch.tensor([len(r) for r in table], dtype=torch.long, device=device)  # [E]
        self.copy_rank = torch.tensor([r + [-1] * (N - len(r)) for r in table], dtype=torch.long, device=device)  # [E, N]
        local = torch.full((E,), -1, dtype=torch.long)
        for x, e in enumerate(placement.slots[rank]):
            local[e] = x
        self.local_slot = local.to(device)  # [E] local slot of expert e, -1 if not held here
        self.rank = rank

    def local_pairs(self, top_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(token rows, choice columns, local slots) of the pairs this rank computes."""
        S = top_idx.shape[0]
        token = torch.arange(S, device=top_idx.device).unsqueeze(1)  # [S, 1]
        owner = self.copy_rank[top_idx, token % self.copies[top_idx]]  # [S, A]
        rows, cols = torch.where(owner == self.rank)
        return rows, cols, self.local_slot[top_idx[rows, cols]]


class ExpertParallelMoE(ExpertWeights):
    """The MoE of one rank: the full router, the experts of its slots, a SUM all-reduce at the end.

    Its experts are held like MoE's (same representations and kernel choice, model/moe.py
    `ExpertWeights.kernel`), over the (token, expert) pairs routed to its slots: FUSED (packed MXFP4
    multiplied in place on CPU) where it applies, else GATHERED for few pairs and LOOPED for many
    (prefill, large batches: one matmul per local expert used, no weight copies).
    """

    def __init__(self, moe: MoE, placement: ExpertPlacement, rank: int, reduce: Reduce,
                 record: Callable[[torch.Tensor], None] | None = None):
        super().__init__()
        self.router, self.top_k, self.num_experts = moe.router, moe.top_k, moe.num_experts
        self.alpha, self.limit, self.packed = moe.alpha, moe.limit, moe.packed
        self._matrix_elements = moe._matrix_elements
        self.reduce, self.record = reduce, record
        self.rank = rank
        self.set_experts(placement, {n: getattr(moe, n)[list(placement.slots[rank])].clone() for n in self.tensor_names})

    def set_experts(self, placement: ExpertPlacement, tensors: dict[str, torch.Tensor]) -> None:
        """Hold `tensors` ([X, ...] each, in the order of placement.slots[rank]) as the local experts."""
        for name in self.tensor_names:
            if name in self._buffers or name in self._parameters or hasattr(self, name):
                delattr(self, name)
            self.register_buffer(name, tensors[name])
        self.placement = placement
        self.routing = RoutingTable(placement, self.rank, self.router.weight.device)
        self._dense = None

    def local_experts(self) -> tuple[int, ...]:
        return self.placement.slots[self.rank]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [S, H]
        top_logits, top_idx = torch.topk(self.router(x), self.top_k, dim=-1)  # [S, A]
        top_w = torch.softmax(top_logits, dim=-1)  # [S, A]
        if self.record is not None:
            self.record(top_idx)
        rows, cols, slots = self.routing.local_pairs(top_idx)  # P pairs computed here
        out = torch.zeros_like(x)
        kernel = self.kernel(x, rows.numel()) if rows.numel() else None
        if kernel == LOOPED:
            self.add_looped_pairs_(out, x, rows, slots, top_w[rows, cols])
        elif kernel is not None:
            y = self.fused_pairs(x, rows, slots) if kernel == FUSED else self.gathered_pairs(x[rows], slots)  # [P, H]
            out.index_add_(0, rows, y * top_w[rows, cols].unsqueeze(-1))
        self.reduce(out)
        return out.view(shape)


# ---- the whole model --------------------------------------------------------------------------

@dataclass
class ShardInfo:
    rank: int
    world: int
    q_heads: range
    kv_heads: range


def shard_model_(model: GptOssModel, rank: int, world: int, placements: list[ExpertPlacement],
                 reduce: Reduce, record: Callable[[int, torch.Tensor], None] | None = None) -> ShardInfo:
    """Turn `model` (loaded whole) into rank `rank`'s shard, in place; the dropped weights are freed."""
    if len(placements) != len(model.blocks):
        raise ValueError(f"{len(placements)} placements for {len(model.blocks)} layers")
    heads = None
    for layer, block in enumerate(model.blocks):
        heads = shard_attention_(block.attn, rank, world)
        block.attn.out.register_forward_hook(lambda _m, _i, out: reduce(out))
        layer_record = None if record is None else (lambda idx, layer=layer: record(layer, idx))
        block.mlp = ExpertParallelMoE(block.mlp, placements[layer], rank, reduce, layer_record)
    return ShardInfo(rank, world, heads[0], heads[1])


def memory_report(model: GptOssModel) -> dict[str, int]:
    """Resident parameter bytes of a (sharded or whole) model by kind, read from its tensors."""
    experts = attention = other = 0
    counted: set[int] = set()
    for block in model.blocks:
        mlp = block.mlp
        experts += mlp.expert_bytes()
        counted.update(id(getattr(mlp, n)) for n in mlp.tensor_names)
        for t in list(block.attn.parameters()):
            attention += t.numel() * t.element_size()
            counted.add(id(t))
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in counted:
            other += t.numel() * t.element_size()
            counted.add(id(t))
    return {"expert_bytes": experts, "attention_bytes": attention, "other_bytes": other}
