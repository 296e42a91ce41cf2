"""The event loop: arrivals -> routing policy -> replica engines -> finishes (-> next turns),
plus autoscaling ticks. Replicas are `ReplicaSim`s stepping like a continuous-batching engine.

The routing policy objects are those of cluster/serving/routing_policy.py, given what the Serve
router gives them: replica ids and each replica's load from the same `replica_load()` formula
(here exact and fresh; in Serve, the larger of the last report and the router's in-flight count).
Autoscaling calls cluster.serving.autoscaling.decide with the replicas' signals each tick.

`Simulation` runs the loop: a heap of (time, seq, kind, payload) events, one handler per kind
(`_on_<kind>`): step (a replica's step ended), conversation (a new conversation's first turn),
turn (a conversation's next turn), sample (load sampling), ready (a started replica joins),
autoscale (a policy tick).
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from cluster.config import AutoscalingSettings, RouterConfig
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


def _prefix_affinity() -> RouterConfig:
    return RouterConfig(policy="prefix_affinity")


@dataclass
class SimConfig:
    replicas: int = 64
    # The serving.router section: policy, load bound and kv_weight as the Serve router uses them.
    # (Its block_size and prefix memory come from `model` here.)
    router: RouterConfig = field(default_factory=_prefix_affinity)
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
    return Simulation(cfg).run()


class Simulation:
    """One run of `cfg`: the event heap, the replicas, the policy, and what is measured."""

    def __init__(self, cfg: SimConfig) -> None:
        self.cfg = cfg
        model = cfg.model
        self.seq = itertools.count()  # event tie-breaker, shared with the replicas' finish heaps
        self.events: list = []  # (time, seq, kind, payload)
        self.policy = make_policy(cfg.router.policy, load_bound_ratio=cfg.router.load_bound_ratio,
                                  load_bound_slack=cfg.router.load_bound_slack,
                                  prefix_blocks_per_replica=model.kv_capacity_tokens // model.block_size,
                                  seed=cfg.seed)
        initial = cfg.replicas if cfg.autoscaling is None else max(cfg.autoscaling.min_replicas,
                                                                  min(cfg.replicas, cfg.autoscaling.max_replicas))
        self.replicas: dict[int, ReplicaSim] = {i: ReplicaSim(i, model) for i in range(initial)}
        self.routable: list[int] = list(self.replicas)
        self.loads: dict[int, float] = {i: 0.0 for i in self.routable}
        self.policy.update_replicas(self.routable)
        self.next_id = itertools.count(initial)
        self.workload = Workload(cfg.workload, cfg.replicas)
        self.finished: list[SimRequest] = []
        self.outcomes: dict[str, int] = {}
        self.counts: list[tuple[float, int, int]] = [(0.0, initial, initial)]
        self.scale_state: dict = {}
        self.desired = initial
        self.end = cfg.workload.duration_s
        self.conversation_arrivals = self.workload.conversation_arrivals()

    def push(self, t: float, kind: str, payload=None) -> None:
        heapq.heappush(self.events, (t, next(self.seq), kind, payload))

    def run(self) -> SimResult:
        handlers = {"step": self._on_step, "conversation": self._on_conversation, "turn": self._on_turn,
                    "sample": self._on_sample, "ready": self._on_ready, "autoscale": self._on_autoscale}
        first = next(self.conversation_arrivals, None)
        if first is not None:
            self.push(first[0], "conversation", first[1])
        self.push(0.0, "sample")
        if self.cfg.autoscaling is not None:
            self.push(self.cfg.autoscale_tick_s, "autoscale")
        now = 0.0
        while self.events:
            now, _, kind, payload = heapq.heappop(self.events)
            handlers[kind](now, payload)
        all_along = [r for r in self.replicas.values() if r.samples]
        max_samples = max((r.samples for r in all_along), default=0)
        replica_loads = [r.load_samples / r.samples for r in all_along if r.samples == max_samples]
        return SimResult(self.cfg, self.finished, replica_loads, self.counts, self.outcomes, now)

    # -- helpers ----------------------------------------------------------------------------------
    def _update_load(self, r: ReplicaSim) -> None:
        if r.rid in self.loads:
            self.loads[r.rid] = replica_load(len(r.waiting), r.running, r.kv_use(), self.cfg.router.kv_weight)

    def _route(self, req: SimRequest, now: float) -> None:
        rreq = RouteRequest(block_hashes=req.blocks, session_id=req.session)
        decision = self.policy.choose(rreq, self.routable, self.loads)
        self.policy.on_routed(rreq, decision.replica)
        self.outcomes[decision.outcome] = self.outcomes.get(decision.outcome, 0) + 1
        r = self.replicas[decision.replica]
        req.replica = r.rid
        r.waiting.append(req)
        self._update_load(r)
        if not r.busy:
            r.busy = True
            r.version += 1
            self.push(now + r.begin(now, self.seq), "step", (r, r.version))
            return
        cut = r.interrupt(now)
        if cut is not None:
            r.version += 1
            self.push(cut, "step", (r, r.version))

    # -- one handler per event kind ---------------------------------------------------------------
    def _on_step(self, now: float, payload) -> None:
        r, version = payload
        if version != r.version:  # superseded by an interrupt
            return
        for req in r.end(now):
            self.finished.append(req)
            conv = req.conversation
            if conv is not None and conv.turns_left > 0 and req.done_s < self.end:
                self.push(req.done_s + self.workload.think_s(), "turn", conv)
        self._update_load(r)
        if not r.idle():
            self.push(now + r.begin(now, self.seq), "step", (r, r.version))
            return
        r.busy = False
        if r.draining:
            del self.replicas[r.rid]

    def _on_conversation(self, now: float, conversation) -> None:
        self._route(self.workload.request(conversation, now), now)
        nxt = next(self.conversation_arrivals, None)
        if nxt is not None:
            self.push(nxt[0], "conversation", nxt[1])

    def _on_turn(self, now: float, conversation) -> None:
        self._route(self.workload.request(conversation, now), now)

    def _on_sample(self, now: float, _payload) -> None:
        if now >= self.cfg.warmup_s:
            for rid in self.routable:
                r = self.replicas[rid]
                r.load_samples += len(r.waiting) + r.running
                r.samples += 1
        if now < self.end:
            self.push(now + self.cfg.sample_s, "sample")

    def _on_ready(self, now: float, replica: ReplicaSim) -> None:
        self.routable.append(replica.rid)
        self.loads[replica.rid] = 0.0
        self.policy.update_replicas(self.routable)

    def _on_autoscale(self, now: float, _payload) -> None:
        signals = [{"waiting": len(self.replicas[i].waiting), "running": self.replicas[i].running,
                    "kv_use": self.replicas[i].kv_use()} for i in self.routable]
        current = self.desired
        self.desired, self.scale_state = decide(current, signals, self.cfg.autoscaling, self.scale_state, now)
        for _ in range(self.desired - current):  # scale up: new replicas after their start time
            r = ReplicaSim(next(self.next_id), self.cfg.model)
            self.replicas[r.rid] = r
            self.push(now + self.cfg.replica_start_s, "ready", r)
        for _ in range(current - self.desired):  # scale down: drain the least loaded
            if len(self.routable) <= 1:
                break
            self._drain(min(self.routable, key=self.loads.__getitem__))
        self.counts.append((now, len(self.routable), self.desired))
        if now < self.end:
            self.push(now + self.cfg.autoscale_tick_s, "autoscale")

    def _drain(self, victim: int) -> None:
        self.routable.remove(victim)
        del self.loads[victim]
        self.policy.update_replicas(self.routable)
        self.replicas[victim].draining = True
        if self.replicas[victim].idle():
            del self.replicas[victim]
