"""GptOssConfig: presets, sizes from shapes, and config.json round trips (HF and original)."""

from __future__ import annotations

import json

import pytest
import torch

from cluster.model.config import PRESETS, GptOssConfig


@pytest.mark.parametrize("name,params,active,mxfp4_bytes", [
    ("gpt-oss-120b", 116_829_156_672, 5_132_849_472, 65_248_815_744),
    ("gpt-oss-20b", 20_914_757_184, 3_608_307_264, 13_761_264_768),
])
def test_published_sizes_from_shapes(name, params, active, mxfp4_bytes):
    config = GptOssConfig.from_preset(name)
    assert config.num_parameters() == params
    assert config.num_parameters(active=True) == active
    assert config.checkpoint_bytes(mxfp4=True) == mxfp4_bytes


def test_real_architecture_constants():
    c = GptOssConfig.from_preset("gpt-oss-120b")
    assert (c.hidden_size, c.intermediate_size, c.head_dim, c.num_attention_heads, c.num_key_value_heads) == (
        2880, 2880, 64, 64, 8)
    assert (c.vocab_size, c.sliding_window, c.rope_theta, c.rms_norm_eps, c.swiglu_limit) == (
        201088, 128, 150000.0, 1e-5, 7.0)
    assert c.rope_scaling["factor"] == 32 and c.rope_scaling["original_max_position_embeddings"] == 4096
    assert (c.rope_scaling["beta_fast"], c.rope_scaling["beta_slow"], c.rope_scaling["rope_type"]) == (32, 1, "yarn")
    assert c.layer_types[:4] == ["sliding_attention", "full_attention"] * 2
    assert GptOssConfig.from_preset("tiny").vocab_size == 201088  # the real tokenizer must fit


def test_sizes_agree_with_a_transformers_model_built_on_meta():
    transformers = pytest.importorskip("transformers")
    for name in PRESETS:
        config = GptOssConfig.from_preset(name)
        hf_config = transformers.GptOssConfig(**{k: v for k, v in config.to_hf_dict().items()
                                                 if k not in ("architectures", "torch_dtype")})
        with torch.device("meta"):
            model = transformers.GptOssForCausalLM(hf_config)
        assert sum(p.numel() for p in model.parameters()) == config.num_parameters(), name


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_hf_and_original_json_round_trip(tmp_path, name):
    config = GptOssConfig.from_preset(name)
    (tmp_path / "hf.json").write_text(json.dumps(config.to_hf_dict(mxfp4=True)))
    assert GptOssConfig.from_json(tmp_path / "hf.json") == config
    (tmp_path / "orig.json").write_text(json.dumps(config.to_original_dict()))
    back = GptOssConfig.from_json(tmp_path / "orig.json")
    # the reference's config.json has no field for these; they come back as gpt-oss defaults
    for field in ("max_position_embeddings", "eos_token_id", "pad_token_id"):
        setattr(back, field, getattr(config, field))
    assert back == config


def test_hf_dict_declares_mxfp4_only_when_quantized():
    config = GptOssConfig.from_preset("tiny")
    assert config.to_hf_dict(mxfp4=True)["quantization_config"]["quant_method"] == "mxfp4"
    assert "quantization_config" not in config.to_hf_dict(mxfp4=False)


def test_transformers_5_rope_parameters_are_understood():
    data = GptOssConfig.from_preset("tiny").to_hf_dict()
    rope = dict(data.pop("rope_scaling"), rope_theta=data.pop("rope_theta"))
    data["rope_parameters"] = rope
    assert GptOssConfig.from_hf_dict(data) == GptOssConfig.from_preset("tiny")


def test_invalid_configs_name_the_field():
    with pytest.raises(ValueError, match="unknown preset"):
        GptOssConfig.from_preset("gpt-oss-7b")
    with pytest.raises(ValueError, match="hidden_size"):
        GptOssConfig(hidden_size=100)
    with pytest.raises(ValueError, match="num_key_value_heads"):
        GptOssConfig(num_attention_heads=6, num_key_value_heads=4)
    with pytest.raises(ValueError, match="layer_types"):
        GptOssConfig(num_hidden_layers=2, layer_types=["full_attention"])
    with pytest.raises(ValueError, match=r"eos_token_id \(200002\) must be a token id below vocab_size \(2048\)"):
        GptOssConfig(vocab_size=2048)


def test_a_smaller_vocabulary_moves_special_ids_inside_it():
    small = GptOssConfig.from_preset("tiny").with_vocab_size(2048)
    assert (small.vocab_size, small.eos_token_id, small.pad_token_id) == (2048, 2047, 2046)
    # ids already inside the new vocabulary stay where they are
    kept = GptOssConfig.from_preset("tiny-small-vocab").with_vocab_size(2048)
    assert (kept.eos_token_id, kept.pad_token_id) == (1023, 1022)


def test_hf_config_names_yarn_truncate_and_transformers_reads_it(tmp_path):
    # transformers defaults `truncate` to True when a config omits it; the reference (and we) use False.
    transformers = pytest.importorskip("transformers")
    data = GptOssConfig.from_preset("tiny").to_hf_dict()
    assert data["rope_scaling"]["truncate"] is False
    (tmp_path / "config.json").write_text(json.dumps(data))
    theirs = transformers.AutoConfig.from_pretrained(tmp_path)
    assert theirs.rope_parameters["truncate"] is False


@pytest.mark.parametrize("key", ["rope_scaling", "rope_parameters"])
def test_loading_a_config_without_truncate_warns_which_value_is_used(caplog, key):
    data = GptOssConfig.from_preset("tiny").to_hf_dict()
    del data["rope_scaling"]["truncate"]
    if key == "rope_parameters":
        data["rope_parameters"] = dict(data.pop("rope_scaling"), rope_theta=data.pop("rope_theta"))
    with caplog.at_level("WARNING", logger="cluster.model.config"):
        config = GptOssConfig.from_hf_dict(data)
    assert config.rope_scaling["truncate"] is False
    assert "truncate" in caplog.text and "using False" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="cluster.model.config"):
        GptOssConfig.from_preset("tiny").from_hf_dict(GptOssConfig.from_preset("tiny").to_hf_dict())
    assert "truncate" not in caplog.text
