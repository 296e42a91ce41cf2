"""A batch-1 bf16 decode layer with its weights on the checkpoint's mapped 4 KB pages against the same
weights copied into 2 MB pages (load_model(hugepages=...), model.hugepage_weights), in one process.

    python scripts/hugepages_ab.py CHECKPOINT [ROUNDS]   (a gpt-oss-20b-shaped checkpoint; default 8 rounds)

Loads the checkpoint twice, once each way, and checks both decode the same logits. Then, in each
round, it times 15 steps of each model, alternating which model goes first: one token after a
256-token context, the blocks only, timed by hooks. Prints one JSON line: each way's per-round median
ms per layer, and the median of the per-round ratios mapped / 2 MB pages.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import torch

from cluster.model.checkpoint import load_model

CONTEXT = 256


def _stepper(model):
    cache = model.new_cache(CONTEXT + 1, 1)
    with torch.inference_mode():
        model(torch.randint(0, 1000, (1, CONTEXT), generator=torch.Generator().manual_seed(0)), cache)
    ids, times = torch.tensor([[7]]), []
    for block in model.blocks:
        block.register_forward_pre_hook(lambda *_: times.append(-time.perf_counter()))
        block.register_forward_hook(lambda *_: times.__setitem__(-1, times[-1] + time.perf_counter()))

    def step() -> float:
        cache.length = CONTEXT
        del times[:]
        with torch.inference_mode():
            model.run_blocks(ids, *model.rope.tables(CONTEXT, 1, model.dtype), cache.layers(CONTEXT))
        return sum(times) / len(times)
    return step


def main() -> None:
    path, rounds = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 8
    models = {"mapped": load_model(path, dtype=torch.bfloat16),
              "hugepages": load_model(path, dtype=torch.bfloat16, hugepages=True)}
    ids = torch.tensor([[1, 2, 3]])
    with torch.inference_mode():
        a, b = (m(ids, m.new_cache(4)) for m in models.values())
    assert torch.equal(a, b), "the two loads decode differently"
    steps = {name: _stepper(m) for name, m in models.items()}
    ms: dict[str, list[float]] = {name: [] for name in steps}
    for r in range(rounds):
        for name in (list(steps) if r % 2 == 0 else list(steps)[::-1]):
            for _ in range(3):
                steps[name]()
            ms[name].append(statistics.median(steps[name]() for _ in range(15)) * 1e3)
        print(f"round {r + 1}/{rounds}: " + ", ".join(f"{n} {v[-1]:.2f} ms" for n, v in ms.items()),
              file=sys.stderr, flush=True)
    ratios = [m / h for m, h in zip(ms["mapped"], ms["hugepages"])]
    print(json.dumps({"layer_ms": ms, "median_ms": {n: statistics.median(v) for n, v in ms.items()},
                      "ratio_mapped_over_hugepages": statistics.median(ratios)}))


if __name__ == "__main__":
    main()
