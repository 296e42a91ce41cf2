"""`gptoss-cluster bench model`: our plain KV-cache greedy decode against transformers, same checkpoint.

Both models run in this process on the same thread count, batch 1, float32, from one checkpoint
written by `write_checkpoint`. Each side is warmed up, then timed runs alternate between the two
so background load hits both alike. Each side's fastest run counts (the one least disturbed by
other processes on a shared machine); medians are printed too. The last line is one JSON object.
transformers is imported only here (it is a test extra, not a runtime dependency).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile

from cluster.bench.timing import alternating_times


def add_parser(commands: argparse._SubParsersAction) -> None:
    model = commands.add_parser("model", help="decode tokens/s: ours vs transformers GptOssForCausalLM.generate",
                                description=__doc__)
    model.add_argument("--preset", default="tiny", help="model preset (default: tiny)")
    model.add_argument("--checkpoint", default=None, help="use this HF-layout checkpoint instead of writing one")
    model.add_argument("--no-mxfp4", dest="mxfp4", action="store_false", help="bf16 experts instead of MXFP4")
    model.add_argument("--new-tokens", type=int, default=64, help="tokens generated per run (default: 64)")
    model.add_argument("--prompt-len", type=int, default=16, help="prompt tokens (default: 16)")
    model.add_argument("--runs", type=int, default=5, help="timed runs per side (default: 5)")
    model.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's current)")
    model.add_argument("--packed", action="store_true",
                       help="load our model as load_model does by default (MXFP4 experts stay packed; small "
                            "layers keep a dense copy) instead of dequantizing at load as transformers does on CPU")
    model.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    try:
        import transformers
    except ImportError:
        print("bench model needs transformers (pip install 'gptoss-cluster[test]')")
        return 2

    from cluster.model.checkpoint import describe_checkpoint, load_model, write_checkpoint
    from cluster.model.config import GptOssConfig
    from cluster.model.generate import greedy

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()

    with tempfile.TemporaryDirectory(prefix="gptoss-bench-") as tmp:
        path = args.checkpoint
        if path is None:
            path = write_checkpoint(GptOssConfig.from_preset(args.preset), tmp, seed=0, mxfp4=args.mxfp4)
        mx = bool(describe_checkpoint(path)["mxfp4_tensors"])
        ours = load_model(path, dtype=torch.float32, dequantize=not args.packed)
        # On CPU transformers can only dequantize MXFP4 experts (into the requested dtype).
        kwargs = {"quantization_config": transformers.Mxfp4Config(dequantize=True)} if mx else {}
        ref = transformers.GptOssForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs).eval()

    vocab = ours.config.vocab_size
    prompt = torch.randint(0, min(vocab, 100_000), (args.prompt_len,), generator=torch.Generator().manual_seed(0))
    prompt_ids = prompt.tolist()
    n = args.new_tokens

    def run_ours() -> list[int]:
        return greedy(ours, prompt_ids, n)

    ids = prompt[None, :]
    mask = torch.ones_like(ids)

    def run_ref() -> list[int]:
        with torch.inference_mode():
            out = ref.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                               eos_token_id=None, pad_token_id=0)
        return out[0, args.prompt_len:].tolist()

    same = run_ours() == run_ref()  # also the warm-up
    run_ours(), run_ref()
    times = alternating_times({"ours": run_ours, "transformers": run_ref}, args.runs)

    ours_tps, ref_tps = n / min(times["ours"]), n / min(times["transformers"])
    ours_med, ref_med = n / statistics.median(times["ours"]), n / statistics.median(times["transformers"])
    experts = ("MXFP4 packed" if args.packed else "MXFP4 dequantized at load") if mx else "bf16"
    print(f"checkpoint: {args.checkpoint or args.preset}, experts {experts}, float32, batch 1, {threads} threads, "
          f"prompt {args.prompt_len}, {n} new tokens, best (median) of {args.runs} alternating runs")
    print(f"ours (KV-cache greedy):          {ours_tps:8.1f} ({ours_med:.1f}) tokens/s")
    print(f"transformers generate (greedy):  {ref_tps:8.1f} ({ref_med:.1f}) tokens/s")
    print(f"ratio ours/transformers:         {ours_tps / ref_tps:8.2f} ({ours_med / ref_med:.2f})   "
          f"(same tokens: {same})")
    print(json.dumps({
        "decode_ratio_vs_transformers": round(ours_tps / ref_tps, 3),
        "ours_tokens_per_s": round(ours_tps, 1),
        "transformers_tokens_per_s": round(ref_tps, 1),
        "median_ratio": round(ours_med / ref_med, 3),
        "threads": threads,
        "preset": args.preset if args.checkpoint is None else None,
        "experts": experts,
        "same_tokens": same,
    }))
    return 0
