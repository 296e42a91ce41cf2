"""Pieces of the model against their definitions: YaRN, sinks, sliding window, SwiGLU, router, KV cache."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from cluster.model.config import GptOssConfig
from cluster.model.layers import swiglu, yarn_inv_freq
from cluster.model.transformer import GptOssModel


def _random_model(config: GptOssConfig, seed: int = 0) -> GptOssModel:
    torch.manual_seed(seed)
    model = GptOssModel(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 1.0 if "embedding" in name or "sinks" in name or "bias" in name else p.shape[-1] ** -0.5)
    return model.eval().requires_grad_(False)


SMALL = GptOssConfig.from_preset("tiny-small-vocab").with_vocab_size(128)


def test_yarn_matches_transformers_for_the_real_config():
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = GptOssConfig.from_preset("gpt-oss-120b")
    inv_freq, concentration = yarn_inv_freq(config)
    hf_config = transformers.GptOssConfig(**{k: v for k, v in config.to_hf_dict().items()
                                             if k not in ("architectures", "torch_dtype")})
    hf_inv_freq, hf_scale = ROPE_INIT_FUNCTIONS["yarn"](hf_config, "cpu")
    assert torch.allclose(inv_freq, hf_inv_freq, rtol=1e-6, atol=0)
    assert concentration == pytest.approx(hf_scale) == pytest.approx(0.1 * math.log(32) + 1)
    # the highest frequencies are kept, the lowest divided by the factor
    assert inv_freq[0] == 1.0 and inv_freq[-1] == pytest.approx(1 / (32 * 150000 ** (62 / 64)))


def test_swiglu_clamps_and_adds_one():
    x = torch.tensor([[10.0, 10.0, -3.0, -10.0, 0.0, 0.5]])  # (gate, linear) pairs
    out = swiglu(x)
    sig = torch.sigmoid
    expected = torch.tensor([[7 * sig(torch.tensor(7 * 1.702)) * 8, -3 * sig(torch.tensor(-3 * 1.702)) * -6, 0.0]])
    assert torch.allclose(out, expected)


def test_router_softmax_over_the_chosen_k_only():
    model = _random_model(SMALL)
    mlp = model.blocks[0].mlp
    x = torch.randn(5, SMALL.hidden_size)
    logits = mlp.router(x)
    top, idx = logits.topk(SMALL.num_experts_per_tok, dim=-1)
    w = torch.softmax(top, -1)
    expected = torch.zeros_like(x)
    for s in range(5):
        for a in range(SMALL.num_experts_per_tok):
            e = idx[s, a]
            h = swiglu(mlp.gate_up_weight[e] @ x[s] + mlp.gate_up_bias[e])
            expected[s] += w[s, a] * (mlp.down_weight[e] @ h + mlp.down_bias[e])
    assert torch.allclose(mlp(x), expected, atol=1e-5)
    assert torch.allclose(mlp._looped(x, idx, w), expected, atol=1e-5)  # the path long prefills take


def test_sinks_take_attention_mass():
    model = _random_model(SMALL)
    ids = torch.arange(12)[None]
    base = model(ids, model.new_cache(12))
    with torch.no_grad():
        for block in model.blocks:
            block.attn.sinks.fill_(30.0)  # the sink wins: attention outputs only the out bias
    sunk = model(ids, model.new_cache(12))
    assert not torch.allclose(base, sunk)
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight.normal_()  # keys and values no longer matter
    assert torch.allclose(sunk, model(ids, model.new_cache(12)), atol=1e-4)


def test_sliding_window_limits_the_receptive_field():
    window, layers = 4, 2
    config = dataclasses.replace(SMALL, num_hidden_layers=layers, sliding_window=window,
                                 layer_types=["sliding_attention"] * layers)
    model = _random_model(config)
    ids = torch.randint(0, 128, (1, 20), generator=torch.Generator().manual_seed(0))
    reach = layers * (window - 1)  # each layer looks back window - 1 positions
    far, near = ids.clone(), ids.clone()
    far[0, 19 - reach - 1] = (far[0, 19 - reach - 1] + 1) % 128
    near[0, 19 - reach] = (near[0, 19 - reach] + 1) % 128
    out = model(ids, model.new_cache(20))[0, -1]
    assert torch.equal(out, model(far, model.new_cache(20))[0, -1])
    assert not torch.allclose(out, model(near, model.new_cache(20))[0, -1])
    # a full-attention layer sees everything
    full = _random_model(dataclasses.replace(config, layer_types=["full_attention"] * layers))
    assert not torch.allclose(full(ids, full.new_cache(20))[0, -1], full(far, full.new_cache(20))[0, -1])


@pytest.mark.parametrize("layer_types", [None, ["full_attention"] * 3])
def test_cache_continuation_equals_one_pass(layer_types):
    config = dataclasses.replace(SMALL, layer_types=layer_types) if layer_types else SMALL
    model = _random_model(config)
    ids = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(1))
    whole = model(ids, model.new_cache(40, batch_size=2))
    cache = model.new_cache(40, batch_size=2)
    parts = [model(ids[:, :17], cache)] + [model(ids[:, t : t + 1], cache) for t in range(17, 30)]
    parts.append(model(ids[:, 30:], cache))
    assert cache.length == 40
    assert torch.allclose(torch.cat(parts, dim=1), whole, atol=1e-5)
    # batch rows are independent
    single = model(ids[1:], model.new_cache(40))
    assert torch.allclose(single, whole[1:], atol=1e-5)


def test_cache_limits():
    model = _random_model(SMALL)
    cache = model.new_cache(8)
    model(torch.zeros(1, 6, dtype=torch.long), cache)
    with pytest.raises(ValueError, match="cache"):
        model(torch.zeros(1, 3, dtype=torch.long), cache)
    with pytest.raises(ValueError, match="batch"):
        model(torch.zeros(2, 1, dtype=torch.long), model.new_cache(8))
    with pytest.raises(ValueError, match="max_len"):
        model.new_cache(SMALL.max_position_embeddings + 1)
