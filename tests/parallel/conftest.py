"""The parallel tier: real worker processes (Ray actors) and gloo collectives on CPU."""

from __future__ import annotations

import pytest
import torch


def prompts_of(lengths, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(scope="session")
def ray_cluster(ray_serving):
    """Ray, started by the session's serving fixture (one Ray per test session)."""
    import ray

    assert ray.is_initialized()
    return ray
