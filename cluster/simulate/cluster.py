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
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from cluster.serving.autoscaling import ScalingSettings, decide
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

    def step(self, now: float, seq) -> tuple[float, list[SimRequest], list[SimRequest]]:
        """Run one step from `now`: (duration, requests whose first token came, requests done)."""
        self._admit()
        m = self.model
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
        end = now + duration
        self.step_index += 1
        done: list[SimRequest] = []
        for req in first:
            req.first_token_s = end
            if req.output_tokens <= 1:
                done.append(req)
            else:
                self.decoding += 1
                heapq.heappush(self.finishing, (self.step_index + req.output_tokens - 1, next(seq), req))
        while self.finishing and self.finishing[0][0] <= self.step_index:
            _, _, req = heapq.heappop(self.finishing)
            self.decoding -= 1
            done.append(req)
        for req in done:
            req.done_s = end
            self.kv_tokens -= req.prompt_tokens + req.output_tokens
        return duration, first, done

    def idle(self) -> bool:
        return not (self.waiting or self.prefilling or self.decoding)


@dataclass
class SimConfig:
    replicas: int = 64
    policy: str = "prefix_affinity"
    load_bound_ratio: float = 0.5
    load_bound_slack: float = 4.0
    kv_weight: float = 4.0
    autoscaling: ScalingSettings | None = None
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
            push(now, "step", r)

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
            r = payload
            duration, _first, done = r.step(now, seq)
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
                push(now + duration, "step", r)
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
