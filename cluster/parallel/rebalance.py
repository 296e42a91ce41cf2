"""Expert rebalancing: from the recorded loads, a new placement per layer, applied between steps.

`Rebalancer.plan` looks at each layer's tokens per expert over the stats window, asks the planner
(expert_map.plan_placement, with redundant copies) for a placement, and keeps it only where it
lowers that layer's per-rank max/mean load by at least `min_gain`. The group driver calls
`maybe_plan` before sending a step, so a new placement takes effect between two steps: no request
is dropped or paused for longer than the expert moves take.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass

import torch

from cluster.parallel.expert_map import ExpertPlacement, plan_placement


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
