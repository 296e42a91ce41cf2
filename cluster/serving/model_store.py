"""Where a replica's checkpoint comes from: a directory given in the config, or a preset
checkpoint built once into the cache directory and reused after: a trained preset (gpt-oss-tiny)
rebuilt from its packaged artifact, checksums checked (cluster/model/trained.py), any other
preset with deterministic random weights (seed 0)."""

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


def preset_model_name(preset: str) -> str:
    """What GetModelInfo calls a preset: "gpt-oss-tiny" as is, a shape name like "tiny" as "gpt-oss-tiny"."""
    return preset if preset.startswith("gpt-oss") else f"gpt-oss-{preset}"


def preset_checkpoint_dir(cache_dir: Path, preset: str) -> Path:
    from cluster.model.trained import artifact_sha256, is_trained

    # A trained preset's cache is keyed by its artifact, so new weights never reuse an old build.
    weights = f"trained-{artifact_sha256(preset)[:16]}" if is_trained(preset) else "seed0"
    return cache_dir / "checkpoints" / f"{preset}-{weights}-v{PRESET_FORMAT_VERSION}"


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
    from cluster.model.trained import build_trained_checkpoint, is_trained

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        log.info("building the %s checkpoint into %s", preset, target)
        if is_trained(preset):
            build_trained_checkpoint(preset, staging)
        else:
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
