"""PNG of latency against load for a rate sweep; matplotlib is imported only here (optional extra)."""

from __future__ import annotations


def plot_sweep(summaries: list[dict], path: str, title: str = "") -> None:
    """TTFT and E2E p50/p99 against achieved request throughput, one point per rate."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("--plot needs matplotlib: pip install 'gptoss-cluster[plot]'") from None
    x = [s["request_throughput"] for s in summaries]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((axes[0], "ttft_ms", "TTFT"), (axes[1], "e2e_ms", "E2E latency")):
        for q, style in (("p50", "o-"), ("p99", "s--")):
            ax.plot(x, [s[key][q] for s in summaries], style, label=f"{label} {q}")
        ax.set_xlabel("achieved requests/s")
        ax.set_ylabel("ms")
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
