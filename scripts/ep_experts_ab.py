"""One expert-parallel rank's MoE step on a 20b-shaped layer: the gathered path against the fused MXFP4 kernel.

Builds one gpt-oss-20b MoE layer (32 experts, hidden 2880, top-4) with random MXFP4 bytes, keeps
rank 0's shard of a contiguous placement over WORLD ranks (parallel/sharding.py ExpertParallelMoE,
the all-reduce a no-op), and times its forward at each batch size on the gathered path (unpack the
routed experts, batched matmul) and on the fused kernel (kernels/mxfp4_cpu.py), alternating which
goes first in each repetition, both in this process under the same load. Resident memory stays
under ~2 GB at batch 4 (the gathered path's dense copies of the routed experts).

    python scripts/ep_experts_ab.py [REPS] [BATCH ...]   (default 15 reps, batches 1 and 4)

Prints one JSON line per batch size: per-repetition times, medians, and the median of the
per-repetition ratios gathered / fused.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import sys
import time

import torch

from cluster.model import moe as moe_module
from cluster.model.config import GptOssConfig
from cluster.model.kernels import mxfp4_cpu
from cluster.model.moe import FUSED, MoE
from cluster.parallel.expert_map import contiguous
from cluster.parallel.sharding import ExpertParallelMoE

WORLD = 2
DTYPE = torch.bfloat16  # the dtype `load_model` gives a 20b checkpoint on CPU


def rank_shard(config: GptOssConfig) -> ExpertParallelMoE:
    gen = torch.Generator().manual_seed(0)
    layer = MoE(config, packed=True)
    for name in ("gate_up", "down"):
        blocks, scales = getattr(layer, f"{name}_blocks"), getattr(layer, f"{name}_scales")
        blocks.copy_(torch.randint(0, 256, blocks.shape, dtype=torch.uint8, generator=gen))
        scales.copy_(torch.randint(113, 127, scales.shape, dtype=torch.uint8, generator=gen))
    with torch.no_grad():
        for p in (layer.gate_up_bias, layer.down_bias, layer.router.weight, layer.router.bias):
            p.normal_(0, 0.02, generator=gen)
    layer = layer.to(DTYPE)
    return ExpertParallelMoE(layer, contiguous(config.num_local_experts, WORLD), 0, reduce=lambda t: None)


@contextlib.contextmanager
def gathered():
    """The path EP ranks took before the fused kernel: as on a machine where no MXFP4 kernel runs."""
    available = mxfp4_cpu.available
    mxfp4_cpu.available = lambda: False
    try:
        yield
    finally:
        mxfp4_cpu.available = available


def timed(shard: ExpertParallelMoE, x: torch.Tensor) -> float:
    start = time.perf_counter()
    shard(x)
    return time.perf_counter() - start


def local_pairs(shard: ExpertParallelMoE, x: torch.Tensor) -> int:
    """(token, expert) pairs of `x` routed to this rank's experts."""
    top_idx = torch.topk(shard.router(x.reshape(-1, x.shape[-1])), shard.top_k, dim=-1).indices
    return int(shard.routing.local_pairs(top_idx)[0].numel())


def main() -> None:
    reps = int(sys.argv[1]) if len(sys.argv) > 1 else 15
    batches = [int(b) for b in sys.argv[2:]] or [1, 4]
    config = GptOssConfig.from_preset("gpt-oss-20b")
    shard = rank_shard(config)
    gen = torch.Generator().manual_seed(1)
    with torch.inference_mode():
        for batch in batches:
            xs = []
            while len(xs) < reps:  # inputs routing at least one pair to this rank (else it has nothing to time)
                x = torch.randn(batch, 1, config.hidden_size, generator=gen).to(DTYPE)
                if local_pairs(shard, x):
                    xs.append(x)
            assert shard.kernel(xs[0], 1) == FUSED, "the fused kernel does not run here"
            shard(xs[0])  # warm-up: builds/loads the kernel, touches the weights
            with gathered():
                shard(xs[0])
            fused_s, gathered_s, pairs = [], [], []
            for i, x in enumerate(xs):
                pairs.append(local_pairs(shard, x))
                first_fused = i % 2 == 0
                if first_fused:
                    fused_s.append(timed(shard, x))
                with gathered():
                    gathered_s.append(timed(shard, x))
                if not first_fused:
                    fused_s.append(timed(shard, x))
            ratios = [g / f for g, f in zip(gathered_s, fused_s)]
            print(json.dumps({
                "batch": batch, "rank_experts": len(shard.local_experts()), "world": WORLD,
                "threads": torch.get_num_threads(), "native": mxfp4_cpu.native_available(),
                "pairs_on_rank": pairs, "dense_cache_bytes": moe_module.DENSE_CACHE_BYTES,
                "fused_ms": [round(1e3 * t, 2) for t in fused_s],
                "gathered_ms": [round(1e3 * t, 2) for t in gathered_s],
                "fused_median_ms": round(1e3 * statistics.median(fused_s), 2),
                "gathered_median_ms": round(1e3 * statistics.median(gathered_s), 2),
                "median_ratio_gathered_over_fused": round(statistics.median(ratios), 2),
            }), flush=True)


if __name__ == "__main__":
    main()
