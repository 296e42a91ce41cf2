"""Checkpoints written once per test session, shared by the tests in this folder."""

from __future__ import annotations

import pytest

from cluster.model.checkpoint import write_checkpoint
from cluster.model.config import GptOssConfig


@pytest.fixture(scope="session")
def checkpoint_dir(tmp_path_factory):
    """checkpoint_dir(preset, mxfp4) -> a directory holding the HF layout and original/ (same weights).

    Tests use the two tiny shapes: "tiny" (real vocab, what `serve` uses) and "tiny-small-vocab"
    (odd layer count, 3 query heads per kv head, top-2 of 4 experts).
    """
    made = {}

    def get(preset: str, mxfp4: bool):
        key = (preset, mxfp4)
        if key not in made:
            out = tmp_path_factory.mktemp(f"{preset}-{'mxfp4' if mxfp4 else 'bf16'}")
            # a small shard size so the HF index really spans several files
            write_checkpoint(GptOssConfig.from_preset(preset), out, seed=0, layout="both", mxfp4=mxfp4,
                             max_shard_bytes=8 << 20)
            made[key] = out
        return made[key]

    return get
