"""Expert placement: which rank holds which experts, and a planner that balances per-rank load.

Pure functions and small dataclasses, no torch.distributed and no Ray: everything here can be
computed on a laptop from a stats file or from a preset's shapes.

Terms (one MoE layer):
- E logical experts (the model's), N ranks, a *slot* is one resident copy of an expert on a rank.
- `ExpertPlacement.slots[r]` lists the logical experts rank r holds, in its local order.
  Every expert has at least one copy; a hot expert may have several (redundant copies), and the
  tokens routed to it are split among its copies (the i-th token choosing it goes to copy i % c).
- A rank's load is the tokens its slots compute; imbalance = max / mean of the per-rank loads
  (1.0 is perfect balance; the slowest rank sets the step time).

Policies: `contiguous` (rank r holds experts r*E/N ..; vLLM's EP layout, the default),
`round_robin` (expert e on rank e % N), and `plan_placement` (greedy LPT on recorded loads,
with `redundant` extra copies of the hottest experts).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Iterable, Sequence

POLICIES = ("contiguous", "round_robin")


@dataclass(frozen=True)
class ExpertPlacement:
    """One layer's placement: rank -> the logical experts it holds (its local slot order)."""

    num_experts: int
    slots: tuple[tuple[int, ...], ...]

    def __post_init__(self) -> None:
        seen: set[int] = set()
        for r, experts in enumerate(self.slots):
            if len(set(experts)) != len(experts):
                raise ValueError(f"rank {r} holds an expert twice: {experts}")
            for e in experts:
                if not 0 <= e < self.num_experts:
                    raise ValueError(f"rank {r} holds expert {e}, outside 0..{self.num_experts - 1}")
            seen.update(experts)
        missing = sorted(set(range(self.num_experts)) - seen)
        if missing:
            raise ValueError(f"experts {missing} have no rank")

    @property
    def num_ranks(self) -> int:
        return len(self.slots)

    @property
    def num_slots(self) -> int:
        return sum(len(s) for s in self.slots)

    def copies(self, expert: int) -> list[int]:
        """Ranks holding `expert`, in rank order (copy i is the i-th of them)."""
        return [r for r, experts in enumerate(self.slots) if expert in experts]

    def copy_table(self) -> list[list[int]]:
        """expert -> ranks holding it."""
        table: list[list[int]] = [[] for _ in range(self.num_experts)]
        for r, experts in enumerate(self.slots):
            for e in experts:
                table[e].append(r)
        return table

    def rank_loads(self, expert_loads: Sequence[float]) -> list[float]:
        """Per-rank load when each expert's tokens are split evenly among its copies."""
        if len(expert_loads) != self.num_experts:
            raise ValueError(f"{len(expert_loads)} loads for {self.num_experts} experts")
        table = self.copy_table()
        loads = [0.0] * self.num_ranks
        for e, ranks in enumerate(table):
            for r in ranks:
                loads[r] += expert_loads[e] / len(ranks)
        return loads

    def imbalance(self, expert_loads: Sequence[float]) -> float:
        return imbalance(self.rank_loads(expert_loads))

    def to_dict(self) -> dict:
        return {"num_experts": self.num_experts, "slots": [list(s) for s in self.slots]}

    @classmethod
    def from_dict(cls, data: dict) -> ExpertPlacement:
        return cls(int(data["num_experts"]), tuple(tuple(int(e) for e in s) for s in data["slots"]))


def imbalance(rank_loads: Sequence[float]) -> float:
    """max / mean of per-rank loads; 1.0 when there is no load at all."""
    mean = sum(rank_loads) / len(rank_loads)
    return max(rank_loads) / mean if mean > 0 else 1.0


def _split(num_experts: int, num_ranks: int) -> list[int]:
    """How many experts each rank gets: as even as possible, the first ranks one more."""
    if num_ranks < 1 or num_experts < num_ranks:
        raise ValueError(f"cannot place {num_experts} experts on {num_ranks} ranks (each rank needs one)")
    base, extra = divmod(num_experts, num_ranks)
    return [base + (r < extra) for r in range(num_ranks)]


def contiguous(num_experts: int, num_ranks: int) -> ExpertPlacement:
    """Rank r holds a contiguous range of experts (ranges differ in length by at most one)."""
    slots, start = [], 0
    for n in _split(num_experts, num_ranks):
        slots.append(tuple(range(start, start + n)))
        start += n
    return ExpertPlacement(num_experts, tuple(slots))


def round_robin(num_experts: int, num_ranks: int) -> ExpertPlacement:
    """Expert e on rank e % N."""
    _split(num_experts, num_ranks)
    return ExpertPlacement(num_experts, tuple(tuple(range(r, num_experts, num_ranks)) for r in range(num_ranks)))


def static_placement(policy: str, num_experts: int, num_ranks: int) -> ExpertPlacement:
    if policy == "contiguous":
        return contiguous(num_experts, num_ranks)
    if policy == "round_robin":
        return round_robin(num_experts, num_ranks)
    raise ValueError(f"unknown placement policy {policy!r}; choose one of {', '.join(POLICIES)}")


def plan_placement(expert_loads: Sequence[float], num_ranks: int, redundant: int = 0) -> ExpertPlacement:
    """A placement that lowers max/mean per-rank load for these expert loads.

    1. Redundant copies: `redundant` times, give one more copy to the expert with the highest load
       per copy (never more copies than ranks).
    2. Longest processing time first: copies (each carrying load / copies) sorted by load, heaviest
       first, each to the least-loaded rank that has a free slot and no copy of that expert yet.
       Every rank gets at most ceil((E + redundant) / N) slots, so expert memory stays balanced.
    """
    E = len(expert_loads)
    _split(E, num_ranks)
    if redundant < 0:
        raise ValueError(f"redundant must be >= 0, got {redundant}")
    redundant = min(redundant, E * (num_ranks - 1))
    copies = [1] * E
    for _ in range(redundant):
        e = max((e for e in range(E) if copies[e] < num_ranks), key=lambda e: (expert_loads[e] / copies[e], -e))
        copies[e] += 1
    capacity = math.ceil((E + redundant) / num_ranks)
    items = sorted(((expert_loads[e] / copies[e], e) for e in range(E) for _ in range(copies[e])),
                   key=lambda item: (-item[0], item[1]))
    slots: list[list[int]] = [[] for _ in range(num_ranks)]
    loads = [0.0] * num_ranks
    for load, e in items:
        candidates = [r for r in range(num_ranks) if len(slots[r]) < capacity and e not in slots[r]]
        if not candidates:  # only ranks that already hold e have room: this copy is dropped
            continue
        r = min(candidates, key=lambda r: (loads[r], len(slots[r]), r))
        slots[r].append(e)
        loads[r] += load
    # A dropped copy changes how the load of its expert splits; the rank loads are recomputed by callers.
    return ExpertPlacement(E, tuple(tuple(sorted(s)) for s in slots))


# ---- stats files -------------------------------------------------------------------------------

def read_stats(path: str) -> list[list[float]]:
    """Per-layer per-expert token counts from a JSON file.

    Accepted forms: {"tokens_per_expert": [[...], ...]} (what `ExpertLoadStats.to_dict` writes),
    a list of per-layer lists, or one flat list (a single layer).
    """
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if isinstance(data, dict):
        data = data["tokens_per_expert"]
    if data and not isinstance(data[0], list):
        data = [data]
    if not data or any(len(layer) != len(data[0]) for layer in data):
        raise ValueError(f"{path}: expected per-layer lists of equal length, one count per expert")
    return [[float(x) for x in layer] for layer in data]


# ---- memory per rank from shapes -------------------------------------------------------------

@dataclass(frozen=True)
class RankBytes:
    rank: int
    experts: int  # packed MXFP4 expert matrices + their biases, all layers
    attention: int  # this rank's heads: qkv rows, out columns, sinks (+ biases, the out bias on rank 0)
    replicated: int  # embedding, unembedding, norms, routers: every rank holds them
    kv_bytes_per_token: int  # K and V of this rank's kv heads, every layer (upper bound: full layers)

    @property
    def total(self) -> int:
        return self.experts + self.attention + self.replicated


def head_split(num_heads: int, num_kv_heads: int, num_ranks: int, rank: int) -> tuple[range, range]:
    """(query heads, kv heads) of `rank` when attention is split by heads.

    Query heads are split evenly; each rank holds the kv heads its query heads read, so with fewer
    kv heads than ranks a kv head is held by N / K ranks.
    """
    if num_heads % num_ranks:
        raise ValueError(f"{num_heads} query heads do not split over {num_ranks} ranks")
    if num_kv_heads % num_ranks and num_ranks % num_kv_heads:
        raise ValueError(f"{num_kv_heads} kv heads do not split over (or divide) {num_ranks} ranks")
    q = num_heads // num_ranks
    group = num_heads // num_kv_heads  # query heads per kv head
    q_heads = range(rank * q, (rank + 1) * q)
    kv_heads = range(q_heads.start // group, (q_heads.stop - 1) // group + 1)
    return q_heads, kv_heads


def layout_bytes(config, num_ranks: int, placement: ExpertPlacement | None = None, *,
                 weight_bytes: int = 2) -> list[RankBytes]:
    """Resident bytes per rank for a GptOssConfig split over `num_ranks` (no weights needed).

    Expert matrices count as MXFP4 (0.5 byte per value + one scale byte per 32), everything else
    as `weight_bytes` per value (bf16). The same placement is used on every layer.
    """
    placement = placement or contiguous(config.num_local_experts, num_ranks)
    L, H, D, I = config.num_hidden_layers, config.hidden_size, config.head_dim, config.intermediate_size
    V, E = config.vocab_size, config.num_local_experts
    mx = lambda n: n // 2 + n // 32  # noqa: E731 (MXFP4 bytes of n values)
    per_expert = mx(2 * I * H) + mx(H * I) + weight_bytes * (2 * I + H)
    replicated = weight_bytes * (2 * V * H + H) + L * (weight_bytes * (E * H + E) + 4 * 2 * H)  # norms fp32
    out = []
    for r in range(num_ranks):
        q_heads, kv_heads = head_split(config.num_attention_heads, config.num_key_value_heads, num_ranks, r)
        nq, nkv = len(q_heads), len(kv_heads)
        rows = (nq + 2 * nkv) * D
        attn = weight_bytes * (rows * H + rows + H * nq * D + nq + (H if r == 0 else 0))
        out.append(RankBytes(r, L * per_expert * len(placement.slots[r]), L * attn, replicated,
                             L * 2 * nkv * D * weight_bytes))
    return out


def format_table(rows: Iterable[Sequence[object]], header: Sequence[str]) -> str:
    rows = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)
