"""gpt-oss-tiny, rebuilt from its packaged artifact exactly as `serve` rebuilds it, once per session."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def trained_checkpoint(cache_dir):
    from cluster.serving.model_store import ensure_preset_checkpoint

    return ensure_preset_checkpoint("gpt-oss-tiny", cache_dir)


@pytest.fixture(scope="session")
def trained_model(trained_checkpoint):
    from cluster.model.checkpoint import load_model

    return load_model(trained_checkpoint)
