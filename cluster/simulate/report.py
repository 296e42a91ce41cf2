"""Summaries of simulation runs: percentiles, the comparison table, the JSON verdict, the PNG plot."""

from __future__ import annotations

from dataclasses import dataclass

from cluster.bench.report import percentile
from cluster.simulate.cluster import SimResult


@dataclass
class Summary:
    policy: str
    replicas: int
    requests: int
    ttft_p50: float
    ttft_p90: float
    ttft_p99: float
    itl_p50: float
    itl_p99: float
    tokens_per_s: float
    prefix_hit_rate: float
    max_over_mean_load: float
    affinity_hits: int
    fallbacks: int


def summarize(result: SimResult) -> Summary:
    cfg = result.config
    measured = [r for r in result.requests if r.arrival_s >= cfg.warmup_s]
    ttft = [r.first_token_s - r.arrival_s for r in measured]
    itl = [(r.done_s - r.first_token_s) / (r.output_tokens - 1) for r in measured if r.output_tokens > 1]
    span = max(1e-9, max((r.done_s for r in measured), default=cfg.warmup_s) - cfg.warmup_s)
    prompt = sum(r.prompt_tokens for r in measured)
    loads = result.replica_loads
    mean_load = sum(loads) / len(loads) if loads else 0.0
    return Summary(
        policy=cfg.router.policy, replicas=cfg.replicas, requests=len(measured),
        ttft_p50=percentile(ttft, 50), ttft_p90=percentile(ttft, 90), ttft_p99=percentile(ttft, 99),
        itl_p50=percentile(itl, 50), itl_p99=percentile(itl, 99),
        tokens_per_s=sum(r.output_tokens for r in measured) / span,
        prefix_hit_rate=sum(r.cached_tokens for r in measured) / prompt if prompt else 0.0,
        max_over_mean_load=max(loads) / mean_load if mean_load else 1.0,
        affinity_hits=result.outcomes.get("affinity_hit", 0), fallbacks=result.outcomes.get("fallback", 0))


def table(summaries: list[Summary]) -> str:
    head = ("| replicas | policy | requests | TTFT p50 s | TTFT p90 s | TTFT p99 s | ITL p50 ms | ITL p99 ms "
            "| out tok/s | prefix hit | max/mean load | affinity hits | fallbacks |")
    lines = [head, "|" + "---|" * head.count("|")[:-1] if False else "|" + "---|" * (head.count("|") - 1)]
    for s in summaries:
        lines.append(f"| {s.replicas} | {s.policy} | {s.requests} | {s.ttft_p50:.3f} | {s.ttft_p90:.3f} | "
                     f"{s.ttft_p99:.3f} | {s.itl_p50 * 1e3:.1f} | {s.itl_p99 * 1e3:.1f} | {s.tokens_per_s:,.0f} | "
                     f"{s.prefix_hit_rate:.1%} | {s.max_over_mean_load:.2f} | {s.affinity_hits} | {s.fallbacks} |")
    return "\n".join(lines)


def verdict(summaries: list[Summary]) -> dict:
    """The JSON object for one replica count: prefix_affinity against the baselines."""
    by = {s.policy: s for s in summaries}
    pa = by["prefix_affinity"]
    out = {"replicas": pa.replicas, "workload": None,
           "ttft_p99_s": {p: round(s.ttft_p99, 4) for p, s in by.items()},
           "max_over_mean_load": round(pa.max_over_mean_load, 3),
           "prefix_hit_rate": round(pa.prefix_hit_rate, 4)}
    if "round_robin" in by:
        out["ttft_p99_ratio_vs_round_robin"] = round(pa.ttft_p99 / by["round_robin"].ttft_p99, 4)
    if "least_loaded" in by:
        out["ttft_p99_ratio_vs_least_loaded"] = round(pa.ttft_p99 / by["least_loaded"].ttft_p99, 4)
    return out


def plot(runs: dict[int, list[tuple[Summary, SimResult]]], scaling: SimResult | None, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = len(runs) + (1 if scaling is not None else 0)
    fig, axes = plt.subplots(2, cols, figsize=(5.5 * cols, 8), squeeze=False)
    for col, (n, pairs) in enumerate(sorted(runs.items())):
        ax = axes[0][col]
        for summary, result in pairs:
            cfg = result.config
            ttft = sorted(r.first_token_s - r.arrival_s for r in result.requests if r.arrival_s >= cfg.warmup_s)
            ax.plot(ttft, [i / len(ttft) for i in range(len(ttft))], label=summary.policy)
        ax.set_xscale("log")
        ax.set_xlabel("TTFT (s)")
        ax.set_ylabel("fraction of requests")
        ax.set_title(f"TTFT CDF, {n} replicas, multiturn")
        ax.legend()
        ax = axes[1][col]
        for summary, result in pairs:
            loads = sorted(result.replica_loads, reverse=True)
            ax.plot(range(len(loads)), loads, label=f"{summary.policy} (max/mean {summary.max_over_mean_load:.2f})")
        ax.set_xlabel("replica (sorted by load)")
        ax.set_ylabel("mean waiting + running")
        ax.set_title(f"per-replica load, {n} replicas")
        ax.legend()
    if scaling is not None:
        ax = axes[0][cols - 1]
        t = [c[0] for c in scaling.replica_counts]
        ax.step(t, [c[1] for c in scaling.replica_counts], where="post", label="routable replicas")
        ax.step(t, [c[2] for c in scaling.replica_counts], where="post", label="desired")
        ax.set_xlabel("time (s)")
        ax.set_ylabel("replicas")
        ax.set_title(f"autoscaling on a ramp ({scaling.config.router.policy})")
        ax.legend()
        ax = axes[1][cols - 1]
        reqs = sorted(scaling.requests, key=lambda r: r.arrival_s)
        ax.scatter([r.arrival_s for r in reqs], [r.first_token_s - r.arrival_s for r in reqs], s=1)
        ax.set_yscale("log")
        ax.set_xlabel("arrival time (s)")
        ax.set_ylabel("TTFT (s)")
        ax.set_title("TTFT during the ramp")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
