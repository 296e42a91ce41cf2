"""Step-time cost of structured output in the torch engine, both sides measured in the same run.

Two engines each keep `in_flight` greedy requests running: in one none is constrained, in the
other every odd slot carries a constraint (half the batch). A finished request is replaced at
once by the next one of its slot (the same request on both sides; constrained only on the
constrained side's odd slots), so both batches stay whole and half constrained for the whole run.

The engines step in short blocks, in turn (each going first every other block), so each pair of
blocks sees the same background load (the box may be shared); the overhead is the median of the
pairs' ratios of mean decode-only step time (steps that prefill no new prompt: the sides end
requests at different steps), printed with its spread (a distribution-free 95% interval of the
median, and the quartiles of the ratios), and the median ratio over all steps, wall and CPU.

Workloads:
* trained: gpt-oss-tiny (the packaged trained model `serve` loads by default) answering its
  curriculum's evaluation asks, the realistic case: asks that declare tools with strict argument
  schemas, capital facts with a regex answer, the other asks with a JSON-schema answer (a string,
  or an integer for a count). A model that knows harmony mostly draws tokens the grammar allows,
  so most constrained rows need no mask; the fraction that did is printed.
* random: the random-weight preset writing JSON values (reasoning budget 0) that keep it writing,
  the worst case: its tokens inside a value are mostly refused, so most rows are masked.

Also: compile time per schema of cluster/bench/schemas.py (a fresh compile, and a cache hit, which
only copies the compiled matcher).
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass

import torch

from cluster.bench.schemas import SCHEMAS
from cluster.config import EngineConfig
from cluster.engine.core import EngineCore
from cluster.engine.bitmask import apply_bitmask
from cluster.engine.guided import Guide, GuideCompiler, guide_bitmask
from cluster.engine.sequence import SamplingSettings, Sequence
from cluster.harmony.render import Message, render_prompt
from cluster.harmony.structured import CONSTRAINED_STOP_TOKEN_IDS, ResponseFormat, StrictTool, TurnConstraint
from cluster.harmony.tokenizer import VOCAB_SIZE

WORKLOADS = ("trained", "random")
# Random-model values that keep it writing (free strings, unbounded integers).
LONG_RUNNING = ("flat_required", "optional_fields", "nested_object", "deep_nesting", "weather_tool",
                "strict_openai_style", "free_object", "many_properties")
CAPITAL = r"The capital of [A-Z][a-z]+ is [A-Z][a-z]+\."


@dataclass(frozen=True)
class BenchRequest:
    prompt: list[int]
    constraint: TurnConstraint  # applied only in a constrained slot of the constrained side
    kind: str  # what the constraint is, for the masked fractions
    max_tokens: int
    free_stop_token_ids: tuple[int, ...]  # the stop tokens of the unconstrained copy


def trained_requests(count: int = 256) -> list[BenchRequest]:
    """gpt-oss-tiny's curriculum evaluation asks, each with the constraint a user would send."""
    from cluster.tiny.curriculum import EVAL_SEED, generate

    requests = []
    for sample in generate(count, EVAL_SEED):
        if sample.tools:
            kind = "strict_tools"
            constraint = TurnConstraint(strict_tools=tuple(StrictTool(t.name, t.parameters) for t in sample.tools))
        elif sample.skill == "fact":
            kind, constraint = "regex", TurnConstraint(ResponseFormat("regex", pattern=CAPITAL))
        else:
            kind = "json_schema"
            value = {"type": "integer"} if sample.skill == "count" else {"type": "string"}
            constraint = TurnConstraint(ResponseFormat("json_schema", value, strict=True))
        requests.append(BenchRequest(sample.prompt_ids(), constraint, kind, 160, CONSTRAINED_STOP_TOKEN_IDS))
    return requests


def random_requests(count: int = 64) -> list[BenchRequest]:
    """JSON values a random model keeps writing; its unconstrained copy never stops before max_tokens."""
    requests = []
    for i in range(count):
        prompt = render_prompt([Message("user", f"Request {i}: reply in JSON.")], reasoning_effort="low")
        schema = SCHEMAS[LONG_RUNNING[i % len(LONG_RUNNING)]]
        constraint = TurnConstraint(ResponseFormat("json_schema", schema, strict=True), reasoning_budget=0)
        requests.append(BenchRequest(prompt, constraint, "json_schema", 1024, ()))
    return requests


class _Side:
    """One engine with `in_flight` slots, each refilled with its next request as soon as one ends."""

    def __init__(self, model, compiler: GuideCompiler, requests: list[BenchRequest], in_flight: int,
                 constrained: bool) -> None:
        self.core = EngineCore(model, EngineConfig(block_size=16, max_num_seqs=in_flight, max_num_batched_tokens=8192,
                                                   max_waiting_requests=in_flight, kv_cache_memory_mib=128))
        self.compiler, self.requests, self.in_flight, self.constrained = compiler, requests, in_flight, constrained
        self.guides: list[tuple[str, Guide]] = []  # (kind, guide) of every constrained request started
        self._slot_of: dict[str, int] = {}
        self._started = [0] * in_flight
        for slot in range(in_flight):
            self._start(slot)

    def _start(self, slot: int) -> None:
        n = self._started[slot]
        self._started[slot] += 1
        request = self.requests[(n * self.in_flight + slot) % len(self.requests)]
        request_id = f"s{slot}-{n}"
        if self.constrained and slot % 2:
            guide = self.compiler.compile(request.constraint, request.max_tokens)
            self.guides.append((request.kind, guide))
            settings = SamplingSettings(max_tokens=request.max_tokens, temperature=0.0,
                                        stop_token_ids=CONSTRAINED_STOP_TOKEN_IDS)
        else:
            guide = None
            settings = SamplingSettings(max_tokens=request.max_tokens, temperature=0.0,
                                        stop_token_ids=request.free_stop_token_ids)
        self.core.add_request(Sequence(request_id, request.prompt, settings, guide=guide))
        self._slot_of[request_id] = slot

    @property
    def finished(self) -> int:
        """Requests ended (and replaced) so far."""
        return sum(self._started) - self.in_flight

    def run(self, steps: int) -> tuple[float, float, float, int]:
        """(wall seconds, process CPU seconds, wall seconds of the decode-only steps, their number)
        of `steps` steps; refilling slots is not timed. A step that also prefills a new request's
        prompt costs more whatever the constraints: the sides end requests at different steps (a
        constrained answer may be longer), so the decode-only steps are the like-for-like ones."""
        wall = cpu = decode_wall = 0.0
        decode_steps = 0
        for _ in range(steps):
            computed = self.core.stats.computed_tokens_total
            w0, c0 = time.perf_counter(), time.process_time()
            outputs = self.core.step()
            elapsed = time.perf_counter() - w0
            cpu += time.process_time() - c0
            wall += elapsed
            if self.core.stats.computed_tokens_total - computed == len(outputs):  # one token per sequence
                decode_wall += elapsed
                decode_steps += 1
            for out in outputs:
                if out.end_reason is not None:
                    self._start(self._slot_of.pop(out.request_id))
        return wall, cpu, decode_wall, decode_steps


def paired_blocks(sides: list[_Side], blocks: int, block_steps: int) -> list[tuple[tuple, tuple]]:
    """Per block pair: (unconstrained, constrained) _Side.run times, the sides taking turns going first."""
    pairs = []
    for block in range(blocks):
        times: list[tuple] = [(), ()]
        for side in (0, 1) if block % 2 == 0 else (1, 0):
            times[side] = sides[side].run(block_steps)
        pairs.append((times[0], times[1]))
    return pairs


def median_with_spread(ratios: list[float]) -> dict:
    """The median of `ratios` minus 1, a distribution-free 95% interval of it (order statistics
    n/2 -+ 0.98 sqrt(n)), and the quartiles, all as overheads."""
    r = sorted(ratios)
    n = len(r)
    half = 0.98 * math.sqrt(n)
    lo, hi = max(0, math.floor(n / 2 - half)), min(n - 1, math.ceil(n / 2 + half) - 1)
    o = lambda x: round(x - 1, 3)  # noqa: E731
    return {"overhead": o(statistics.median(r)), "ci95": [o(r[lo]), o(r[hi])],
            "quartiles": [o(r[round(0.25 * (n - 1))]), o(r[round(0.75 * (n - 1))])]}


def draw_counts(guides: list[tuple[str, Guide]]) -> dict[str, tuple[int, int]]:
    """kind -> (constrained rows drawn, of those masked), summed over `guides`."""
    counts: dict[str, tuple[int, int]] = {}
    for kind, guide in guides:
        draws, masked = counts.get(kind, (0, 0))
        counts[kind] = (draws + guide.draws, masked + guide.masked_draws)
    return counts


def _compile_times(compiler: GuideCompiler, rounds: int = 3) -> tuple[list[float], list[float]]:
    fresh, cached = [], []
    for run in range(rounds):
        for name, schema in SCHEMAS.items():
            # A different title each run: a grammar never seen, so a true compile.
            constraint = TurnConstraint(ResponseFormat("json_schema", {**schema, "title": f"{name}{run}"}))
            t0 = time.perf_counter()
            compiler.compile(constraint, 512)
            fresh.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            compiler.compile(constraint, 512)
            cached.append(time.perf_counter() - t0)
    return sorted(fresh), sorted(cached)


def measure(model, workload: str = "trained", in_flight: int = 32, blocks: int = 80, block_steps: int = 4,
            warmup_blocks: int = 2, compile_rounds: int = 3) -> dict:
    """The overhead (median of paired block ratios of the mean decode-only step time, constrained /
    unconstrained, minus 1) with its spread, the same over all steps (wall and CPU), median step times, the fraction of constrained rows that needed a mask, and
    compile p50/p99 ms."""
    requests = {"trained": trained_requests, "random": random_requests}[workload]()
    compiler = GuideCompiler(EngineConfig().structured_wrap_up_tokens)
    try:
        first = compiler.compile(TurnConstraint(ResponseFormat("json_object")), 512)  # the tokenizer index, once
        apply_bitmask(torch.zeros(1, VOCAB_SIZE), [0], guide_bitmask([first], [512]))  # numba's kernel, loaded
        with torch.inference_mode():
            sides = [_Side(model, compiler, requests, in_flight, constrained) for constrained in (False, True)]
            paired_blocks(sides, warmup_blocks, block_steps)  # the prompts' prefill, first compiles
            before = draw_counts(sides[1].guides)
            pairs = paired_blocks(sides, blocks, block_steps)
        fresh, cached = _compile_times(compiler, compile_rounds)
    finally:
        compiler.shutdown()
    after = draw_counts(sides[1].guides)
    counts = {kind: (draws - before.get(kind, (0, 0))[0], masked - before.get(kind, (0, 0))[1])
              for kind, (draws, masked) in after.items()}  # the measured blocks' rows only
    draws = sum(d for d, _ in counts.values())
    # Mean decode-only step time, constrained over unconstrained, in each pair of blocks with both.
    decode = median_with_spread([(c[2] / c[3]) / (u[2] / u[3]) for u, c in pairs if u[3] and c[3]])
    wall = median_with_spread([c[0] / u[0] for u, c in pairs])
    cpu = median_with_spread([c[1] / u[1] for u, c in pairs])
    pct = lambda values, q: values[min(len(values) - 1, int(q * len(values)))] * 1000  # noqa: E731
    return {
        "workload": workload, "in_flight": in_flight, "constrained": in_flight // 2,
        "unconstrained_step_ms": round(statistics.median(u[0] for u, _ in pairs) / block_steps * 1000, 2),
        "constrained_step_ms": round(statistics.median(c[0] for _, c in pairs) / block_steps * 1000, 2),
        "overhead": decode["overhead"], "overhead_ci95": decode["ci95"], "overhead_quartiles": decode["quartiles"],
        "decode_pairs": sum(1 for u, c in pairs if u[3] and c[3]),
        "overhead_all_steps": wall["overhead"], "overhead_all_steps_ci95": wall["ci95"],
        "cpu_overhead_all_steps": cpu["overhead"],
        "pairs": len(pairs), "block_steps": block_steps,
        "constrained_rows": draws,
        "masked_fraction": round(sum(m for _, m in counts.values()) / draws, 3) if draws else 0.0,
        "masked_fraction_by_kind": {kind: round(m / d, 3) for kind, (d, m) in sorted(counts.items()) if d},
        "requests_finished": [side.finished for side in sides],
        "compile_ms_p50": round(pct(fresh, 0.5), 2), "compile_ms_p99": round(pct(fresh, 0.99), 2),
        "compile_cache_hit_ms_p50": round(pct(cached, 0.5), 3), "schemas_compiled": len(fresh),
    }
