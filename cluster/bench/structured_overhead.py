"""Step-time cost of structured output in the torch engine, both sides measured in the same run.

A batch of `in_flight` greedy sequences decodes `steps` tokens; on one side none is constrained, on
the other half carry a JSON-schema constraint (schemas whose values keep the random model writing,
so the batch stays whole). Runs alternate and the best of each side counts (background load on a
shared box only ever adds time). Also: compile time per schema of cluster/bench/schemas.py (a fresh
compile, and a cache hit, which only copies the compiled matcher).
"""

from __future__ import annotations

import statistics
import time

import torch

from cluster.bench.schemas import SCHEMAS
from cluster.engine.core import EngineConfig, EngineCore
from cluster.engine.guided import GuideCompiler
from cluster.engine.sequence import SamplingSettings, Sequence
from cluster.harmony.render import Message, render_prompt
from cluster.harmony.structured import CONSTRAINED_STOP_TOKEN_IDS, ResponseFormat, TurnConstraint

# Values a random model keeps writing (free strings, unbounded integers): the sequences stay in the batch.
LONG_RUNNING = ("flat_required", "optional_fields", "nested_object", "array_of_objects", "weather_tool",
                "strict_openai_style", "free_object", "many_properties")
MAX_TOKENS = 512  # far from the wrap-up window, which would end values early


def _step_times(model, compiler: GuideCompiler, in_flight: int, steps: int, constrained: bool) -> list[float]:
    core = EngineCore(model, EngineConfig(block_size=16, max_num_seqs=in_flight, max_num_batched_tokens=4096,
                                          kv_cache_memory_bytes=256 << 20))
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
    times = []
    for _ in range(steps):
        if core.stats.num_running != in_flight:
            break  # a sequence finished: the batch is no longer the one compared
        t0 = time.perf_counter()
        core.step()
        times.append(time.perf_counter() - t0)
    return times


def measure(model, in_flight: int = 32, steps: int = 24, runs: int = 3) -> dict:
    """{"overhead": constrained/unconstrained mean step time - 1, step times, compile p50/p99 ms, ...}."""
    compiler = GuideCompiler()
    try:
        compiler.compile(TurnConstraint(ResponseFormat("json_object")), MAX_TOKENS)  # the tokenizer index, once
        best = {False: float("inf"), True: float("inf")}
        measured_steps = {False: 0, True: 0}
        with torch.inference_mode():
            _step_times(model, compiler, in_flight, 2, True)  # warm-up
            for _ in range(runs):
                for constrained in (False, True):
                    times = _step_times(model, compiler, in_flight, steps, constrained)
                    best[constrained] = min(best[constrained], statistics.fmean(times))
                    measured_steps[constrained] = len(times)
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
        "unconstrained_step_ms": round(best[False] * 1000, 2), "constrained_step_ms": round(best[True] * 1000, 2),
        "overhead": round(best[True] / best[False] - 1, 3), "steps_measured": min(measured_steps.values()),
        "compile_ms_p50": round(pct(fresh, 0.5), 2), "compile_ms_p99": round(pct(fresh, 0.99), 2),
        "compile_cache_hit_ms_p50": round(pct(cached, 0.5), 3), "schemas_compiled": len(fresh),
    }
