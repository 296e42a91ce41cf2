"""Random prompts of ordinary-text token ids for end-to-end tests (no harmony stop token among them)."""

from __future__ import annotations

import torch

TOP_ID = 100_000  # ids below this are plain BPE text; the harmony specials start at 199998


def random_prompts(lengths, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, TOP_ID, (n,), generator=g).tolist() for n in lengths]
