"""The same model code on CUDA: matches the CPU result (runs only where a GPU is present)."""

from __future__ import annotations

import pytest
import torch

from cluster.model.checkpoint import load_model
from cluster.model.generate import greedy

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("dequantize", [False, True])
def test_cuda_matches_cpu(checkpoint_dir, dequantize):
    path = checkpoint_dir("tiny", True)
    cpu = load_model(path)
    gpu = load_model(path, device="cuda", dequantize=dequantize)
    assert gpu.embedding.weight.is_cuda and gpu.rope.inv_freq.is_cuda
    ids = torch.arange(40)[None] * 4999 % cpu.config.vocab_size
    expected = cpu(ids, cpu.new_cache(40))
    got = gpu(ids.cuda(), gpu.new_cache(40)).cpu()
    assert (got - expected).abs().max() < 1e-3
    assert greedy(gpu, ids[0].tolist(), 16) == greedy(cpu, ids[0].tolist(), 16)
    bf16 = load_model(path, device="cuda", dtype=torch.bfloat16)
    assert len(greedy(bf16, ids[0].tolist(), 8)) == 8
