"""`gptoss-cluster checkpoint make|info`: write a gpt-oss checkpoint (random weights, or a trained
preset's such as gpt-oss-tiny), or describe one."""

from __future__ import annotations

import argparse
import json
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("checkpoint", help="write or inspect gpt-oss checkpoints",
                                   description=__doc__)
    commands = parser.add_subparsers(dest="checkpoint_command", required=True, metavar="ACTION")

    make = commands.add_parser("make", help="write a deterministic random checkpoint in the real on-disk format")
    make.add_argument("--preset", default="tiny", help="model shape (default: tiny); see `checkpoint presets`")
    make.add_argument("--out", required=True, help="directory to write")
    make.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    make.add_argument("--layout", choices=("hf", "original", "both"), default="hf",
                      help="hf: config.json + sharded safetensors; original: original/ folder; both")
    make.add_argument("--no-mxfp4", dest="mxfp4", action="store_false", help="store experts in bf16, not MXFP4")
    make.add_argument("--vocab-size", type=int, default=None,
                      help="override the preset's vocabulary size (eos/pad ids outside it move to its top)")
    make.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                      help="show a progress bar (default: for large checkpoints on a terminal)")
    make.set_defaults(func=_make)

    info = commands.add_parser("info", help="print a checkpoint's config, sizes and quantized experts")
    info.add_argument("path", help="checkpoint directory (HF layout, or an original/ folder)")
    info.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    info.set_defaults(func=_info)

    presets = commands.add_parser("presets", help="list the built-in model presets and their sizes")
    presets.set_defaults(func=_presets)


def _make(args: argparse.Namespace) -> int:
    from cluster.model.checkpoint import write_checkpoint
    from cluster.model.config import GptOssConfig

    from cluster.model.trained import build_trained_checkpoint, is_trained

    config = GptOssConfig.from_preset(args.preset)
    if is_trained(args.preset):
        if args.layout != "hf" or not args.mxfp4 or args.vocab_size is not None:
            print(f"gptoss-cluster checkpoint make: {args.preset} holds trained weights, written only as they were "
                  "trained (--layout hf, MXFP4 experts, its own vocabulary)", file=sys.stderr)
            return 2
        out = build_trained_checkpoint(args.preset, args.out)
        print(f"wrote {args.preset} (trained, {config.num_parameters():,} parameters, MXFP4 experts, layout hf, "
              f"checksums verified) to {out}")
        return 0
    if args.vocab_size is not None:
        config = config.with_vocab_size(args.vocab_size)
    out = write_checkpoint(config, args.out, seed=args.seed, layout=args.layout, mxfp4=args.mxfp4,
                           progress=args.progress)
    print(f"wrote {args.preset} ({config.num_parameters():,} parameters, "
          f"{'MXFP4' if args.mxfp4 else 'bf16'} experts, layout {args.layout}) to {out}")
    return 0


def _info(args: argparse.Namespace) -> int:
    from cluster.model.checkpoint import describe_checkpoint

    info = describe_checkpoint(args.path)
    config = info["config"]
    mx = bool(info["mxfp4_tensors"])
    summary = {
        "layout": info["layout"],
        "directory": info["directory"],
        "files": info["files"],
        "parameters": config.num_parameters(),
        "active_parameters": config.num_parameters(active=True),
        "tensor_bytes_from_shapes": config.checkpoint_bytes(mxfp4=mx),
        "file_bytes": info["file_bytes"],
        "mxfp4_expert_layers": info["mxfp4_layers"],
        "mxfp4_tensors": len(info["mxfp4_tensors"]),
        "config": config.to_dict(),
    }
    if args.json:
        print(json.dumps(summary))
        return 0
    layers = info["mxfp4_layers"]
    if not mx:
        quantized = "none (bf16 experts)"
    elif layers == list(range(config.num_hidden_layers)):
        quantized = f"MXFP4 in all {config.num_hidden_layers} layers ({len(info['mxfp4_tensors'])} block tensors)"
    else:
        quantized = f"MXFP4 in layers {layers}"
    print(f"layout:             {info['layout']} ({info['directory']})")
    print(f"files:              {len(info['files'])} safetensors, {info['file_bytes']:,} bytes")
    print(f"parameters:         {summary['parameters']:,} total, {summary['active_parameters']:,} active per token")
    print(f"tensor bytes:       {summary['tensor_bytes_from_shapes']:,} (from shapes)")
    print(f"quantized experts:  {quantized}")
    print("config:")
    print(config)
    return 0


def _presets(args: argparse.Namespace) -> int:
    from cluster.model.config import PRESETS, GptOssConfig

    for name in PRESETS:
        c = GptOssConfig.from_preset(name)
        print(f"{name:18} layers {c.num_hidden_layers:2}  hidden {c.hidden_size:4}  experts "
              f"{c.num_local_experts:3}/top-{c.num_experts_per_tok}  vocab {c.vocab_size:6}  window "
              f"{c.sliding_window:3}  params {c.num_parameters():>15,}  mxfp4 bytes {c.checkpoint_bytes():>15,}")
    return 0
