"""`gptoss-cluster experts`: expert placement tools (no Ray, no weights).

    experts plan --stats FILE [--ranks N] [--redundant R]   placement a recorded load would get
    experts layout --preset NAME --ranks N [--gpu-gb 80]   resident bytes per rank from shapes
"""

from __future__ import annotations

import argparse
import json
import sys


def register(subparsers) -> None:
    parser = subparsers.add_parser("experts", help="expert placement: plan from loads, bytes per rank",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="experts_command", required=True, metavar="COMMAND")
    plan = commands.add_parser("plan", help="the placement a recorded per-expert load would get")
    plan.add_argument("--stats", required=True, metavar="FILE",
                      help="JSON: {\"tokens_per_expert\": [[per expert] per layer]}, a list of lists or one list")
    plan.add_argument("--ranks", type=int, default=2, help="expert-parallel ranks (default 2)")
    plan.add_argument("--redundant", type=int, default=0, help="extra copies of hot experts per layer (default 0)")
    plan.add_argument("--policy", default="contiguous", help="the placement compared against (default contiguous)")
    plan.add_argument("--json", action="store_true", help="print only the JSON result")
    plan.set_defaults(func=_plan)
    layout = commands.add_parser("layout", help="resident bytes per rank for a preset (computed from shapes)")
    layout.add_argument("--preset", default="gpt-oss-120b", help="model preset (default gpt-oss-120b)")
    layout.add_argument("--ranks", type=int, default=4, help="expert-parallel ranks (default 4)")
    layout.add_argument("--gpu-gb", type=float, default=80.0, help="GPU memory in GB (1e9 bytes; default 80)")
    layout.set_defaults(func=_layout)


def _plan(args: argparse.Namespace) -> int:
    from cluster.parallel.expert_map import format_table, plan_placement, read_stats, static_placement

    try:
        loads = read_stats(args.stats)
        E = len(loads[0])
        before = static_placement(args.policy, E, args.ranks)
    except (OSError, ValueError, KeyError) as err:
        print(f"gptoss-cluster experts plan: {err}", file=sys.stderr)
        return 2
    rows, layers = [], []
    for layer, layer_loads in enumerate(loads):
        after = plan_placement(layer_loads, args.ranks, args.redundant)
        ib, ia = before.imbalance(layer_loads), after.imbalance(layer_loads)
        rows.append([layer, f"{ib:.3f}", f"{ia:.3f}", " | ".join(",".join(map(str, s)) for s in after.slots)])
        layers.append({"layer": layer, "imbalance_before": ib, "imbalance_after": ia,
                       "rank_loads_before": before.rank_loads(layer_loads),
                       "rank_loads_after": after.rank_loads(layer_loads), "placement": after.to_dict()})
    result = {
        "ranks": args.ranks, "redundant": args.redundant, "policy_before": args.policy,
        "imbalance_before": max(item["imbalance_before"] for item in layers),
        "imbalance_after": max(item["imbalance_after"] for item in layers),
        "layers": layers,
    }
    if not args.json:
        print(f"{len(loads)} layers, {E} experts, {args.ranks} ranks, {args.redundant} redundant copies per layer")
        print(format_table(rows, ["layer", f"max/mean {args.policy}", "max/mean planned", "experts per rank"]))
        print(f"worst layer max/mean: before {result['imbalance_before']:.3f} -> after {result['imbalance_after']:.3f}")
    print(json.dumps(result if args.json else {k: result[k] for k in
                                                 ("ranks", "redundant", "imbalance_before", "imbalance_after")}))
    return 0


def _layout(args: argparse.Namespace) -> int:
    from cluster.model.config import GptOssConfig
    from cluster.parallel.expert_map import format_table, layout_bytes

    try:
        config = GptOssConfig.from_preset(args.preset)
        ranks = layout_bytes(config, args.ranks)
    except ValueError as err:
        print(f"gptoss-cluster experts layout: {err}", file=sys.stderr)
        return 2
    gpu = int(args.gpu_gb * 1e9)
    gb = lambda n: f"{n / 1e9:.2f}"  # noqa: E731
    rows = []
    for rb in ranks:
        free = gpu - rb.total
        rows.append([rb.rank, gb(rb.experts), gb(rb.attention), gb(rb.replicated), gb(rb.total), gb(free),
                     f"{max(free, 0) // rb.kv_bytes_per_token:,}"])
    print(f"{args.preset} over {args.ranks} ranks (GB = 1e9 bytes; experts MXFP4, the rest bf16; "
          f"KV bf16, every layer counted as full attention)")
    print(format_table(rows, ["rank", "experts GB", "attention GB", "replicated GB", "total GB",
                              f"free of {args.gpu_gb:g} GB", "KV tokens in free"]))
    worst = max(rb.total for rb in ranks)
    print(json.dumps({"preset": args.preset, "ranks": args.ranks, "max_rank_bytes": worst,
                      "gpu_bytes": gpu, "fits": worst < gpu,
                      "kv_tokens_free_min": min(max(gpu - rb.total, 0) // rb.kv_bytes_per_token for rb in ranks),
                      "per_rank_bytes": [rb.total for rb in ranks]}))
    return 0 if worst < gpu else 1
