"""The event loop: arrivals -> routing policy -> replica engines -> finishes (-> next turns),
plus autoscaling ticks. Replicas are `ReplicaSim`s stepping like a continuous-batching engine.

The routing policy objects are those of cluster/serving/routing_policy.py, given what the Serve
router gives them: replica ids and each replica's load from the same `replica_load()` formula
(here exact and fresh; in Serve, the larger of the last report and the router's in-flight count).
Autoscaling calls cluster.serving.autoscaling.decide with the replicas' signals each tick.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from cluster.config import AutoscalingSettings
from cluster.serving.autoscaling import decide
from cluster.serving.routing_policy import RouteRequest, make_policy, replica_load
from cluster.simulate.service import ServiceModel
from cluster.simulate.workload import SimRequest, Workload, WorkloadSpec


class ReplicaSim:
    def __init__(self, rid: int, model: ServiceModel, ready_s: float = 0.0) -> None:
        self.rid = rid
        self.model = model
        self.ready_s = ready_s
        self.waiting: deque[SimRequest] = deque()
        self.prefilling: deque[SimRequest] = deque()
        self.decoding = 0
        self.finishing: list = []  # heap of (step index of its last token, seq, request)
        self.step_index = 0
        self.busy = False
        self.kv_tokens = 0  # reserved by admitted requests (prompt + output)
        self.cache: OrderedDict[int, None] = OrderedDict()  # prefix cache: block id -> None (LRU)
        self.cache_blocks = model.kv_capacity_tokens // model.block_size
        self.draining = False
        self.load_samples = 0.0
        self.samples = 0
        self.macro = None
        self.version = 0  # bumps when a pending step-end event is superseded

    @property
    def running(self) -> int:
        return len(self.prefilling) + self.decoding

    def kv_use(self) -> float:
        return self.kv_tokens / self.model.kv_capacity_tokens

    def _admit(self) -> None:
        m = self.model
        b = m.block_size
        while self.waiting and self.running < m.max_seqs:
            req = self.waiting[0]
            need = req.prompt_tokens + req.output_tokens
            if self.kv_tokens + need > m.kv_capacity_tokens and self.running:
                break
            self.waiting.popleft()
            self.kv_tokens += need
            cache = self.cache
            hit = 0
            for block in req.blocks:
                if block not in cache:
                    break
                hit += 1
            # Touch the prompt's blocks (last first, so the prefix stays most recent).
            for block in reversed(req.blocks):
                if block in cache:
                    cache.move_to_end(block)
                else:
                    cache[block] = None
            while len(cache) > self.cache_blocks:
                cache.popitem(last=False)
            req.cached_tokens = min(hit * b, req.prompt_tokens - 1)
            req.prefill_left = req.prompt_tokens - req.cached_tokens
            self.prefilling.append(req)

    def begin(self, now: float, seq) -> float:
        """Start the next step at `now`; returns its duration (then call end() at now + duration).

        With no prompt to prefill, the batch stays the same until its first sequence finishes, so
        those decode steps run as one event (a "macro step"); an arrival cuts it short at the next
        step boundary (interrupt), exactly where a real engine would admit the newcomer."""
        self._admit()
        m = self.model
        self.macro = None
        if not self.prefilling:
            d = m.step_s(self.decoding, 0)
            k = max(1, self.finishing[0][0] - self.step_index) if self.finishing else 1
            self.macro = (now, d, self.step_index)
            self.step_index += k
            return k * d
        budget = max(0, m.max_batched_tokens - self.decoding)
        prefill = 0
        first: list[SimRequest] = []
        while self.prefilling and budget > 0:
            req = self.prefilling[0]
            take = min(budget, req.prefill_left)
            req.prefill_left -= take
            prefill += take
            budget -= take
            if req.prefill_left == 0:
                self.prefilling.popleft()
                first.append(req)
            else:
                break
        duration = m.step_s(self.decoding, prefill)
        self.step_index += 1
        for req in first:
            req.first_token_s = now + duration
            heapq.heappush(self.finishing, (self.step_index + req.output_tokens - 1, next(seq), req))
            if req.output_tokens > 1:
                self.decoding += 1
            else:
                self.decoding += 1  # counted until its (immediate) finish below, in end()
        return duration

    def interrupt(self, now: float) -> float | None:
        """Cut a running macro step at the first step boundary after `now`; the new end time."""
        if self.macro is None:
            return None
        start, d, start_index = self.macro
        j = max(1, math.ceil((now - start) / d - 1e-9))
        if start_index + j >= self.step_index:
            return None
        self.step_index = start_index + j
        self.macro = None
        return start + j * d

    def end(self, now: float) -> list[SimRequest]:
        """The step ended at `now`: the requests whose last token it produced."""
        done: list[SimRequest] = []
        while self.finishing and self.finishing[0][0] <= self.step_index:
            _, _, req = heapq.heappop(self.finishing)
            self.decoding -= 1
            req.done_s = now
            self.kv_tokens -= req.prompt_tokens + req.output_tokens
            done.append(req)
        self.macro = None
        return done

    def idle(self) -> bool:
        return not (self.waiting or self.prefilling or self.decoding)


@dataclass
class SimConfig:
    replicas: int = 64
    policy: str = "prefix_affinity"
    load_bound_ratio: float = 0.5
    load_bound_slack: float = 4.0
    kv_weight: float = 4.0
    autoscaling: AutoscalingSettings | None = None
    autoscale_tick_s: float = 1.0
    replica_start_s: float = 10.0
    sample_s: float = 0.5
    warmup_s: float = 20.0
    model: ServiceModel = field(default_factory=ServiceModel)
    workload: WorkloadSpec = field(default_factory=WorkloadSpec)
    seed: int = 0


@dataclass
class SimResult:
    config: SimConfig
    requests: list[SimRequest]
    replica_loads: list[float]  # time-averaged waiting + running per replica that served all along
    replica_counts: list[tuple[float, int, int]]  # (time, running replicas, desired)
    outcomes: dict[str, int]
    end_s: float


def simulate(cfg: SimConfig) -> SimResult:
    model = cfg.model
    seq = itertools.count()
    events: list = []  # (time, seq, kind, payload)

    def push(t, kind, payload=None):
        heapq.heappush(events, (t, next(seq), kind, payload))

    policy = make_policy(cfg.policy, load_bound_ratio=cfg.load_bound_ratio, load_bound_slack=cfg.load_bound_slack,
                         prefix_blocks_per_replica=model.kv_capacity_tokens // model.block_size, seed=cfg.seed)
    initial = cfg.replicas if cfg.autoscaling is None else max(cfg.autoscaling.min_replicas,
                                                              min(cfg.replicas, cfg.autoscaling.max_replicas))
    replicas: dict[int, ReplicaSim] = {i: ReplicaSim(i, model) for i in range(initial)}
    routable: list[int] = list(replicas)
    loads: dict[int, float] = {i: 0.0 for i in routable}
    policy.update_replicas(routable)
    next_id = itertools.count(initial)
    workload = Workload(cfg.workload, cfg.replicas)
    finished: list[SimRequest] = []
    outcomes: dict[str, int] = {}
    counts: list[tuple[float, int, int]] = [(0.0, initial, initial)]
    scale_state: dict = {}
    desired = initial

    def update_load(r: ReplicaSim) -> None:
        if r.rid in loads:
            loads[r.rid] = replica_load(len(r.waiting), r.running, r.kv_use(), cfg.kv_weight)

    def route(req: SimRequest, now: float) -> None:
        rreq = RouteRequest(block_hashes=req.blocks, session_id=req.session)
        decision = policy.choose(rreq, routable, loads)
        policy.on_routed(rreq, decision.replica)
        outcomes[decision.outcome] = outcomes.get(decision.outcome, 0) + 1
        r = replicas[decision.replica]
        req.replica = r.rid
        r.waiting.append(req)
        update_load(r)
        if not r.busy:
            r.busy = True
            r.version += 1
            push(now + r.begin(now, seq), "step", (r, r.version))
        else:
            cut = r.interrupt(now)
            if cut is not None:
                r.version += 1
                push(cut, "step", (r, r.version))

    conv_arrivals = workload.conversation_arrivals()
    first = next(conv_arrivals, None)
    if first is not None:
        push(first[0], "conversation", first[1])
    push(0.0, "sample")
    if cfg.autoscaling is not None:
        push(cfg.autoscale_tick_s, "autoscale")
    end = cfg.workload.duration_s
    now = 0.0
    while events:
        now, _, kind, payload = heapq.heappop(events)
        if kind == "step":
            r, version = payload
            if version != r.version:
                continue
            done = r.end(now)
            for req in done:
                finished.append(req)
                conv = req.conversation
                if conv is not None and conv.turns_left > 0 and req.done_s < end:
                    push(req.done_s + workload.think_s(), "turn", conv)
            update_load(r)
            if r.idle():
                r.busy = False
                if r.draining:
                    del replicas[r.rid]
            else:
                push(now + r.begin(now, seq), "step", (r, r.version))
        elif kind == "conversation":
            route(workload.request(payload, now), now)
            nxt = next(conv_arrivals, None)
            if nxt is not None:
                push(nxt[0], "conversation", nxt[1])
        elif kind == "turn":
            route(workload.request(payload, now), now)
        elif kind == "sample":
            if now >= cfg.warmup_s:
                for rid in routable:
                    r = replicas[rid]
                    r.load_samples += len(r.waiting) + r.running
                    r.samples += 1
            if now < end:
                push(now + cfg.sample_s, "sample")
        elif kind == "ready":
            routable.append(payload.rid)
            loads[payload.rid] = 0.0
            policy.update_replicas(routable)
        elif kind == "autoscale":
            signals = [{"waiting": len(replicas[i].waiting), "running": replicas[i].running,
                        "kv_use": replicas[i].kv_use()} for i in routable]
            current = desired
            desired, scale_state = decide(current, signals, cfg.autoscaling, scale_state, now)
            for _ in range(desired - current):  # scale up: new replicas after their start time
                r = ReplicaSim(next(next_id), model)
                replicas[r.rid] = r
                push(now + cfg.replica_start_s, "ready", r)
            for _ in range(current - desired):  # scale down: drain the least loaded
                if len(routable) <= 1:
                    break
                victim = min(routable, key=loads.__getitem__)
                routable.remove(victim)
                del loads[victim]
                policy.update_replicas(routable)
                replicas[victim].draining = True
                if replicas[victim].idle():
                    del replicas[victim]
            counts.append((now, len(routable), desired))
            if now < end:
                push(now + cfg.autoscale_tick_s, "autoscale")
    all_along = [r for r in replicas.values() if r.samples]
    max_samples = max((r.samples for r in all_along), default=0)
    replica_loads = [r.load_samples / r.samples for r in all_along if r.samples == max_samples]
    return SimResult(cfg, finished, replica_loads, counts, outcomes, now)
