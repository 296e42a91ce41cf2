"""Trained presets: compact weight artifacts shipped in the package, rebuilt into full checkpoints.

An artifact (`assets/<preset>.safetensors`, written by cluster/tiny's training) holds only what
training made: the embedding and unembedding rows of the vocabulary ids it used (`vocab_ids`),
every other weight in bf16, and the experts as MXFP4 blocks and scales. Every other vocabulary
row is zero. `build_trained_checkpoint` turns it into the full HF-layout checkpoint the engines
load (config.json, safetensors, MXFP4 experts), deterministically: the artifact is checked
against its sha256 file (`<artifact>.sha256`, `sha256sum -c` format) first, and each rebuilt file
against the sha256 the artifact recorded when it was made.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
import safetensors.torch

from cluster.model.checkpoint import CheckpointError, save_checkpoint
from cluster.model.config import GptOssConfig
from cluster.model.transformer import GptOssModel

ASSETS = Path(__file__).resolve().parent / "assets"
ARTIFACTS = {"gpt-oss-tiny": ASSETS / "gpt-oss-tiny.safetensors"}
_ROWS = ("embedding.weight", "unembedding.weight")


def is_trained(preset: str) -> bool:
    return preset in ARTIFACTS


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def artifact_sha256(preset: str) -> str:
    """The sha256 recorded beside the artifact (what the rebuilt cache is keyed by)."""
    return _sidecar_sha256(ARTIFACTS[preset])


def _sidecar_sha256(artifact: Path) -> str:
    sidecar = Path(f"{artifact}.sha256")
    try:
        return sidecar.read_text().split()[0]
    except (OSError, IndexError) as err:
        raise CheckpointError(f"{sidecar}: missing or empty checksum file of the artifact {artifact.name}") from err


def _packed_order(config: GptOssConfig) -> list[str]:
    """Model parameter names in the order a checkpoint is written (as the random writer does)."""
    with torch.device("meta"):
        model = GptOssModel(config, packed_experts=True)
    names = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers() if "mlp." in n]
    order = {n: i for i, n in enumerate(names)}
    first, last = ["embedding.weight"], ["norm.scale", "unembedding.weight"]
    blocks = sorted((n for n in names if n.startswith("blocks.")),
                    key=lambda n: (int(n.split(".")[1]), order[n]))
    return first + blocks + last


def _model_tensors(model: GptOssModel, vocab_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """What an artifact stores, from a trained model with dense experts holding MXFP4-exact values."""
    from cluster.model import mxfp4

    tensors: dict[str, torch.Tensor] = {"vocab_ids": vocab_ids.to(torch.int64).contiguous()}
    for name, p in model.named_parameters():
        p = p.detach()
        if name.endswith(("gate_up_weight", "down_weight")):
            stem = name.removesuffix("_weight")
            blocks, scales = mxfp4.pack(p)
            if not torch.equal(mxfp4.unpack(blocks, scales, p.dtype), p):
                raise ValueError(f"{name}: experts must be quantized to MXFP4 before they are stored")
            tensors[stem + "_blocks"], tensors[stem + "_scales"] = blocks, scales
        else:
            tensors[name] = p.to(torch.bfloat16).contiguous()
    return tensors


def _checkpoint_tensors(config: GptOssConfig, tensors: dict[str, torch.Tensor], mxfp4: bool = True):
    """(param, tensor) for the full checkpoint: used rows scattered into zero V x H tables; with
    `mxfp4` False the experts as the bf16 values their MXFP4 blocks hold (exactly)."""
    from cluster.model import mxfp4 as fp4

    ids = tensors["vocab_ids"]
    for name in _packed_order(config):
        t = tensors[name]
        if not mxfp4 and name.endswith("_scales"):
            continue
        if not mxfp4 and name.endswith("_blocks"):
            stem = name.removesuffix("_blocks")
            name, t = stem + "_weight", fp4.unpack(t, tensors[stem + "_scales"], torch.bfloat16)
        if name in _ROWS:
            full = torch.zeros(config.vocab_size, config.hidden_size, dtype=torch.bfloat16)
            full[ids] = t
            t = full
        yield name, t


def _write(config: GptOssConfig, tensors: dict[str, torch.Tensor], out_dir: Path, mxfp4: bool = True
           ) -> dict[str, str]:
    save_checkpoint(config, lambda: _checkpoint_tensors(config, tensors, mxfp4), out_dir, layout="hf",
                    mxfp4=mxfp4, progress=False)
    return {p.name: file_sha256(p) for p in sorted(out_dir.iterdir()) if p.is_file()}


def _save_canonical(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """safetensors writes its metadata in hash order, which changes from one process to the next; the
    header is rewritten with sorted keys, so the same weights always give the same bytes."""
    raw = safetensors.torch.save(tensors, metadata=metadata)
    length = int.from_bytes(raw[:8], "little")
    header = json.dumps(json.loads(raw[8:8 + length]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # the format keeps the data 8-byte aligned
    path.write_bytes(len(header).to_bytes(8, "little") + header + raw[8 + length:])


def write_artifact(model: GptOssModel, vocab_ids: torch.Tensor, config: GptOssConfig, path: Path, *,
                   training: dict) -> dict:
    """Save a trained model (its vocabulary = the rows `vocab_ids` of `config`'s) as an artifact,
    with the sha256 of the checkpoint it rebuilds into, and its own sha256 file beside it."""
    tensors = _model_tensors(model, vocab_ids)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = _write(config, tensors, Path(tmp))
    metadata = {"config": json.dumps(config.to_dict()), "checkpoint_sha256": json.dumps(checkpoint),
                "training": json.dumps(training)}
    path.parent.mkdir(parents=True, exist_ok=True)
    _save_canonical(tensors, path, metadata)
    sha = file_sha256(path)
    Path(f"{path}.sha256").write_text(f"{sha}  {path.name}\n")
    return {"artifact": str(path), "artifact_bytes": path.stat().st_size, "artifact_sha256": sha}


def read_artifact(path: Path, expected_sha256: str) -> tuple[GptOssConfig, dict[str, torch.Tensor], dict]:
    if not path.is_file():
        raise CheckpointError(f"{path}: the trained weights are missing from the package")
    actual = file_sha256(path)
    if actual != expected_sha256:
        raise CheckpointError(f"{path}: sha256 is {actual}, expected {expected_sha256} (corrupt, or a git-lfs "
                              "pointer instead of the file)")
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    config = GptOssConfig(**json.loads(metadata["config"]))
    return config, tensors, {k: json.loads(v) for k, v in metadata.items()}


def build_trained_checkpoint(preset: str, out_dir: str | os.PathLike, *, artifact: Path | None = None,
                             mxfp4: bool = True) -> Path:
    """Rebuild the full HF checkpoint of a trained preset (or of the artifact file `artifact`)
    into `out_dir`, checksums checked. `mxfp4` False writes the same weights with bf16 experts,
    for engines without MXFP4 kernels on this machine (vLLM's CPU build); only the artifact's
    checksum is checked then, since the recorded ones are of the MXFP4 files."""
    out = Path(out_dir)
    path = artifact or ARTIFACTS[preset]
    config, tensors, metadata = read_artifact(path, _sidecar_sha256(path))
    written = _write(config, tensors, out, mxfp4)
    if not mxfp4:
        return out
    expected = metadata["checkpoint_sha256"]
    if written != expected:
        bad = sorted(name for name in set(written) | set(expected) if written.get(name) != expected.get(name))
        raise CheckpointError(f"{out / bad[0]}: the rebuilt {preset} checkpoint differs from the one its artifact "
                              f"recorded (sha256 {written.get(bad[0])} != {expected.get(bad[0])})")
    return out
