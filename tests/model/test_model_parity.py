"""Our model against transformers' GptOssForCausalLM on the same checkpoint files."""

from __future__ import annotations

import pytest
import torch

from cluster.model.checkpoint import load_model
from cluster.model.generate import greedy

TINY_PRESETS = ("tiny", "tiny-small-vocab")  # the two shapes conftest.checkpoint_dir writes

transformers = pytest.importorskip("transformers")

PROMPT_LEN = 40  # longer than every tiny preset's sliding window (8 and 16)
NEW_TOKENS = 32


def _hf_model(path, mxfp4: bool):
    kwargs = {}
    if mxfp4:
        # On CPU transformers dequantizes MXFP4 experts into the requested dtype.
        kwargs["quantization_config"] = transformers.Mxfp4Config(dequantize=True)
    return transformers.GptOssForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs).eval()


def _prompt(vocab: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (1, PROMPT_LEN), generator=torch.Generator().manual_seed(seed))


CASES = [(preset, mx) for preset in TINY_PRESETS for mx in (True, False)]


@pytest.mark.parametrize("preset,mxfp4", CASES, ids=[f"{p}-{'mxfp4' if m else 'bf16'}" for p, m in CASES])
def test_logits_and_greedy_match_transformers(checkpoint_dir, preset, mxfp4):
    path = checkpoint_dir(preset, mxfp4)
    ours = load_model(path)
    ref = _hf_model(path, mxfp4)
    ids = _prompt(ours.config.vocab_size)

    with torch.no_grad():
        expected = ref(ids).logits
    got = ours(ids, ours.new_cache(PROMPT_LEN))
    assert got.shape == expected.shape == (1, PROMPT_LEN, ours.config.vocab_size)
    assert (got - expected).abs().max().item() < 1e-4
    # the original layout of the same weights, through our loader
    original = load_model(path / "original")
    assert (original(ids, original.new_cache(PROMPT_LEN)) - expected).abs().max().item() < 1e-4

    tokens = greedy(ours, ids[0].tolist(), NEW_TOKENS)
    with torch.no_grad():
        ref_tokens = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                                  do_sample=False, eos_token_id=None, pad_token_id=0)[0, PROMPT_LEN:].tolist()
    assert tokens == ref_tokens
    assert len(set(tokens)) > 4, "greedy output of a random checkpoint should not collapse to one token"
