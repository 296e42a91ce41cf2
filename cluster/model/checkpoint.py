"""gpt-oss checkpoints on disk: write deterministic random ones, load real or random ones.

Two layouts, both safetensors, both as OpenAI publishes them:

- "hf" (the repository root): `config.json` (with `quantization_config: {"quant_method": "mxfp4"}`
  when the experts are MXFP4), `model-0000i-of-0000n.safetensors` shards and
  `model.safetensors.index.json`. Names `model.layers.N.self_attn.q_proj.weight`, ...,
  `model.layers.N.mlp.experts.gate_up_proj_blocks`. Dense experts are stored transposed, as
  transformers holds them: gate_up_proj [E, H, 2I], down_proj [E, I, H].
- "original" (the `original/` folder): the reference implementation's `config.json` and
  `model.safetensors` with names `block.N.attn.qkv.weight`, `block.N.mlp.mlp1_weight.blocks`, ...

Every tensor has one entry in `_layout` that says where it lives in `GptOssModel` and how it is
split or transposed on the way to disk, so the writer and the loader cannot disagree.

`load_model` finds the layout, checks every tensor's presence, dtype and shape against the config
before reading it, and raises `CheckpointError` (naming the file and the tensor) on anything off.
MXFP4 experts stay packed in memory unless `dequantize=True`.
"""

from __future__ import annotations

import json
import math
import os
import struct
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import safe_open, save_file

from cluster.model import mxfp4
from cluster.model.config import GptOssConfig
from cluster.model.layers import RotaryEmbedding
from cluster.model.transformer import GptOssModel

LAYOUTS = ("hf", "original", "both")
HF_INDEX = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 4 << 30
PROGRESS_MIN_BYTES = 256 << 20  # an automatic progress bar appears for loads at least this big

_FLOAT_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
                "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


class CheckpointError(Exception):
    """A checkpoint cannot be read or written as asked; the message names the file and tensor."""


# ---- the name map -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    """One model tensor (`param`) and the checkpoint tensors (`names`, `shapes`) it is made of.

    `join` builds the model tensor from the checkpoint ones; `split` is its inverse, for writing.
    """

    param: str
    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    packed: bool = False  # uint8 MXFP4 blocks or scales, not floats
    join: Callable[[list[torch.Tensor]], torch.Tensor] = lambda ts: ts[0]
    split: Callable[[torch.Tensor], list[torch.Tensor]] = lambda t: [t]


def _transposed(ts: list[torch.Tensor]) -> torch.Tensor:
    return ts[0].transpose(-1, -2)


def _transpose_out(t: torch.Tensor) -> list[torch.Tensor]:
    return [t.transpose(-1, -2).contiguous()]


def _layout(config: GptOssConfig, layout: str, mx: bool) -> list[_Entry]:
    """Every tensor of a checkpoint in `layout` ("hf" or "original"), with or without MXFP4 experts."""
    c = config
    H, D, E, I, V = c.hidden_size, c.head_dim, c.num_local_experts, c.intermediate_size, c.vocab_size
    q, kv = c.num_attention_heads * D, c.num_key_value_heads * D
    hf = layout == "hf"
    entries = [
        _Entry("embedding.weight", ("model.embed_tokens.weight" if hf else "embedding.weight",), ((V, H),)),
        _Entry("unembedding.weight", ("lm_head.weight" if hf else "unembedding.weight",), ((V, H),)),
        _Entry("norm.scale", ("model.norm.weight" if hf else "norm.scale",), ((H,),)),
    ]
    for n in range(c.num_hidden_layers):
        p = f"blocks.{n}."
        if hf:
            a, m = f"model.layers.{n}.self_attn.", f"model.layers.{n}.mlp."
            entries += [
                _Entry(p + "attn_norm.scale", (f"model.layers.{n}.input_layernorm.weight",), ((H,),)),
                _Entry(p + "mlp_norm.scale", (f"model.layers.{n}.post_attention_layernorm.weight",), ((H,),)),
                *(
                    _Entry(p + f"attn.qkv.{kind}", tuple(a + f"{x}_proj.{kind}" for x in "qkv"),
                           tuple((rows, H) if kind == "weight" else (rows,) for rows in (q, kv, kv)),
                           join=lambda ts: torch.cat(ts, dim=0),
                           split=lambda t: list(t.split((q, kv, kv), dim=0)))
                    for kind in ("weight", "bias")
                ),
                _Entry(p + "attn.out.weight", (a + "o_proj.weight",), ((H, q),)),
                _Entry(p + "attn.out.bias", (a + "o_proj.bias",), ((H,),)),
                _Entry(p + "attn.sinks", (a + "sinks",), ((c.num_attention_heads,),)),
                _Entry(p + "mlp.router.weight", (m + "router.weight",), ((E, H),)),
                _Entry(p + "mlp.router.bias", (m + "router.bias",), ((E,),)),
                _Entry(p + "mlp.gate_up_bias", (m + "experts.gate_up_proj_bias",), ((E, 2 * I),)),
                _Entry(p + "mlp.down_bias", (m + "experts.down_proj_bias",), ((E, H),)),
            ]
            names = {"gate_up": m + "experts.gate_up_proj", "down": m + "experts.down_proj"}
            sep = "_"
        else:
            a, m = f"block.{n}.attn.", f"block.{n}.mlp."
            entries += [
                _Entry(p + "attn_norm.scale", (a + "norm.scale",), ((H,),)),
                _Entry(p + "mlp_norm.scale", (m + "norm.scale",), ((H,),)),
                _Entry(p + "attn.qkv.weight", (a + "qkv.weight",), ((q + 2 * kv, H),)),
                _Entry(p + "attn.qkv.bias", (a + "qkv.bias",), ((q + 2 * kv,),)),
                _Entry(p + "attn.out.weight", (a + "out.weight",), ((H, q),)),
                _Entry(p + "attn.out.bias", (a + "out.bias",), ((H,),)),
                _Entry(p + "attn.sinks", (a + "sinks",), ((c.num_attention_heads,),)),
                _Entry(p + "mlp.router.weight", (m + "gate.weight",), ((E, H),)),
                _Entry(p + "mlp.router.bias", (m + "gate.bias",), ((E,),)),
                _Entry(p + "mlp.gate_up_bias", (m + "mlp1_bias",), ((E, 2 * I),)),
                _Entry(p + "mlp.down_bias", (m + "mlp2_bias",), ((E, H),)),
            ]
            names = {"gate_up": m + "mlp1_weight", "down": m + "mlp2_weight"}
            sep = "."
        for proj, (rows, cols) in (("gate_up", (2 * I, H)), ("down", (H, I))):
            if mx:
                entries += [
                    _Entry(p + f"mlp.{proj}_blocks", (names[proj] + sep + "blocks",), ((E, rows, cols // 32, 16),),
                           packed=True),
                    _Entry(p + f"mlp.{proj}_scales", (names[proj] + sep + "scales",), ((E, rows, cols // 32),),
                           packed=True),
                ]
            elif hf:  # transformers holds dense experts as [E, in, out]
                entries.append(_Entry(p + f"mlp.{proj}_weight", (names[proj],), ((E, cols, rows),),
                                      join=_transposed, split=_transpose_out))
            else:
                entries.append(_Entry(p + f"mlp.{proj}_weight", (names[proj],), ((E, rows, cols),)))
    return entries


# ---- writing ------------------------------------------------------------------------------------


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
                blocks, scales = mxfp4.pack(w)
                yield p + f"mlp.{proj}_blocks", blocks
                yield p + f"mlp.{proj}_scales", scales
            else:
                yield p + f"mlp.{proj}_weight", w.to(torch.bfloat16)
            yield p + f"mlp.{proj}_bias", normal(E, rows, std=0.1)
    yield "norm.scale", normal(H, std=0.1, mean=1.0)
    yield "unembedding.weight", normal(V, H, std=H**-0.5)


def _progress_bar(total: int, progress: bool | None, desc: str):
    from tqdm import tqdm

    if progress is None:
        progress = total >= PROGRESS_MIN_BYTES and sys.stderr.isatty()
    return tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=not progress, leave=False)


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
    and dtypes, as a checkpoint of `config` in `layout`; returns `out_dir`."""
    if layout not in LAYOUTS:
        raise CheckpointError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    total = config.checkpoint_bytes(mxfp4=mxfp4)
    targets = ["hf", "original"] if layout == "both" else [layout]
    for target in targets:
        entries = {e.param: e for e in _layout(config, target, mxfp4)}
        # Tensors are drawn again for each layout (same seed, same values) and streamed to the shards,
        # so a large preset never holds more than a shard and a layer's experts in memory.
        disk = ((name, piece) for param, t in tensors()
                for name, piece in zip(entries[param].names, entries[param].split(t)))
        with _progress_bar(total, progress, f"writing {target} checkpoint") as bar:
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


# ---- reading ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _TensorInfo:
    file: Path
    dtype: str
    shape: tuple[int, ...]


def _read_header(path: Path) -> dict[str, _TensorInfo]:
    """Parse and validate a safetensors header without reading tensor data."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > size - 8:
                raise CheckpointError(f"{path}: truncated or corrupt safetensors file (header of {header_len} "
                                      f"bytes, file of {size})")
            header = json.loads(f.read(header_len))
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read ({err})") from err
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: corrupt safetensors header ({err})") from err
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    data_size = size - 8 - header_len
    infos = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = (int(x) for x in meta["data_offsets"])
            dtype, shape = meta["dtype"], tuple(int(x) for x in meta["shape"])
            nbytes = math.prod(shape) * _DTYPE_BYTES[dtype]
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"{path}: corrupt safetensors header entry for tensor {name!r}") from err
        if not 0 <= begin <= end or end - begin != nbytes:
            raise CheckpointError(f"{path}: corrupt safetensors header: tensor {name!r} spans bytes {begin}..{end} "
                                  f"but {dtype} {list(shape)} needs {nbytes}")
        if end > data_size:
            raise CheckpointError(f"{path}: truncated safetensors file: tensor {name!r} ends at byte {end} of the "
                                  f"data section, which holds only {data_size} bytes")
        infos[name] = _TensorInfo(path, dtype, shape)
    return infos


class _CheckpointFiles:
    """The safetensors files of one layout: tensor name -> (file, dtype, shape), from headers only."""

    def __init__(self, directory: Path, index: Path | None):
        self.directory = directory
        self.tensors: dict[str, _TensorInfo] = {}
        if index is not None:
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as err:
                raise CheckpointError(f"{index}: unreadable index ({err})") from err
            files = sorted(set(weight_map.values()))
            for fname in files:
                if not (directory / fname).is_file():
                    missing = sorted(k for k, v in weight_map.items() if v == fname)
                    raise CheckpointError(f"{directory / fname}: file named by {index.name} is missing "
                                          f"(it should hold {missing[0]!r} and {len(missing) - 1} more tensors)")
        else:
            files = sorted(p.name for p in directory.glob("*.safetensors"))
            weight_map = None
            if not files:
                raise CheckpointError(f"{directory}: no .safetensors files")
        for fname in files:
            try:
                header = _read_header(directory / fname)
            except CheckpointError as err:
                if weight_map is None:
                    raise
                held = sorted(k for k, v in weight_map.items() if v == fname)
                raise CheckpointError(f"{err}; per {index.name} it holds tensor {held[0]!r}"
                                      + (f" and {len(held) - 1} more" if len(held) > 1 else "")) from err
            for name, info in header.items():
                if name in self.tensors:
                    raise CheckpointError(f"{info.file}: tensor {name!r} also appears in {self.tensors[name].file}")
                self.tensors[name] = info
        if weight_map is not None:
            for name, fname in weight_map.items():
                if name not in self.tensors:
                    raise CheckpointError(f"{directory / fname}: missing tensor {name!r} (listed in {index.name})")
        self.index = index
        self._open: dict[Path, object] = {}

    def check(self, name: str, shape: tuple[int, ...], packed: bool) -> _TensorInfo:
        info = self.tensors.get(name)
        if info is None:
            where = self.index if self.index is not None else self.directory
            raise CheckpointError(f"{where}: missing tensor {name!r} (no .safetensors file holds it)")
        if packed and info.dtype != "U8":
            raise CheckpointError(f"{info.file}: tensor {name!r} has dtype {info.dtype}, expected U8 (MXFP4)")
        if not packed and info.dtype not in _FLOAT_DTYPES:
            raise CheckpointError(f"{info.file}: tensor {name!r} has dtype {info.dtype}, expected one of "
                                  f"{sorted(_FLOAT_DTYPES)}")
        if info.shape != tuple(shape):
            raise CheckpointError(f"{info.file}: tensor {name!r} has shape {list(info.shape)}, but config.json "
                                  f"implies {list(shape)}")
        return info

    def read(self, name: str, device: str) -> torch.Tensor:
        info = self.tensors[name]
        try:
            handle = self._open.get(info.file)
            if handle is None:
                handle = self._open[info.file] = safe_open(str(info.file), framework="pt", device=device)
            return handle.get_tensor(name)
        except Exception as err:  # safetensors raises its own error types; name the file and tensor
            raise CheckpointError(f"{info.file}: cannot read tensor {name!r} ({err})") from err

    def close(self) -> None:
        self._open.clear()


def _find_layout(path: Path) -> tuple[str, Path, GptOssConfig, bool | None]:
    """(layout, directory, config, mxfp4-by-config or None if the config does not say)."""
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    candidates = [path, path / "original"]
    for directory in candidates:
        cfg = directory / "config.json"
        if not cfg.is_file():
            continue
        try:
            data = json.loads(cfg.read_text())
        except (OSError, ValueError) as err:
            raise CheckpointError(f"{cfg}: unreadable config ({err})") from err
        original = "model_type" not in data and "experts_per_token" in data and "num_local_experts" not in data
        try:
            config = GptOssConfig.from_original_dict(data) if original else GptOssConfig.from_hf_dict(data)
        except (TypeError, ValueError) as err:
            raise CheckpointError(f"{cfg}: not a gpt-oss config ({err})") from err
        if original:
            return "original", directory, config, None
        if data.get("model_type", "gpt_oss") != "gpt_oss":
            raise CheckpointError(f"{cfg}: model_type is {data['model_type']!r}, not 'gpt_oss'")
        quant = data.get("quantization_config")
        if quant and quant.get("quant_method") != "mxfp4":
            raise CheckpointError(f"{cfg}: unsupported quant_method {quant.get('quant_method')!r}")
        return "hf", directory, config, bool(quant)
    raise CheckpointError(f"{path}: no config.json here or in {path / 'original'}")


def describe_checkpoint(path: str | os.PathLike) -> dict:
    """Layout, config and which experts are MXFP4, from config.json and safetensors headers only."""
    layout, directory, config, _ = _find_layout(Path(path))
    index = directory / HF_INDEX
    files = _CheckpointFiles(directory, index if index.is_file() else None)
    quantized = sorted(n for n in files.tensors if n.endswith(("_blocks", ".blocks")))
    layers = sorted({int(n.split(".")[2 if layout == "hf" else 1]) for n in quantized})
    return {
        "layout": layout,
        "directory": str(directory),
        "config": config,
        "files": sorted({str(i.file.name) for i in files.tensors.values()}),
        "file_bytes": sum(f.stat().st_size for f in {i.file for i in files.tensors.values()}),
        "mxfp4_tensors": quantized,
        "mxfp4_layers": layers,
    }


def load_model(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               dequantize: bool = False, progress: bool | None = None) -> GptOssModel:
    """Load a gpt-oss checkpoint (HF or original layout, found automatically) into a `GptOssModel`.

    `path` is an HF checkpoint directory (its `original/` folder is used only when there is no
    HF config), or an `original/` folder. MXFP4 experts stay packed (uint8) and are unpacked per
    chosen expert in the forward pass, unless `dequantize` unpacks them all now into `dtype`.
    """
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating point dtype, got {dtype}")
    layout, directory, config, mx_by_config = _find_layout(Path(path))
    index = directory / HF_INDEX
    files = _CheckpointFiles(directory, index if layout == "hf" and index.is_file() else None)
    mx = any(n.endswith(("_blocks", ".blocks")) for n in files.tensors)
    if mx_by_config is not None and mx_by_config != mx:
        said = "MXFP4 (quantization_config)" if mx_by_config else "unquantized (no quantization_config)"
        found = "MXFP4 *_blocks tensors" if mx else "no *_blocks tensors"
        raise CheckpointError(f"{directory / 'config.json'}: config mismatch: it declares the experts {said}, "
                              f"but the safetensors files hold {found}")
    entries = _layout(config, layout, mx)
    expected = {name for e in entries for name in e.names}
    extra = sorted(set(files.tensors) - expected)
    if extra:
        raise CheckpointError(f"{files.tensors[extra[0]].file}: config mismatch: tensor {extra[0]!r} (and "
                              f"{len(extra) - 1} more) is not part of the model config.json describes")
    for e in entries:
        for name, shape in zip(e.names, e.shapes):
            files.check(name, shape, e.packed)

    device = torch.device(device)
    with torch.device("meta"):
        model = GptOssModel(config, packed_experts=mx)
    total = sum(math.prod(files.tensors[n].shape) * _DTYPE_BYTES[files.tensors[n].dtype]
                for e in entries for n in e.names)
    state = {}
    with _progress_bar(total, progress, f"loading {directory.name}") as bar:
        for e in entries:
            pieces = [files.read(name, "cpu") for name in e.names]
            t = e.join(pieces)
            if e.packed:
                target = torch.uint8
            elif e.param.endswith("norm.scale"):
                target = torch.float32  # norms compute in float32; transformers keeps them float32 too
            else:
                target = dtype
            state[e.param] = t.to(device=device, dtype=target).contiguous()
            bar.update(sum(p.numel() * p.element_size() for p in pieces))
    files.close()
    model.load_state_dict(state, strict=True, assign=True)
    # Buffers that are not in checkpoints (RoPE tables) were built on meta; build them for real.
    model.rope = RotaryEmbedding(config).to(device)
    if dequantize:
        model.dequantize_experts_()
    model.requires_grad_(False)
    return model.eval()

