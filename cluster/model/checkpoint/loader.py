"""Load a gpt-oss checkpoint (either layout, see layout.py) into `GptOssModel`, or describe one.

`load_model` finds the layout, checks every tensor's presence, dtype and shape against the config
(from the safetensors headers, read with safetensors' own `safe_open`) before reading any data, and
raises `CheckpointError` (naming the file and the tensor) on anything off. MXFP4 experts stay
packed in memory unless `dequantize=True`.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from cluster.model.checkpoint import hugepages as huge_pages
from cluster.model.checkpoint.layout import HF_INDEX, CheckpointError, is_mxfp4_tensor, tensor_layout
from cluster.model.checkpoint.progress import progress_bar
from cluster.model.config import GptOssConfig
from cluster.model.layers import RotaryEmbedding
from cluster.model.transformer import GptOssModel

_FLOAT_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
                "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
# safetensors' own words for a file that ends too early (the rest of its header errors mean corrupt)
_TRUNCATED = ("incomplete metadata", "header too small", "invalid header length")


@dataclass(frozen=True)
class _TensorInfo:
    file: Path
    dtype: str
    shape: tuple[int, ...]


def _read_header(path: Path) -> dict[str, _TensorInfo]:
    """Every tensor's dtype and shape from a safetensors header, without reading tensor data.

    safetensors validates the header on open (offsets inside the file, sizes matching shapes).
    """
    try:
        with safe_open(str(path), framework="pt") as f:
            return {name: _TensorInfo(path, f.get_slice(name).get_dtype(), tuple(f.get_slice(name).get_shape()))
                    for name in f.keys()}
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read ({err})") from err
    except SafetensorError as err:
        kind = "truncated" if any(words in str(err) for words in _TRUNCATED) else "corrupt"
        raise CheckpointError(f"{path}: {kind} safetensors file ({err})") from err


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
    quantized = sorted(n for n in files.tensors if is_mxfp4_tensor(n))
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


def _checked(path: Path) -> tuple[Path, GptOssConfig, _CheckpointFiles, list, bool]:
    """(directory, config, files, entries, mxfp4): the layout found and every tensor's presence, dtype
    and shape checked against config.json, from the safetensors headers only."""
    layout, directory, config, mx_by_config = _find_layout(path)
    index = directory / HF_INDEX
    files = _CheckpointFiles(directory, index if layout == "hf" and index.is_file() else None)
    mx = any(is_mxfp4_tensor(n) for n in files.tensors)
    if mx_by_config is not None and mx_by_config != mx:
        said = "MXFP4 (quantization_config)" if mx_by_config else "unquantized (no quantization_config)"
        found = "MXFP4 *_blocks tensors" if mx else "no *_blocks tensors"
        raise CheckpointError(f"{directory / 'config.json'}: config mismatch: it declares the experts {said}, "
                              f"but the safetensors files hold {found}")
    entries = tensor_layout(config, layout, mx)
    expected = {name for e in entries for name in e.names}
    extra = sorted(set(files.tensors) - expected)
    if extra:
        raise CheckpointError(f"{files.tensors[extra[0]].file}: config mismatch: tensor {extra[0]!r} (and "
                              f"{len(extra) - 1} more) is not part of the model config.json describes")
    for e in entries:
        for name, shape in zip(e.names, e.shapes):
            files.check(name, shape, e.packed)
    return directory, config, files, entries, mx


def verify_checkpoint(path: str | os.PathLike) -> GptOssConfig:
    """Check a checkpoint as `load_model` does before reading any tensor (config.json, then every
    tensor's presence, dtype and shape from the safetensors headers): quick even for gpt-oss-120b.
    Raises CheckpointError naming the file and tensor."""
    _, config, files, _, _ = _checked(Path(path))
    files.close()
    return config


def load_model(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               dequantize: bool = False, progress: bool | None = None, hugepages: bool = False) -> GptOssModel:
    """Load a gpt-oss checkpoint (HF or original layout, found automatically) into a `GptOssModel`.

    `path` is an HF checkpoint directory (its `original/` folder is used only when there is no
    HF config), or an `original/` folder. MXFP4 experts stay packed (uint8) and are unpacked per
    chosen expert in the forward pass, unless `dequantize` unpacks them all now into `dtype`.
    Weights kept as stored are views of the checkpoint's mapped pages; with `hugepages` (CPU, where
    the kernel offers transparent huge pages) those of 2 MB and more are copied into 2 MB pages
    instead, one at a time, their mapped pages released as they are copied (hugepages.py).
    """
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating point dtype, got {dtype}")
    directory, config, files, entries, mx = _checked(Path(path))

    device = torch.device(device)
    hugepages = hugepages and device.type == "cpu" and huge_pages.available()
    with torch.device("meta"):
        model = GptOssModel(config, packed_experts=mx)
    total = sum(math.prod(files.tensors[n].shape) * _DTYPE_BYTES[files.tensors[n].dtype]
                for e in entries for n in e.names)
    state = {}
    with progress_bar(total, progress, f"loading {directory.name}") as bar:
        for e in entries:
            pieces = [files.read(name, "cpu") for name in e.names]
            t = e.join(pieces)
            if e.packed:
                target = torch.uint8
            elif e.param.endswith("norm.scale"):
                target = torch.float32  # norms compute in float32; transformers keeps them float32 too
            else:
                target = dtype
            t = t.to(device=device, dtype=target).contiguous()
            if hugepages and t.numel() * t.element_size() >= huge_pages.MIN_BYTES:
                mapped = [p for p in pieces if p.data_ptr() == t.data_ptr()]  # t is the file's bytes
                t = huge_pages.copy_to_hugepages(t)
                for p in mapped:
                    huge_pages.release_mapped(p)
            state[e.param] = t
            bar.update(sum(p.numel() * p.element_size() for p in pieces))
    files.close()
    model.load_state_dict(state, strict=True, assign=True)
    # Buffers that are not in checkpoints (RoPE tables) were built on meta; build them for real.
    model.rope = RotaryEmbedding(config).to(device)
    if dequantize:
        model.dequantize_experts_()
    model.requires_grad_(False)
    return model.eval()

