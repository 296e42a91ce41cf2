"""Tiny float32 gpt-oss models for the engine tests, built once per session.

A plain module rather than conftest.py: tests/model imports its conftest by name, and two
conftest modules on sys.path would shadow each other. Test modules import these fixtures.
"""

from __future__ import annotations

import pytest
import torch

from cluster.model.checkpoint import load_model, write_checkpoint
from cluster.model.config import GptOssConfig


@pytest.fixture(scope="session")
def engine_model(tmp_path_factory):
    """model(preset) -> a float32 GptOssModel from a freshly written MXFP4 checkpoint (experts dequantized)."""
    made = {}

    def get(preset: str = "tiny"):
        if preset not in made:
            out = tmp_path_factory.mktemp(f"engine-{preset}")
            write_checkpoint(GptOssConfig.from_preset(preset), out, seed=0, mxfp4=True)
            made[preset] = load_model(out, dtype=torch.float32, dequantize=True)
        return made[preset]

    return get


@pytest.fixture(autouse=True, scope="module")
def one_intra_op_thread():
    # Many tiny ops: on a shared 2-core box, OpenMP thread hand-offs cost more than they save.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
