"""Bad checkpoints fail with CheckpointError naming the file and the tensor, never a silent wrong load."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from cluster.model.checkpoint import HF_INDEX, CheckpointError, load_model, write_checkpoint
from cluster.model.config import GptOssConfig

BLOCKS = "model.layers.1.mlp.experts.gate_up_proj_blocks"
QPROJ = "model.layers.0.self_attn.q_proj.weight"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    out = tmp_path_factory.mktemp("pristine")
    write_checkpoint(GptOssConfig.from_preset("tiny-small-vocab"), out, layout="both", max_shard_bytes=200_000)
    return out


@pytest.fixture
def ckpt(pristine, tmp_path):
    """A fresh copy to break."""
    dst = tmp_path / "ckpt"
    shutil.copytree(pristine, dst)
    return dst


def _file_of(path: Path, name: str) -> Path:
    return path / json.loads((path / HF_INDEX).read_text())["weight_map"][name]


def _rewrite(file: Path, change) -> None:
    tensors = load_file(str(file))
    change(tensors)
    save_file(tensors, str(file), metadata={"format": "pt"})


def test_the_pristine_copy_loads(ckpt):
    assert load_model(ckpt).config.num_hidden_layers == 3
    assert len(list(ckpt.glob("model-*.safetensors"))) > 1


def test_truncated_file(ckpt):
    f = _file_of(ckpt, BLOCKS)
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated") as err:
        load_model(ckpt)
    assert f.name in str(err.value) and "model.layers." in str(err.value)


def test_corrupt_header(ckpt):
    f = _file_of(ckpt, BLOCKS)
    data = bytearray(f.read_bytes())
    data[8:20] = b"\xff" * 12
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt") as err:
        load_model(ckpt)
    assert f.name in str(err.value) and "model.layers." in str(err.value)


def test_file_cut_inside_header(ckpt):
    f = _file_of(ckpt, QPROJ)
    f.write_bytes(f.read_bytes()[:50])
    with pytest.raises(CheckpointError) as err:
        load_model(ckpt)
    assert f.name in str(err.value)


def test_missing_tensor_listed_in_index(ckpt):
    f = _file_of(ckpt, QPROJ)
    _rewrite(f, lambda t: t.pop(QPROJ))
    with pytest.raises(CheckpointError, match="missing tensor") as err:
        load_model(ckpt)
    assert QPROJ in str(err.value) and f.name in str(err.value)


def test_missing_tensor_not_in_index(ckpt):
    f = _file_of(ckpt, QPROJ)
    _rewrite(f, lambda t: t.pop(QPROJ))
    index = json.loads((ckpt / HF_INDEX).read_text())
    del index["weight_map"][QPROJ]
    (ckpt / HF_INDEX).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="missing tensor") as err:
        load_model(ckpt)
    assert QPROJ in str(err.value) and HF_INDEX in str(err.value)


def test_missing_shard(ckpt):
    f = _file_of(ckpt, QPROJ)
    f.unlink()
    with pytest.raises(CheckpointError, match="missing") as err:
        load_model(ckpt)
    assert f.name in str(err.value)


def test_wrong_shape(ckpt):
    f = _file_of(ckpt, QPROJ)
    _rewrite(f, lambda t: t.__setitem__(QPROJ, t[QPROJ][:-16].contiguous()))
    with pytest.raises(CheckpointError, match="shape") as err:
        load_model(ckpt)
    assert QPROJ in str(err.value) and f.name in str(err.value)


@pytest.mark.parametrize("name,dtype", [(BLOCKS, torch.float32), (QPROJ, torch.int32)])
def test_wrong_dtype(ckpt, name, dtype):
    f = _file_of(ckpt, name)
    _rewrite(f, lambda t: t.__setitem__(name, t[name].to(dtype)))
    with pytest.raises(CheckpointError, match="dtype") as err:
        load_model(ckpt)
    assert name in str(err.value) and f.name in str(err.value)


def test_config_shape_mismatch(ckpt):
    config = json.loads((ckpt / "config.json").read_text())
    config["intermediate_size"] = 64
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="config.json implies") as err:
        load_model(ckpt)
    assert "mlp.experts" in str(err.value) and ".safetensors" in str(err.value)


def test_config_with_fewer_layers_than_the_files(ckpt):
    config = json.loads((ckpt / "config.json").read_text())
    config["num_hidden_layers"] = 2
    config.pop("layer_types")
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="config mismatch") as err:
        load_model(ckpt)
    assert "model.layers.2." in str(err.value)


def test_config_claims_unquantized_but_files_are_mxfp4(ckpt):
    config = json.loads((ckpt / "config.json").read_text())
    del config["quantization_config"]
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="config mismatch"):
        load_model(ckpt)


def test_original_layout_errors_name_file_and_tensor(ckpt):
    name = "block.2.mlp.mlp2_weight.scales"
    f = next(f for f in (ckpt / "original").glob("*.safetensors") if name in load_file(str(f)))
    _rewrite(f, lambda t: t.pop("block.2.mlp.mlp2_weight.scales"))
    with pytest.raises(CheckpointError, match="missing tensor") as err:
        load_model(ckpt / "original")
    assert "block.2.mlp.mlp2_weight.scales" in str(err.value) and "original" in str(err.value)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        load_model(tmp_path)
    with pytest.raises(CheckpointError, match="no such"):
        load_model(tmp_path / "nope")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json"):
        load_model(tmp_path)
