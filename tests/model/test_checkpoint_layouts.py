"""The HF and original layouts hold the same weights; loading keeps MXFP4 packed; writing is deterministic."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from cluster.model.checkpoint import load_model, write_checkpoint
from cluster.model.config import GptOssConfig

TINY_PRESETS = ("tiny", "tiny-small-vocab")  # the two shapes conftest.checkpoint_dir writes


def _disk(directory):
    tensors = {}
    for f in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    return tensors


@pytest.mark.parametrize("preset", TINY_PRESETS)
@pytest.mark.parametrize("mxfp4", [True, False])
def test_both_layouts_load_to_identical_tensors(checkpoint_dir, preset, mxfp4):
    path = checkpoint_dir(preset, mxfp4)
    hf, orig = load_model(path), load_model(path / "original")
    hf_state, orig_state = hf.state_dict(), orig.state_dict()
    assert hf_state.keys() == orig_state.keys()
    for name, t in hf_state.items():
        assert torch.equal(t, orig_state[name]), name
    ids = torch.arange(20)[None] * 7 % hf.config.vocab_size
    assert torch.equal(hf(ids, hf.new_cache(20)), orig(ids, orig.new_cache(20)))


def test_disk_tensors_map_between_layouts(checkpoint_dir):
    path = checkpoint_dir("tiny-small-vocab", True)
    hf, orig = _disk(path), _disk(path / "original")
    assert len(hf) == len(orig) + 4 * 3  # q/k/v are separate in HF: two more weights and two more biases per layer
    qkv = torch.cat([hf[f"model.layers.1.self_attn.{x}_proj.weight"] for x in "qkv"])
    assert torch.equal(qkv, orig["block.1.attn.qkv.weight"])
    assert torch.equal(hf["model.layers.2.mlp.experts.gate_up_proj_blocks"], orig["block.2.mlp.mlp1_weight.blocks"])
    assert torch.equal(hf["model.layers.2.mlp.experts.down_proj_scales"], orig["block.2.mlp.mlp2_weight.scales"])
    assert torch.equal(hf["model.layers.0.mlp.router.weight"], orig["block.0.mlp.gate.weight"])
    assert torch.equal(hf["lm_head.weight"], orig["unembedding.weight"])
    assert hf["model.layers.0.mlp.experts.gate_up_proj_blocks"].shape == (4, 256, 3, 16)  # [E, 2I, H/32, 16]
    assert hf["model.layers.0.mlp.experts.down_proj_scales"].shape == (4, 96, 4)  # [E, H, I/32]
    assert hf["model.embed_tokens.weight"].dtype == torch.bfloat16


def test_dense_experts_are_transposed_in_hf_layout_only(checkpoint_dir):
    path = checkpoint_dir("tiny-small-vocab", False)
    hf, orig = _disk(path), _disk(path / "original")
    gate_up = hf["model.layers.0.mlp.experts.gate_up_proj"]  # [E, H, 2I] as transformers holds it
    assert gate_up.shape == (4, 96, 256)
    assert torch.equal(gate_up.transpose(1, 2), orig["block.0.mlp.mlp1_weight"])
    assert torch.equal(hf["model.layers.0.mlp.experts.down_proj"].transpose(1, 2), orig["block.0.mlp.mlp2_weight"])


def test_config_files(checkpoint_dir):
    path = checkpoint_dir("tiny", True)
    hf = json.loads((path / "config.json").read_text())
    assert hf["model_type"] == "gpt_oss" and hf["quantization_config"]["quant_method"] == "mxfp4"
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {f.name for f in path.glob("model-*.safetensors")}
    on_disk = sum(t.numel() * t.element_size() for t in _disk(path).values())
    assert index["metadata"]["total_size"] == on_disk == GptOssConfig.from_preset("tiny").checkpoint_bytes()
    original = json.loads((path / "original" / "config.json").read_text())
    # exactly the fields of the reference implementation's ModelConfig, so it loads with ModelConfig(**json)
    assert set(original) == {
        "num_hidden_layers", "num_experts", "experts_per_token", "vocab_size", "hidden_size", "intermediate_size",
        "swiglu_limit", "head_dim", "num_attention_heads", "num_key_value_heads", "sliding_window",
        "initial_context_length", "rope_theta", "rope_scaling_factor", "rope_ntk_alpha", "rope_ntk_beta"}
    assert "quantization_config" not in json.loads((checkpoint_dir("tiny", False) / "config.json").read_text())


def test_writing_is_deterministic(tmp_path):
    config = GptOssConfig.from_preset("tiny-small-vocab")
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        write_checkpoint(config, tmp_path / name, seed=seed, layout="original")
    read = {n: (tmp_path / n / "original" / "model.safetensors").read_bytes() for n in "abc"}
    assert read["a"] == read["b"] != read["c"]


def test_mxfp4_experts_stay_packed_until_asked(checkpoint_dir, monkeypatch):
    path = checkpoint_dir("tiny", True)
    packed = load_model(path)
    mlp = packed.blocks[0].mlp
    assert mlp.packed and mlp.gate_up_blocks.dtype == torch.uint8 and not hasattr(mlp, "gate_up_weight")
    assert mlp.gate_up_blocks.shape == (8, 128, 2, 16)
    dense = load_model(path, dequantize=True)
    assert not dense.blocks[0].mlp.packed and dense.blocks[0].mlp.gate_up_weight.dtype == torch.float32
    ids = torch.arange(30)[None] * 1000
    # the same weights either way: unpacking is exact
    expected = dense(ids, dense.new_cache(30))
    assert torch.allclose(packed(ids, packed.new_cache(30)), expected, atol=1e-5, rtol=0)
    assert mlp._dense is not None  # a layer this small keeps one dense copy beside the packed bytes
    assert mlp.gate_up_blocks.dtype == torch.uint8 and "blocks.0.mlp.gate_up_blocks" in packed.state_dict()

    # what big layers do: unpack the chosen experts on every call, gathered or in the per-expert loop
    monkeypatch.setattr("cluster.model.moe.DENSE_CACHE_BYTES", 0)
    fresh = load_model(path)
    assert torch.allclose(fresh(ids, fresh.new_cache(30)), expected, atol=1e-5, rtol=0)
    monkeypatch.setattr("cluster.model.moe.GATHER_LIMIT", 0)
    assert torch.allclose(fresh(ids, fresh.new_cache(30)), expected, atol=1e-5, rtol=0)
    assert fresh.blocks[0].mlp._dense is None


def test_bfloat16_load(checkpoint_dir):
    path = checkpoint_dir("tiny-small-vocab", True)
    fp32, bf16 = load_model(path), load_model(path, dtype=torch.bfloat16)
    assert bf16.embedding.weight.dtype == torch.bfloat16 and bf16.blocks[0].mlp.gate_up_blocks.dtype == torch.uint8
    ids = torch.arange(24)[None] * 37 % 1024
    a, b = fp32(ids, fp32.new_cache(24)), bf16(ids, bf16.new_cache(24))
    assert b.dtype == torch.float32
    assert (a - b).abs().max() < 0.25 * a.abs().max()
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.7


def test_progress_bar_when_asked(checkpoint_dir, capsys):
    load_model(checkpoint_dir("tiny-small-vocab", True), progress=True)
    assert "loading" in capsys.readouterr().err
    load_model(checkpoint_dir("tiny-small-vocab", True))  # small and not a tty: silent
    assert capsys.readouterr().err == ""
