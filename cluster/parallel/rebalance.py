"""Expert rebalancing: from the recorded loads, a new placement per layer, applied between steps.

`Rebalancer.plan` looks at each layer's tokens per expert over the stats window, asks the planner
(expert_map.plan_placement, with redundant copies) for a placement, and keeps it only where it
lowers that layer's per-rank max/mean load by at least `min_gain`. The group driver calls
`maybe_plan` before sending a step, so a new placement takes effect between two steps: no request
is dropped or paused for longer than the expert moves take.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from cluster.parallel.expert_map import ExpertPlacement, plan_placement


@dataclass(frozen=True)
class RebalanceResult:
    at: float
    imbalance_before: float  # worst layer, current placement, over the window
    imbalance_after: float  # worst layer, new placement, same loads
    layers_changed: int


class Rebalancer:
    def __init__(self, stats, num_ranks: int, redundant: int = 0, interval_s: float = 0.0, min_gain: float = 0.02,
                 min_tokens: int = 64):
        self.stats, self.num_ranks, self.redundant = stats, num_ranks, redundant
        self.interval_s, self.min_gain, self.min_tokens = interval_s, min_gain, min_tokens
        self._next = time.monotonic() + interval_s
        self.history: list[RebalanceResult] = []

    def imbalance(self, placements: list[ExpertPlacement]) -> list[float]:
        """Per-layer per-rank max/mean over the window for `placements`."""
        loads = self.stats.window_loads().tolist()
        return [p.imbalance(layer) for p, layer in zip(placements, loads)]

    def plan(self, placements: list[ExpertPlacement]) -> tuple[list[ExpertPlacement], RebalanceResult] | None:
        loads = self.stats.window_loads().tolist()
        if sum(map(sum, loads)) < self.min_tokens:
            return None
        new, before, after, changed = [], [], [], 0
        for current, layer in zip(placements, loads):
            candidate = plan_placement(layer, self.num_ranks, self.redundant)
            b, a = current.imbalance(layer), candidate.imbalance(layer)
            if a < b - self.min_gain:
                new.append(candidate)
                changed += 1
            else:
                new.append(current)
                a = b
            before.append(b)
            after.append(a)
        if not changed:
            return None
        return new, RebalanceResult(time.time(), max(before), max(after), changed)

    def maybe_plan(self, placements: list[ExpertPlacement]) -> tuple[list[ExpertPlacement], RebalanceResult] | None:
        """A new placement when the interval has passed and it helps; else None."""
        if self.interval_s <= 0 or time.monotonic() < self._next:
            return None
        self._next = time.monotonic() + self.interval_s
        return self.plan(placements)
