"""`gptoss-cluster bench roofline`: decode time against the bytes a step must read, at measured bandwidth.

Decode at small batch is memory-bound: each step reads every weight it uses once. The roofline of a
part is (bytes it must read) / (read bandwidth), with the bandwidth measured in the same run as a
large float32 `torch.sum` (best of N). Reported per part, batch 1 and batch B:

- a layer: attention weights (qkv, out, in the model dtype) + KV cache read + router + the experts
  the batch chose (packed MXFP4 bytes, or dense). At batch > 1 the chosen experts are counted from
  the routers' actual choices during the timed step.
- the unembedding (hidden -> vocabulary) and greedy pick, timed as the engine runs them.
- a whole step (`model(ids, cache, last_only=True)`) and the greedy decode loop's tokens/s, and the
  extrapolation to `--full-layers` (the preset's layer count) from the per-layer time.

Timings interleave the bandwidth probe with the parts, each part's best of `--runs` counts (the run
least disturbed on a shared machine). With `--peer llama-cpp`, llama.cpp runs the same checkpoint
on the same threads (cluster/bench/peer_llama_cpp.py), its batch-1 decode steps alternating with
ours, and the summary adds its tokens/s and ratio_vs_llama_cpp = our batch-1 step tokens/s / its
(> 1: we are faster); a peer that cannot run is said in one line and left out. The last line is one
JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from typing import Callable

from cluster.bench import peer_llama_cpp

DTYPES = ("bfloat16", "float32")


def add_parser(commands) -> None:
    p = commands.add_parser("roofline", help="decode time per layer / unembedding / token against bytes read "
                            "at the read bandwidth measured in the same run", description=__doc__)
    p.add_argument("--preset", default="tiny", help="model shape (default: tiny); e.g. gpt-oss-20b with --layers 2")
    p.add_argument("--layers", type=int, default=None, help="write the preset with this many layers (default: all)")
    p.add_argument("--checkpoint", default=None, help="use this checkpoint directory instead of writing one")
    p.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="model dtype (default: bfloat16)")
    p.add_argument("--batch", type=int, default=8, help="the larger batch measured besides batch 1 (default: 8)")
    p.add_argument("--context", type=int, default=64, help="tokens already in the KV cache (default: 64)")
    p.add_argument("--runs", type=int, default=5, help="timed runs per measurement (default: 5)")
    p.add_argument("--new-tokens", type=int, default=8, help="tokens per greedy decode run (default: 8)")
    p.add_argument("--threads", type=int, default=None, help="torch (and kernel) threads (default: torch's)")
    p.add_argument("--probe-mb", type=int, default=512, help="bandwidth probe size in MiB (default: 512)")
    p.add_argument("--hugepages", action=argparse.BooleanOptionalAction, default=True,
                   help="weights of 2 MB and more in 2 MB pages, as model.hugepage_weights serves them (default: on)")
    p.add_argument("--json", dest="json_path", default=None, help="also write the JSON summary here")
    peer_llama_cpp.add_arguments(p)
    p.set_defaults(func=run)


def _best(fn: Callable[[], object], runs: int) -> float:
    fn()  # warm-up (first-use compilation, packing, page faults)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def _layer_bytes(model, batch: int, context: int, experts_used: float) -> dict[str, float]:
    """Bytes one layer must read for a decode step of `batch` tokens."""
    config = model.config
    block = model.blocks[0]
    attn = sum(p.numel() * p.element_size() for p in block.attn.parameters())
    kv = 2 * batch * config.num_key_value_heads * context * config.head_dim * model.dtype.itemsize
    mlp = block.mlp
    router = sum(p.numel() * p.element_size() for p in mlp.router.parameters())
    if mlp.packed:
        per_expert = sum(getattr(mlp, n)[0].numel() for n in ("gate_up_blocks", "gate_up_scales",
                                                             "down_blocks", "down_scales"))
    else:
        per_expert = (mlp.gate_up_weight[0].numel() + mlp.down_weight[0].numel()) * mlp.gate_up_weight.element_size()
    per_expert += (mlp.gate_up_bias[0].numel() + mlp.down_bias[0].numel()) * mlp.gate_up_bias.element_size()
    return {"attention": attn + kv, "router": router, "experts": experts_used * per_expert,
            "total": attn + kv + router + experts_used * per_expert}


def _against_roofline(m: dict, bw: float, unembed_bytes: int, layers: int, full_layers: int) -> dict:
    """One batch's timings (seconds) and bytes -> the reported row (ms, fractions of the roofline)."""
    batch, layer_s, unembed_s, step_s = m["batch"], m["layer_s"], m["unembed_s"], m["step_s"]
    rest_s = max(step_s - layers * layer_s, 0.0)  # embedding, final norm, unembedding
    return {
        "batch": batch, "experts_per_layer": m["experts_per_layer"],
        "layer_ms": layer_s * 1e3, "layer_roofline_ms": m["layer_bytes"] / bw * 1e3,
        "layer_fraction_of_roofline": m["layer_bytes"] / bw / layer_s, "layer_mb": m["layer_bytes"] / 1e6,
        "unembedding_ms": unembed_s * 1e3, "unembedding_roofline_ms": unembed_bytes / bw * 1e3,
        "unembedding_fraction_of_roofline": unembed_bytes / bw / unembed_s,
        "step_ms": step_s * 1e3, "tokens_per_s": batch / step_s,
        f"tokens_per_s_{full_layers}_layers": batch / (rest_s + full_layers * layer_s),
        f"roofline_tokens_per_s_{full_layers}_layers": batch * bw / (full_layers * m["layer_bytes"] + unembed_bytes),
    }


def run(args: argparse.Namespace) -> int:
    import torch

    from cluster.model.checkpoint import write_checkpoint
    from cluster.model.config import GptOssConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    peer_missing = peer_llama_cpp.unavailable(args) if args.peer else None
    if peer_missing:
        print(f"llama.cpp peer unavailable: {peer_missing}; measuring ours alone", flush=True)
    with tempfile.TemporaryDirectory(prefix="gptoss-roofline-") as tmp:
        path = args.checkpoint
        if path is None:
            config = GptOssConfig.from_preset(args.preset)
            if args.layers:
                config = dataclasses.replace(config, num_hidden_layers=args.layers, layer_types=None)
            path = write_checkpoint(config, tmp, seed=0, layout="hf", mxfp4=True)
        decoder = None
        if args.peer and not peer_missing:
            try:
                decoder = peer_llama_cpp.start(args, path, tmp, torch.get_num_threads())
            except RuntimeError as e:
                peer_missing = str(e)
                print(f"llama.cpp peer failed: {peer_missing}", flush=True)
        try:
            summary = _measure(args, path, decoder.step if decoder else None)
        finally:
            if decoder:
                decoder.close()
        if decoder:
            try:
                peer = decoder.result()
            except RuntimeError as e:
                peer_missing = str(e)
                print(f"llama.cpp peer failed: {peer_missing}", flush=True)
            else:
                ours = summary["rows"][0]["tokens_per_s"]
                summary.update(peer=peer, ratio_vs_llama_cpp=ours / peer["tokens_per_s"])
                print(f"llama.cpp (llama-cpp-python {peer['llama_cpp_python']}), batch 1, {peer['threads']} threads: "
                      f"{peer['tokens_per_s']:.2f} tokens/s (step {peer['step_ms']:.1f} ms, best of {peer['steps']}, "
                      f"alternating with ours); ours {ours:.2f} tokens/s: ratio_vs_llama_cpp "
                      f"{summary['ratio_vs_llama_cpp']:.2f}")
        if peer_missing:
            summary["peer"] = {"name": args.peer, "unavailable": peer_missing}
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(summary, f, indent=2)
    print(json.dumps(summary))
    return 0


def _measure(args: argparse.Namespace, path: str, peer_step: Callable[[], None] | None) -> dict:
    """Our side: the table printed, the JSON summary returned; `peer_step` (if any) runs after each
    of our timed batch-1 steps."""
    import torch

    from cluster.model.checkpoint import load_model
    from cluster.model.config import GptOssConfig
    from cluster.engine.unembedding import Unembedding
    from cluster.memory import resident_bytes
    from cluster.parallel.sharding import memory_report
    from cluster.model.unembedding import argmax_rows

    dtype = getattr(torch, args.dtype)
    full_layers = GptOssConfig.from_preset(args.preset).num_hidden_layers
    model = load_model(path, dtype=dtype, hugepages=args.hugepages)
    config = model.config
    L = config.num_hidden_layers

    probe = torch.ones(args.probe_mb << 18, dtype=torch.float32)  # float32: 4 bytes each
    bandwidths: list[float] = []

    def bandwidth() -> float:
        bandwidths.append(probe.numel() * 4 / _best(lambda: probe.sum(), args.runs))
        return max(bandwidths)

    # The experts each layer's router chose during a step, counted by a hook (batch > 1 shares some).
    chosen: list[set[int]] = [set() for _ in range(L)]

    def count_experts(i):
        def hook(module, inputs, logits):
            chosen[i].update(torch.topk(logits, config.num_experts_per_tok, dim=-1).indices.flatten().tolist())
        return hook

    handles = [b.mlp.router.register_forward_hook(count_experts(i)) for i, b in enumerate(model.blocks)]
    block_times: list[float] = []

    def start_block(module, inputs):
        block_times.append(-time.perf_counter())

    def end_block(module, inputs, output):
        block_times[-1] += time.perf_counter()

    for b in model.blocks:
        handles += [b.register_forward_pre_hook(start_block), b.register_forward_hook(end_block)]

    unembed = Unembedding(model.unembedding)  # as the engine runs it
    gen = torch.Generator().manual_seed(0)
    rows = []
    bandwidth()
    for batch in sorted({1, args.batch}):
        cache = model.new_cache(args.context + args.runs + 2, batch)
        with torch.no_grad():
            model(torch.randint(0, config.vocab_size, (batch, args.context), generator=gen), cache)
        ids = torch.randint(0, config.vocab_size, (batch, 1), generator=gen)
        step_times, layer_times = [], []
        for _ in range(args.runs + 1):
            cache.length = args.context  # every timed step reads the same context
            for s in chosen:
                s.clear()
            del block_times[:]
            start = time.perf_counter()
            with torch.no_grad():
                model(ids, cache, last_only=True)
            step_times.append(time.perf_counter() - start)
            layer_times.append(sum(block_times) / L)
            experts_used = sum(len(s) for s in chosen) / L
            if peer_step and batch == 1:
                peer_step()
        step_s, layer_s = min(step_times[1:]), min(layer_times[1:])
        hidden = torch.randn(batch, config.hidden_size, generator=gen).to(dtype)
        with torch.no_grad():
            unembed_s = _best(lambda: argmax_rows(unembed(hidden)), args.runs)
        bandwidth()
        lb = _layer_bytes(model, batch, args.context, experts_used)
        rows.append({"batch": batch, "experts_per_layer": experts_used, "layer_bytes": lb["total"],
                     "layer_s": layer_s, "unembed_s": unembed_s, "step_s": step_s})
    for h in handles:
        h.remove()

    # The greedy decode loop (the plain KV-cache path: forward, unembed, argmax per token), batch 1.
    from cluster.model.generate import greedy

    prompt = torch.randint(0, config.vocab_size, (args.context,), generator=gen).tolist()
    greedy(model, prompt, 2)
    decode_s = _best(lambda: greedy(model, prompt, args.new_tokens), max(1, args.runs // 2))
    greedy_tps = args.new_tokens / decode_s  # includes the prompt's prefill: a lower bound
    bw = bandwidth()
    unembed_bytes = model.unembedding.weight.numel() * model.unembedding.weight.element_size()
    rows = [_against_roofline(r, bw, unembed_bytes, L, full_layers) for r in rows]

    print(f"{args.preset} ({L} of {full_layers} layers), {args.dtype}, {torch.get_num_threads()} threads; read "
          f"bandwidth {bw / 1e9:.1f} GB/s (best of the {len(bandwidths)} probes interleaved with the timings)")
    print(f"{'batch':>5} {'experts':>7} {'layer MB':>8} {'layer ms':>8} {'roofline':>8} {'of roof':>7} "
          f"{'unemb ms':>8} {'roofline':>8} {'of roof':>7} {'step ms':>8} {'tok/s':>7} {f'tok/s@{full_layers}L':>10}")
    for r in rows:
        print(f"{r['batch']:>5} {r['experts_per_layer']:>7.1f} {r['layer_mb']:>8.1f} {r['layer_ms']:>8.2f} "
              f"{r['layer_roofline_ms']:>8.2f} {r['layer_fraction_of_roofline']:>7.0%} {r['unembedding_ms']:>8.2f} "
              f"{r['unembedding_roofline_ms']:>8.2f} {r['unembedding_fraction_of_roofline']:>7.0%} "
              f"{r['step_ms']:>8.1f} {r['tokens_per_s']:>7.2f} {r[f'tokens_per_s_{full_layers}_layers']:>10.2f}")
    print(f"greedy decode loop, batch 1 ({args.new_tokens} tokens after a {args.context}-token prompt, "
          f"prefill included): {greedy_tps:.2f} tokens/s")
    weights = sum(memory_report(model).values())
    resident, peak = resident_bytes()
    print(f"memory: weights {weights / 1e9:.2f} GB; this process resident {resident / 1e9:.2f} GB, peak "
          f"{peak / 1e9:.2f} GB (with the {args.probe_mb} MB bandwidth probe and the KV caches)")
    return {"preset": args.preset, "layers": L, "full_layers": full_layers, "dtype": args.dtype,
            "threads": torch.get_num_threads(), "bandwidth_gb_s": bw / 1e9, "rows": rows,
            "greedy_tokens_per_s": greedy_tps, "weights_gb": weights / 1e9, "resident_gb": resident / 1e9,
            "peak_resident_gb": peak / 1e9}
