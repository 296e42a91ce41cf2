"""Where a replica's checkpoint comes from: a directory given in the config, or a preset
checkpoint built once (deterministically, seed 0) into the cache directory and reused after."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

# Bump when the on-disk format written by cluster.model.checkpoint changes, to rebuild caches.
PRESET_FORMAT_VERSION = 1
_COMPLETE_MARKER = ".complete"


def preset_checkpoint_dir(cache_dir: Path, preset: str) -> Path:
    return cache_dir / "checkpoints" / f"{preset}-seed0-v{PRESET_FORMAT_VERSION}"


def ensure_preset_checkpoint(preset: str, cache_dir: Path) -> Path:
    """Return the cached checkpoint of `preset`, building it first if it is not there yet.

    Safe when several processes race: each builds into its own temp dir and renames it into
    place; the loser discards its copy.
    """
    target = preset_checkpoint_dir(cache_dir, preset)
    if (target / _COMPLETE_MARKER).exists():
        return target
    from cluster.model.checkpoint import write_checkpoint
    from cluster.model.config import GptOssConfig

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        log.info("building the %s checkpoint into %s", preset, target)
        write_checkpoint(GptOssConfig.from_preset(preset), staging, seed=0, layout="hf", mxfp4=True)
        (staging / _COMPLETE_MARKER).touch()
        if target.exists() and not (target / _COMPLETE_MARKER).exists():
            shutil.rmtree(target, ignore_errors=True)  # left over from a build that died half-way
        try:
            os.rename(staging, target)
        except OSError:
            if not (target / _COMPLETE_MARKER).exists():
                raise  # not a lost race: a real error
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target
