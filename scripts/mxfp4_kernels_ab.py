"""The MXFP4 CPU kernels against each other on a 20b-shaped layer's experts, in one process.

Four experts of gpt-oss-20b's gate_up projection (5760 x 2880, random MXFP4 bytes), bf16 activations,
`--tokens` rows per expert: `grouped_matmul` with each kernel that runs here (kernels/mxfp4_cpu.py),
alternating which goes first in each repetition, so both see the same load. Checks that each result is
within float32 rounding of unpack-then-matmul first.

    python scripts/mxfp4_kernels_ab.py [REPS] [TOKENS ...]   (default 15 reps, 1, 2 and 8 tokens per expert)

Prints one JSON line per token count: each kernel's best and median ms and GB/s of packed bytes read,
and the median per-repetition ratio native / bf16.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import torch

from cluster.model import mxfp4
from cluster.model.kernels import mxfp4_cpu

E, R, H, CHOSEN = 32, 5760, 2880, (3, 7, 11, 20)


def main() -> None:
    reps = int(sys.argv[1]) if len(sys.argv) > 1 else 15
    token_counts = [int(a) for a in sys.argv[2:]] or [1, 2, 8]
    kernels = [k for k, ok in (("bf16", mxfp4_cpu.bf16_available()), ("native", mxfp4_cpu.native_available()))
               if ok]
    gen = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (E, R, H // 32, 16), dtype=torch.uint8, generator=gen)
    scales = torch.randint(118, 130, (E, R, H // 32), dtype=torch.uint8, generator=gen)
    experts = torch.tensor(CHOSEN)
    packed_bytes = len(CHOSEN) * R * (H // 32) * 17
    for tokens in token_counts:
        offsets = torch.arange(0, (len(CHOSEN) + 1) * tokens, tokens)
        x = torch.randn(len(CHOSEN) * tokens, H, generator=gen).to(torch.bfloat16)
        exact = torch.cat([x[offsets[m]:offsets[m + 1]].double() @ mxfp4.unpack(blocks[e], scales[e], torch.float64).T
                           for m, e in enumerate(CHOSEN)])
        times: dict[str, list[float]] = {k: [] for k in kernels}
        for k in kernels:
            got = mxfp4_cpu.grouped_matmul(blocks, scales, x, experts, offsets, kernel=k)
            assert (got.double() - exact).abs().max().item() <= 1e-5 * exact.abs().max().item(), k
        for rep in range(reps):
            for k in (kernels if rep % 2 == 0 else kernels[::-1]):
                start = time.perf_counter()
                mxfp4_cpu.grouped_matmul(blocks, scales, x, experts, offsets, kernel=k)
                times[k].append(time.perf_counter() - start)
        line = {"tokens_per_expert": tokens, "threads": torch.get_num_threads(), "packed_mb": packed_bytes / 1e6}
        for k, ts in times.items():
            line[k] = {"best_ms": round(min(ts) * 1e3, 3), "median_ms": round(statistics.median(ts) * 1e3, 3),
                       "best_gb_s": round(packed_bytes / min(ts) / 1e9, 1)}
        if len(kernels) == 2:
            line["native_over_bf16"] = round(statistics.median(a / b for a, b in zip(times["native"], times["bf16"])), 2)
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
