"""Building the AVX-512 kernels at first use (kernels/native.py), and running without them.

A fresh machine has no built library: with a C compiler (.ci/run installs gcc) the first call
builds one into the user's cache; without a compiler every caller falls back (numba for MXFP4,
torch for bf16) with the same results.
"""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

from cluster.model import mxfp4
from cluster.model.kernels import bf16_cpu, mxfp4_cpu, native


@pytest.fixture
def fresh_process_state(monkeypatch, tmp_path):
    """An empty kernel cache and nothing loaded yet, as in a new process on a new machine."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(native, "_loaded", {})
    monkeypatch.setattr(bf16_cpu, "_kernel", None)
    monkeypatch.setattr(mxfp4_cpu, "_native", None)
    return tmp_path / "cache" / "gptoss-cluster" / "kernels"


@pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() != "AVX512", reason="the kernels need an AVX512 CPU")
@pytest.mark.skipif(shutil.which("gcc") is None and shutil.which("cc") is None, reason="no C compiler")
def test_first_use_builds_the_kernels_into_an_empty_cache(fresh_process_state):
    assert mxfp4_cpu.native_available()
    assert bf16_cpu.applies(torch.zeros(1, 64, dtype=torch.bfloat16), torch.zeros(8, 64, dtype=torch.bfloat16))
    assert sorted(p.name.split("-")[0] for p in fresh_process_state.glob("*.so")) == ["bf16_avx512", "mxfp4_avx512"]


@pytest.mark.skipif(mxfp4_cpu.numba is None, reason="the MXFP4 fallback is numba")
def test_without_a_compiler_everything_falls_back_with_the_same_results(fresh_process_state, monkeypatch, tmp_path):
    monkeypatch.setenv("CC", "no-such-compiler")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # neither cc nor gcc is found
    assert native.load("mxfp4_avx512") is None and not list(fresh_process_state.glob("*.so"))
    assert not mxfp4_cpu.native_available() and mxfp4_cpu.available()

    gen = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (2, 16, 2, 16), dtype=torch.uint8, generator=gen)
    scales = torch.randint(120, 130, (2, 16, 2), dtype=torch.uint8, generator=gen)
    x = torch.randn(3, 64, generator=gen)
    got = mxfp4_cpu.grouped_matmul(blocks, scales, x, torch.tensor([1, 0]), torch.tensor([0, 1, 3]))
    dense = mxfp4.unpack(blocks, scales, torch.float64)
    expected = torch.cat((x[:1].double() @ dense[1].T, x[1:].double() @ dense[0].T))
    assert (got.double() - expected).abs().max().item() <= 1e-5 * expected.abs().max().item()

    linear = bf16_cpu.Linear(64, 8).to(torch.bfloat16).requires_grad_(False)
    row = torch.randn(1, 64, generator=gen).bfloat16()
    assert not bf16_cpu.applies(row, linear.weight)
    assert torch.equal(linear(row), F.linear(row, linear.weight, linear.bias))
