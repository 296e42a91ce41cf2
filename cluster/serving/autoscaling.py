"""Autoscaling on engine signals: a Ray Serve autoscaling policy (a class callable, so Serve passes
our settings as policy_kwargs) and the decision function it wraps, which has no Ray imports so the
simulator runs the very same code.

Each replica reports `waiting`, `running` (sequences) and `kv_use` (fraction of its KV cache held)
through `record_autoscaling_stats`; Serve averages them per replica over look_back_period_s. The
replicas wanted are

    wanted = ceil(max((sum waiting + sum running) / target_ongoing_per_replica,
                      sum kv_use / target_kv_use))

clipped to [min_replicas, max_replicas]. Hysteresis: a change upwards is applied once it has been
wanted continuously for upscale_delay_s, downwards for downscale_delay_s (and never while requests
queue: at least one waiting per replica on average). A replica is one whole expert-parallel group (its placement group holds all ep_size
workers), so scaling replicas scales whole groups: a group is never split or partly added.
"""

from __future__ import annotations

import math
import time
from typing import Any, Iterable, Mapping

from cluster.config import AutoscalingSettings

SIGNALS = ("waiting", "running", "kv_use")


def wanted_replicas(signals: Iterable[Mapping[str, float]], settings: AutoscalingSettings) -> int:
    """Replicas the current demand needs (before hysteresis), from per-replica signals."""
    waiting = running = kv = 0.0
    for s in signals:
        waiting += s.get("waiting", 0.0)
        running += s.get("running", 0.0)
        kv += s.get("kv_use", 0.0)
    need = max((waiting + running) / settings.target_ongoing_per_replica, kv / settings.target_kv_use)
    # A tiny epsilon keeps exactly-on-target demand from rounding up.
    wanted = math.ceil(need - 1e-9)
    return max(settings.min_replicas, min(settings.max_replicas, wanted))


def decide(current: int, signals: list[Mapping[str, float]], settings: AutoscalingSettings,
           state: dict[str, Any], now: float) -> tuple[int, dict[str, Any]]:
    """(replicas to run, new policy state) with the up/down delays applied."""
    wanted = wanted_replicas(signals, settings)
    # Requests queueing (on average at least one per replica) block a scale-down.
    queued = sum(s.get("waiting", 0.0) for s in signals) >= max(1, len(signals))
    state = dict(state)
    state["wanted"] = wanted
    if wanted > current:
        state.pop("down_since", None)
        since = state.setdefault("up_since", now)
        if now - since >= settings.upscale_delay_s:
            state.pop("up_since", None)
            return wanted, state
    elif wanted < current and not queued:
        state.pop("up_since", None)
        since = state.setdefault("down_since", now)
        if now - since >= settings.downscale_delay_s:
            state.pop("down_since", None)
            return wanted, state
    else:
        state.pop("up_since", None)
        state.pop("down_since", None)
    return max(settings.min_replicas, min(settings.max_replicas, current)), state


class EngineSignalPolicy:
    """Serve autoscaling policy: AutoscalingPolicy(policy_function=EngineSignalPolicy,
    policy_kwargs=the AutoscalingSettings fields). Serve instantiates it once and calls it each tick."""

    def __init__(self, **settings: Any) -> None:
        known = AutoscalingSettings.model_fields
        self.settings = AutoscalingSettings(**{k: v for k, v in settings.items() if k in known})

    def __call__(self, ctx) -> tuple[int, dict[str, Any]]:
        metrics = ctx.aggregated_metrics or {}
        signals = []
        for replica in ctx.running_replicas:
            if any(replica in metrics.get(name, {}) for name in SIGNALS):
                signals.append({name: float(metrics.get(name, {}).get(replica, 0.0)) for name in SIGNALS})
        now = ctx.current_time if ctx.current_time is not None else time.time()
        if not signals:  # nothing reported yet (replicas starting): hold
            return ctx.target_num_replicas, dict(ctx.policy_state or {})
        return decide(ctx.target_num_replicas, signals, self.settings, ctx.policy_state or {}, now)
