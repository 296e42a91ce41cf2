"""Deterministic random gpt-oss checkpoints in the real on-disk format (see layout.py).

Tests and the embedded default build their tiny models this way: weights never come from a hub.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors.torch import save_file

from cluster.model import mxfp4
from cluster.model.checkpoint.layout import HF_INDEX, LAYOUTS, CheckpointError, tensor_layout
from cluster.model.checkpoint.progress import progress_bar
from cluster.model.config import GptOssConfig

DEFAULT_SHARD_BYTES = 4 << 30


def _random_tensors(config: GptOssConfig, seed: int, mx: bool) -> Iterable[tuple[str, torch.Tensor]]:
    """(model param name, tensor) for every parameter, in a fixed order, drawn from one generator.

    Scales keep every sub-layer's output O(1) so activations stay sane and greedy decoding follows
    the context rather than collapsing. Floats are rounded to bf16 (the dtype real checkpoints use);
    expert matrices are drawn in float32 and, with `mx`, rounded to MXFP4.
    """
    c = config
    g = torch.Generator().manual_seed(seed)
    H, D, E, I, V = c.hidden_size, c.head_dim, c.num_local_experts, c.intermediate_size, c.vocab_size
    q, kv = c.num_attention_heads * D, c.num_key_value_heads * D

    def normal(*shape: int, std: float, mean: float = 0.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * std + mean).to(torch.bfloat16)

    yield "embedding.weight", normal(V, H, std=1.0)
    for n in range(c.num_hidden_layers):
        p = f"blocks.{n}."
        yield p + "attn_norm.scale", normal(H, std=0.1, mean=1.0)
        yield p + "attn.qkv.weight", normal(q + 2 * kv, H, std=H**-0.5)
        yield p + "attn.qkv.bias", normal(q + 2 * kv, std=0.1)
        yield p + "attn.out.weight", normal(H, q, std=q**-0.5)
        yield p + "attn.out.bias", normal(H, std=0.1)
        yield p + "attn.sinks", normal(c.num_attention_heads, std=1.0)
        yield p + "mlp_norm.scale", normal(H, std=0.1, mean=1.0)
        yield p + "mlp.router.weight", normal(E, H, std=H**-0.5)
        yield p + "mlp.router.bias", normal(E, std=0.1)
        for proj, (rows, cols) in (("gate_up", (2 * I, H)), ("down", (H, I))):
            w = torch.randn(E, rows, cols, generator=g) * cols**-0.5
            if mx:
                # one expert at a time: pack's temporaries are several times the float32 matrix
                packed = [mxfp4.pack(expert) for expert in w]
                yield p + f"mlp.{proj}_blocks", torch.stack([blocks for blocks, _ in packed])
                yield p + f"mlp.{proj}_scales", torch.stack([scales for _, scales in packed])
            else:
                yield p + f"mlp.{proj}_weight", w.to(torch.bfloat16)
            yield p + f"mlp.{proj}_bias", normal(E, rows, std=0.1)
    yield "norm.scale", normal(H, std=0.1, mean=1.0)
    yield "unembedding.weight", normal(V, H, std=H**-0.5)


def _write_shards(tensors: Iterable[tuple[str, torch.Tensor]], out_dir: Path, stem: str,
                  max_shard_bytes: int, bar, single_name: str | None = None) -> dict[str, str]:
    """Stream tensors into shards of at most `max_shard_bytes`; returns tensor name -> file name.

    Each shard is saved as soon as it is full, under a temporary name, and renamed at the end
    once the shard count (part of the HF file names) is known.
    """
    written: list[tuple[Path, list[str]]] = []
    shard: dict[str, torch.Tensor] = {}
    size = 0

    def flush() -> None:
        tmp = out_dir / f".{stem}-{len(written) + 1:05d}.safetensors.partial"
        save_file(shard, str(tmp), metadata={"format": "pt"})
        written.append((tmp, list(shard)))
        shard.clear()

    for name, t in tensors:
        nbytes = t.numel() * t.element_size()
        if shard and size + nbytes > max_shard_bytes:
            flush()
            size = 0
        shard[name] = t.contiguous()
        size += nbytes
        bar.update(nbytes)
    if shard or not written:
        flush()
    weight_map = {}
    for i, (tmp, names) in enumerate(written):
        fname = single_name if single_name and len(written) == 1 else f"{stem}-{i + 1:05d}-of-{len(written):05d}.safetensors"
        tmp.replace(out_dir / fname)
        weight_map.update({name: fname for name in names})
    return weight_map


def write_checkpoint(config: GptOssConfig, out_dir: str | os.PathLike, *, seed: int = 0, layout: str = "hf",
                     mxfp4: bool = True, progress: bool | None = None,
                     max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Write a deterministic random gpt-oss checkpoint for `config`; returns `out_dir`.

    layout "hf" writes the HF files into `out_dir`, "original" writes `out_dir/original/`, "both"
    writes both, holding the same weights. The same (config, seed, mxfp4) always gives the same
    tensors, whatever the layout. Expert matrices are MXFP4 unless `mxfp4=False` (then bf16).
    """
    return save_checkpoint(config, lambda: _random_tensors(config, seed, mxfp4), out_dir, layout=layout,
                           mxfp4=mxfp4, progress=progress, max_shard_bytes=max_shard_bytes)


def save_checkpoint(config: GptOssConfig, tensors: Callable[[], Iterable[tuple[str, torch.Tensor]]],
                    out_dir: str | os.PathLike, *, layout: str = "hf", mxfp4: bool = True,
                    progress: bool | None = None, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Write the weights `tensors()` yields, (model param name, tensor) in `_random_tensors`' order
    and dtypes, as a checkpoint of `config` in `layout`; returns `out_dir`. (The trained presets'
    rebuild, cluster/model/trained.py, writes through this too.)"""
    if layout not in LAYOUTS:
        raise CheckpointError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    total = config.checkpoint_bytes(mxfp4=mxfp4)
    targets = ["hf", "original"] if layout == "both" else [layout]
    for target in targets:
        entries = {e.param: e for e in tensor_layout(config, target, mxfp4)}
        # Tensors are drawn again for each layout (same seed, same values) and streamed to the shards,
        # so a large preset never holds more than a shard and a layer's experts in memory.
        disk = ((name, piece) for param, t in tensors()
                for name, piece in zip(entries[param].names, entries[param].split(t)))
        with progress_bar(total, progress, f"writing {target} checkpoint") as bar:
            if target == "hf":
                weight_map = _write_shards(disk, out, "model", max_shard_bytes, bar)
                index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
                (out / HF_INDEX).write_text(json.dumps(index, indent=2) + "\n")
                (out / "config.json").write_text(json.dumps(config.to_hf_dict(mxfp4=mxfp4), indent=2) + "\n")
            else:
                odir = out / "original"
                odir.mkdir(exist_ok=True)
                _write_shards(disk, odir, "model", max_shard_bytes, bar, single_name="model.safetensors")
                (odir / "config.json").write_text(json.dumps(config.to_original_dict(), indent=2) + "\n")
    return out
