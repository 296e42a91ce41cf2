"""Step-time cost of structured output in the torch engine, both sides measured in the same run.

Two engines each decode a batch of `in_flight` greedy sequences; in one none is constrained, in the
other half carry a JSON-schema constraint (schemas whose values keep the random model writing, so
the batch stays whole). The engines step in turn, so each pair of steps sees the same background
load (the box may be shared), and the overhead is the median ratio of the pairs. Also: compile time per schema of cluster/bench/schemas.py (a fresh
compile, and a cache hit, which only copies the compiled matcher).
"""

from __future__ import annotations

import statistics
import time

import torch

from cluster.bench.schemas import SCHEMAS
from cluster.config import EngineConfig
from cluster.engine.core import EngineCore
from cluster.engine.guided import GuideCompiler
from cluster.engine.sequence import SamplingSettings, Sequence
from cluster.harmony.render import Message, render_prompt
from cluster.harmony.structured import CONSTRAINED_STOP_TOKEN_IDS, ResponseFormat, TurnConstraint

# Values a random model keeps writing (free strings, unbounded integers): the sequences stay in the batch.
LONG_RUNNING = ("flat_required", "optional_fields", "nested_object", "deep_nesting", "weather_tool",
                "strict_openai_style", "free_object", "many_properties")
MAX_TOKENS = 512  # far from the wrap-up window, which would end values early


def _core(model, compiler: GuideCompiler, in_flight: int, constrained: bool) -> EngineCore:
    core = EngineCore(model, EngineConfig(block_size=16, max_num_seqs=in_flight, max_num_batched_tokens=4096,
                                          kv_cache_memory_mib=256))
    free = SamplingSettings(max_tokens=MAX_TOKENS, temperature=0.0, stop_token_ids=())
    guided = SamplingSettings(max_tokens=MAX_TOKENS, temperature=0.0, stop_token_ids=CONSTRAINED_STOP_TOKEN_IDS)
    for i in range(in_flight):
        prompt = render_prompt([Message("user", f"Request {i}: reply in JSON.")], reasoning_effort="low")
        if constrained and i % 2:
            schema = SCHEMAS[LONG_RUNNING[(i // 2) % len(LONG_RUNNING)]]
            constraint = TurnConstraint(ResponseFormat("json_schema", schema, strict=True), reasoning_budget=0)
            core.add_request(Sequence(f"c{i}", prompt, guided, guide=compiler.compile(constraint, MAX_TOKENS)))
        else:
            core.add_request(Sequence(f"f{i}", prompt, free))
    core.step()  # the prefill of every prompt
    return core


def _paired_step_times(model, compiler: GuideCompiler, in_flight: int, steps: int) -> list[tuple[float, float]]:
    """(unconstrained, constrained) step times, the two engines stepping in turn so both see the
    same background load; only steps where both batches are whole count."""
    cores = [_core(model, compiler, in_flight, False), _core(model, compiler, in_flight, True)]
    pairs = []
    for step in range(steps):
        if any(core.stats.num_running != in_flight for core in cores):
            break  # a sequence finished: the batch is no longer the one compared
        times = [0.0, 0.0]
        for side in (0, 1) if step % 2 == 0 else (1, 0):  # each goes first in turn: no order bias
            t0 = time.perf_counter()
            cores[side].step()
            times[side] = time.perf_counter() - t0
        pairs.append((times[0], times[1]))
    return pairs


def measure(model, in_flight: int = 32, steps: int = 24, runs: int = 3) -> dict:
    """{"overhead": constrained/unconstrained mean step time - 1, step times, compile p50/p99 ms, ...}."""
    compiler = GuideCompiler(EngineConfig().structured_wrap_up_tokens)
    try:
        compiler.compile(TurnConstraint(ResponseFormat("json_object")), MAX_TOKENS)  # the tokenizer index, once
        pairs: list[tuple[float, float]] = []
        with torch.inference_mode():
            _paired_step_times(model, compiler, in_flight, 2)  # warm-up
            for _ in range(runs):
                pairs += _paired_step_times(model, compiler, in_flight, steps)
        fresh, cached = [], []
        for run in range(3):
            for name, schema in SCHEMAS.items():
                # A different title each run: a grammar never seen, so a true compile.
                constraint = TurnConstraint(ResponseFormat("json_schema", {**schema, "title": f"{name}{run}"}))
                t0 = time.perf_counter()
                compiler.compile(constraint, MAX_TOKENS)
                fresh.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                compiler.compile(constraint, MAX_TOKENS)
                cached.append(time.perf_counter() - t0)
    finally:
        compiler.shutdown()
    fresh.sort()
    cached.sort()
    pct = lambda values, q: values[min(len(values) - 1, int(q * len(values)))] * 1000  # noqa: E731
    return {
        "in_flight": in_flight, "constrained": in_flight // 2,
        "unconstrained_step_ms": round(statistics.median(p[0] for p in pairs) * 1000, 2),
        "constrained_step_ms": round(statistics.median(p[1] for p in pairs) * 1000, 2),
        # The median of per-pair ratios: each pair ran back to back, under the same background load.
        "overhead": round(statistics.median(c / u for u, c in pairs) - 1, 3), "steps_measured": len(pairs),
        "compile_ms_p50": round(pct(fresh, 0.5), 2), "compile_ms_p99": round(pct(fresh, 0.99), 2),
        "compile_cache_hit_ms_p50": round(pct(cached, 0.5), 3), "schemas_compiled": len(fresh),
    }
