"""`gptoss-cluster simulate`: discrete-event simulation of N replicas driven by the real routing
policies and autoscaling decision (cluster/simulate/). For each replica count it runs every policy
on the same workload (same seed), prints a table, optionally a ramp with autoscaling, writes a PNG,
and ends with one JSON object per replica count (prefix_affinity against round_robin and least_loaded).
"""

from __future__ import annotations

import argparse
import json
import time

from cluster.config import RouterConfig


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("simulate", help="simulate routing and autoscaling at scale", description=__doc__)
    p.add_argument("--replicas", type=int, nargs="+", default=[64, 512], help="replica counts (default: 64 512)")
    p.add_argument("--policies", nargs="+", default=["round_robin", "least_loaded", "prefix_affinity", "session"])
    p.add_argument("--workload", default="multiturn", choices=("poisson", "multiturn", "ramp"))
    p.add_argument("--rate-per-replica", type=float, default=16.0, help="requests/s per replica (default: 16)")
    p.add_argument("--duration", type=float, default=60.0, help="simulated seconds of arrivals (default: 60)")
    p.add_argument("--warmup", type=float, default=20.0, help="seconds excluded from statistics (default: 20)")
    defaults = RouterConfig()
    p.add_argument("--load-bound-ratio", type=float, default=defaults.load_bound_ratio,
                   help=f"serving.router.load_bound_ratio (default: {defaults.load_bound_ratio})")
    p.add_argument("--load-bound-slack", type=float, default=defaults.load_bound_slack,
                   help=f"serving.router.load_bound_slack (default: {defaults.load_bound_slack})")
    p.add_argument("--autoscale", action="store_true",
                   help="also run prefix_affinity with autoscaling on a ramp (at the first replica count as max)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot", default=None, help="write the PNG here")
    p.set_defaults(func=_simulate)


def _simulate(args) -> int:
    from cluster.config import AutoscalingSettings
    from cluster.simulate.cluster import SimConfig, simulate
    from cluster.simulate.report import plot, summarize, table, verdict
    from cluster.simulate.workload import WorkloadSpec

    runs: dict[int, list] = {}
    verdicts = []
    for n in args.replicas:
        pairs = []
        for policy in args.policies:
            started = time.perf_counter()
            router = RouterConfig(policy=policy, load_bound_ratio=args.load_bound_ratio,
                                  load_bound_slack=args.load_bound_slack)
            cfg = SimConfig(replicas=n, router=router, warmup_s=args.warmup, seed=args.seed,
                            workload=WorkloadSpec(kind=args.workload, rate_per_replica=args.rate_per_replica,
                                                  duration_s=args.duration, seed=args.seed))
            result = simulate(cfg)
            summary = summarize(result)
            pairs.append((summary, result))
            print(f"# {n} replicas, {policy}: {summary.requests} requests measured, "
                  f"{time.perf_counter() - started:.1f} s wall", flush=True)
        runs[n] = pairs
        summaries = [s for s, _ in pairs]
        print(table(summaries), flush=True)
        if "prefix_affinity" in args.policies:
            v = verdict(summaries)
            v["workload"] = args.workload
            verdicts.append(v)
    scaling = None
    if args.autoscale:
        n = args.replicas[0]
        settings = AutoscalingSettings(min_replicas=max(1, n // 8), max_replicas=n, target_ongoing_per_replica=48,
                                   target_kv_use=0.8, upscale_delay_s=5.0, downscale_delay_s=20.0)
        cfg = SimConfig(replicas=settings.min_replicas, router=RouterConfig(policy="prefix_affinity"), autoscaling=settings, warmup_s=0.0, seed=args.seed,
                        workload=WorkloadSpec(kind="ramp", rate_per_replica=args.rate_per_replica * n / settings.min_replicas,
                                              duration_s=args.duration * 2, seed=args.seed))
        scaling = simulate(cfg)
        counts = scaling.replica_counts
        print(f"# autoscaling on a ramp: replicas {counts[0][1]} -> max {max(c[1] for c in counts)} -> "
              f"end {counts[-1][1]}; TTFT p99 {summarize(scaling).ttft_p99:.3f} s", flush=True)
    if args.plot:
        plot(runs, scaling, args.plot)
        print(f"# plot: {args.plot}")
    for v in verdicts:
        print(json.dumps(v))
    return 0
