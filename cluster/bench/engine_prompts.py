"""The prompt workload of `bench engine` (ours and `--against vllm` alike): token ids, no tokenizer."""

from __future__ import annotations

import torch


def make_workload(num_requests: int, min_len: int, max_len: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """Prompts of random length; every other one starts with one of four shared 64-token prefixes."""
    g = torch.Generator().manual_seed(seed)
    top = min(vocab, 100_000)
    prefixes = [torch.randint(0, top, (64,), generator=g).tolist() for _ in range(4)]
    prompts = []
    for i in range(num_requests):
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
        body = torch.randint(0, top, (length,), generator=g).tolist()
        if i % 2 == 0 and length > 64:
            body[:64] = prefixes[(i // 2) % 4]
        prompts.append(body)
    return prompts
