"""llguidance against xgrammar on the o200k_harmony vocabulary (201088 ids): what chose the library.

    python -m cluster.bench.structured_libs [--steps 32] [--threads 1]

Each library runs in its own process (so resident memory is its own) over cluster/bench/schemas.py:
tokenizer build time and memory, compile time per schema (p50/p99), the time to compute one
next-token bitmask while a random walk writes each schema's JSON (p50/p99 over all steps), and
memory after compiling every schema. The last line printed is one JSON object per library.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import random
import statistics
import subprocess
import sys
import time

import torch


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / (1 << 20)


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def _allowed(bitmask_row: torch.Tensor) -> list[int]:
    bits = (bitmask_row.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1
    return bits.flatten().nonzero().flatten().tolist()


def _walk(fill, consume, steps: int, rng: random.Random, bitmask: torch.Tensor, vocab: int) -> list[float]:
    """Mask times of a random walk: fill the mask, take a random allowed token, repeat."""
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fill(bitmask)
        times.append(time.perf_counter() - t0)
        allowed = [t for t in _allowed(bitmask[0]) if t < vocab]
        if not allowed:
            break
        token = rng.choice(allowed)
        if not consume(token) or token >= 199998:  # a special token: the stop token ended the value
            break
    return times


def measure_llguidance(steps: int) -> dict:
    import llguidance
    import llguidance.torch as llg_torch

    from cluster.bench.schemas import SCHEMAS
    from cluster.harmony.structured import grammar_tokenizer, token_bytes

    token_bytes()  # reading the vocabulary file is not the library's cost (xgrammar's side skips it too)
    rss0 = _rss_mib()
    t0 = time.perf_counter()
    tokenizer = grammar_tokenizer()
    build_s = time.perf_counter() - t0
    rss1 = _rss_mib()
    compile_s, mask_s = [], []
    rng = random.Random(0)
    bitmask = llg_torch.allocate_token_bitmask(1, tokenizer.vocab_size)
    keep = []
    for schema in SCHEMAS.values():
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema)
        t = time.perf_counter()
        matcher = llguidance.LLMatcher(tokenizer, grammar)
        matcher.compute_bitmask()  # the first mask builds the lexer: part of being ready to serve
        compile_s.append(time.perf_counter() - t)
        assert not matcher.is_error(), matcher.get_error()
        matcher.reset()
        keep.append(matcher)
        mask_s += _walk(lambda m: llg_torch.fill_next_token_bitmask(matcher, m, 0), matcher.consume_token, steps,
                        rng, bitmask, tokenizer.vocab_size)
    return _summary("llguidance", llguidance.__version__, build_s, rss1 - rss0, compile_s, mask_s, _rss_mib() - rss1)


def measure_xgrammar(steps: int) -> dict:
    import xgrammar

    from cluster.bench.schemas import SCHEMAS
    from cluster.harmony.structured import token_bytes
    from cluster.harmony.tokenizer import FIRST_SPECIAL_ID, RETURN_ID, VOCAB_SIZE

    # Special ids as empty strings: xgrammar counts those as special and never allows them in text.
    vocab = token_bytes()[:FIRST_SPECIAL_ID] + [b""] * (VOCAB_SIZE - FIRST_SPECIAL_ID)
    rss0 = _rss_mib()
    t0 = time.perf_counter()
    info = xgrammar.TokenizerInfo(vocab, vocab_type=xgrammar.VocabType.RAW, vocab_size=VOCAB_SIZE,
                                  stop_token_ids=[RETURN_ID])
    compiler = xgrammar.GrammarCompiler(info, max_threads=1, cache_enabled=False)
    build_s = time.perf_counter() - t0
    rss1 = _rss_mib()
    compile_s, mask_s = [], []
    rng = random.Random(0)
    bitmask = xgrammar.allocate_token_bitmask(1, VOCAB_SIZE)
    keep = []
    for schema in SCHEMAS.values():
        t = time.perf_counter()
        compiled = compiler.compile_json_schema(json.dumps(schema), any_whitespace=False)
        matcher = xgrammar.GrammarMatcher(compiled)
        compile_s.append(time.perf_counter() - t)
        keep.append(compiled)
        mask_s += _walk(lambda m: matcher.fill_next_token_bitmask(m, 0), matcher.accept_token, steps, rng,
                        bitmask, VOCAB_SIZE)
    return _summary("xgrammar", importlib.metadata.version("xgrammar"), build_s, rss1 - rss0, compile_s, mask_s, _rss_mib() - rss1)


def _summary(lib, version, build_s, build_mib, compile_s, mask_s, compiled_mib) -> dict:
    ms = 1000.0
    return {"library": lib, "version": version, "tokenizer_build_s": round(build_s, 2),
            "tokenizer_rss_mib": round(build_mib, 1), "schemas": len(compile_s),
            "compile_ms_p50": round(_pct(compile_s, 0.5) * ms, 2), "compile_ms_p99": round(_pct(compile_s, 0.99) * ms, 2),
            "compile_ms_max": round(max(compile_s) * ms, 2), "mask_steps": len(mask_s),
            "mask_us_p50": round(_pct(mask_s, 0.5) * 1e6, 1), "mask_us_p99": round(_pct(mask_s, 0.99) * 1e6, 1),
            "mask_us_mean": round(statistics.fmean(mask_s) * 1e6, 1),
            "compiled_schemas_rss_mib": round(compiled_mib, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=32, help="mask computations per schema (default: 32)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    parser.add_argument("--only", choices=("llguidance", "xgrammar"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.only:
        measure = measure_llguidance if args.only == "llguidance" else measure_xgrammar
        print(json.dumps(measure(args.steps)))
        return 0
    results = []
    for lib in ("llguidance", "xgrammar"):
        out = subprocess.run([sys.executable, "-m", "cluster.bench.structured_libs", "--only", lib,
                              "--steps", str(args.steps), "--threads", str(args.threads)],
                             capture_output=True, text=True, check=True)
        result = json.loads(out.stdout.strip().splitlines()[-1])
        results.append(result)
        print(f"{lib:10s} {result['version']:8s} tokenizer {result['tokenizer_build_s']:6.2f} s "
              f"{result['tokenizer_rss_mib']:7.1f} MiB | compile p50 {result['compile_ms_p50']:7.2f} ms "
              f"p99 {result['compile_ms_p99']:8.2f} ms | mask p50 {result['mask_us_p50']:8.1f} us "
              f"p99 {result['mask_us_p99']:8.1f} us | {result['schemas']} schemas "
              f"{result['compiled_schemas_rss_mib']:6.1f} MiB")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
