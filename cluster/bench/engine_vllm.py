"""`gptoss-cluster bench engine --against vllm`: our batching engine against vLLM, same checkpoint, one run.

The checkpoint is the `--preset` shape (default tiny-vllm: vLLM's CPU attention needs head_dim >= 32)
written with float experts (vLLM cannot load MXFP4 on CPUs without AMX), loaded as float32 by both.
1. Throughput: the same workload as `bench engine` (N prompts of 16-512 tokens, half with shared
   64-token prefixes, `--new-tokens` each, greedy, no stop) through EngineCore with `--in-flight`
   sequences per step, and through vLLM's AsyncLLM (all submitted at once, max_num_seqs `--in-flight`).
2. Single-stream latency: one 64-token prompt alone, ms per generated token, through each engine.
Ours runs first, then vLLM is started and runs (an idle vLLM polls its queues and would steal a
core from ours); each side's best run counts. Both get `--threads` cores: torch threads for ours, vLLM's
OpenMP threads bound to cores 0..threads-1 (its worker runs the model; its engine-core and front-end
processes are extra). Prefix caching is on for both. The last line is one JSON object:
throughput_ratio_vs_vllm = ours / vLLM tokens/s (> 1: we are faster) and
single_stream_latency_ratio_vs_vllm = ours / vLLM ms/token (< 1: we are faster).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time


def run_vllm_bench(args: argparse.Namespace) -> int:
    try:
        import vllm  # noqa: F401
    except ImportError:
        print("bench engine --against vllm needs vLLM (scripts/vllm-tier.sh --install, then .venv-vllm/bin/gptoss-cluster)")
        return 2
    import torch

    from cluster.bench.engine_prompts import make_workload
    from cluster.config import EngineConfig
    from cluster.engine.core import EngineCore, run_to_completion
    from cluster.engine.sequence import SamplingSettings, Sequence
    from cluster.model.checkpoint import load_model, write_checkpoint
    from cluster.model.config import GptOssConfig

    preset = "tiny-vllm" if args.preset == "tiny" else args.preset
    torch.set_num_threads(args.threads)
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = f"0-{args.threads - 1}" if args.threads > 1 else "0"
    os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    n_new = args.new_tokens
    tmp = tempfile.TemporaryDirectory(prefix="gptoss-bench-vllm-")
    path = write_checkpoint(GptOssConfig.from_preset(preset), tmp.name, seed=0, mxfp4=False)
    model = load_model(path, dtype=torch.float32)
    prompts = make_workload(args.requests, args.min_prompt, args.max_prompt, model.config.vocab_size)
    settings = SamplingSettings(max_tokens=n_new, temperature=0.0, stop_token_ids=())
    engine_config = EngineConfig(block_size=16, max_num_seqs=args.in_flight, max_num_batched_tokens=512,
                                 max_waiting_requests=args.requests, kv_cache_memory_mib=512)
    single = prompts[1][:64]
    alone = EngineCore(model, EngineConfig(block_size=16, kv_cache_memory_mib=64, enable_prefix_caching=False))

    def ours_throughput() -> tuple[float, dict[str, list[int]]]:
        core = EngineCore(model, engine_config)
        t0 = time.perf_counter()
        out = run_to_completion(core, [Sequence(f"r{i}", p, settings) for i, p in enumerate(prompts)])
        return time.perf_counter() - t0, out

    def ours_alone() -> list[int]:
        return run_to_completion(alone, [Sequence("one", single, settings)])["one"]

    async def main() -> dict:
        from vllm import AsyncEngineArgs, SamplingParams
        from vllm.sampling_params import RequestOutputKind
        from vllm.v1.engine.async_llm import AsyncLLM

        # Ours first, before vLLM starts: an idle vLLM keeps polling its message queues and would take
        # a core from our runs (measured: ours 7x slower with vLLM idle beside it on 2 cores).
        ours_runs = []
        times: dict[str, list[float]] = {"ours": [], "vllm": []}
        with torch.inference_mode():
            ours_alone()  # warm-up
            for _ in range(args.throughput_runs):
                ours_runs.append(ours_throughput())
            for _ in range(args.latency_runs):
                t0 = time.perf_counter()
                ours_single = ours_alone()
                times["ours"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        llm = AsyncLLM.from_engine_args(AsyncEngineArgs(
            model=str(path), dtype="float32", skip_tokenizer_init=True, max_num_seqs=args.in_flight,
            max_num_batched_tokens=512, enable_prefix_caching=True, enforce_eager=True, disable_log_stats=True))
        start_s = time.perf_counter() - t0
        params = SamplingParams(max_tokens=n_new, min_tokens=n_new, temperature=0.0, ignore_eos=True,
                                detokenize=False, output_kind=RequestOutputKind.FINAL_ONLY)
        ids = iter(range(10**9))

        async def one(prompt) -> list[int]:
            last = None
            async for out in llm.generate({"prompt_token_ids": prompt}, params, f"b{next(ids)}"):
                last = out
            return list(last.outputs[0].token_ids)

        async def vllm_throughput() -> tuple[float, list[list[int]]]:
            await llm.reset_prefix_cache()  # each run starts cold, as ours does with a new EngineCore
            t0 = time.perf_counter()
            outs = await asyncio.gather(*(one(p) for p in prompts))
            return time.perf_counter() - t0, outs

        try:
            await one(prompts[0])  # warm-up
            vllm_runs = [await vllm_throughput() for _ in range(args.throughput_runs)]
            same_alone = ours_single == await one(single)
            for _ in range(args.latency_runs):
                await llm.reset_prefix_cache()
                t0 = time.perf_counter()
                await one(single)
                times["vllm"].append(time.perf_counter() - t0)
        finally:
            llm.shutdown()
        return dict(start_s=start_s, ours=min(ours_runs, key=lambda r: r[0]), vllm=min(vllm_runs, key=lambda r: r[0]),
                    times=times, same_alone=same_alone)

    r = asyncio.run(main())
    tmp.cleanup()
    total = len(prompts) * n_new
    ours_s, ours_out = r["ours"]
    vllm_s, vllm_out = r["vllm"]
    ours_tps, vllm_tps = total / ours_s, total / vllm_s
    agree = sum(ours_out[f"r{i}"] == vllm_out[i] for i in range(len(prompts)))
    ours_ms = min(r["times"]["ours"]) / n_new * 1000
    vllm_ms = min(r["times"]["vllm"]) / n_new * 1000
    print(f"preset {preset}, float32, {args.threads} threads each; {len(prompts)} requests, prompts "
          f"{args.min_prompt}-{args.max_prompt} tokens, {n_new} new tokens each; vLLM started in {r['start_s']:.0f} s")
    print(f"ours ({args.in_flight} in flight): {ours_tps:8.1f} tokens/s ({ours_s:.1f} s)")
    print(f"vLLM ({args.in_flight} in flight): {vllm_tps:8.1f} tokens/s ({vllm_s:.1f} s); same tokens for "
          f"{agree}/{len(prompts)} requests")
    print(f"single stream, {len(single)}-token prompt: ours {ours_ms:.2f} ms/token, vLLM {vllm_ms:.2f} ms/token "
          f"(same tokens: {r['same_alone']}), best of {args.latency_runs}; medians "
          f"{statistics.median(r['times']['ours']) / n_new * 1000:.2f} / {statistics.median(r['times']['vllm']) / n_new * 1000:.2f}")
    print(json.dumps({
        "throughput_ratio_vs_vllm": round(ours_tps / vllm_tps, 3),
        "single_stream_latency_ratio_vs_vllm": round(ours_ms / vllm_ms, 3),
        "engine_tokens_per_s": round(ours_tps, 1),
        "vllm_tokens_per_s": round(vllm_tps, 1),
        "engine_ms_per_token": round(ours_ms, 3),
        "vllm_ms_per_token": round(vllm_ms, 3),
        "same_tokens_as_vllm": f"{agree}/{len(prompts)}",
        "preset": preset,
        "threads": args.threads,
    }))
    return 0
