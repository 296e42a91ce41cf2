"""The HF tokenizer files the vLLM engine gets (cluster/harmony/hf_tokenizer.py), built from the
local BPE file with no download, encode and decode exactly as the cluster's own o200k_harmony
tokenizer does. Needs transformers and tiktoken, which come with vLLM: this runs in the vLLM tier."""

from __future__ import annotations

import pytest

from tests.vllm_tier.conftest import require_vllm

TEXTS = [
    "What's the weather in Tokyo? I'd like 3 days' forecast, in °C.",
    "Ünïcödé, ΑΒΓ, ПРИВЕТмир, 東京タワー, 🚀👍🏽 and a tab\tthen\r\nCRLF",
    'def area(r: float) -> float:\n    """pi r^2"""\n    return 3.14159 * r ** 2  # 1234567890\n',
    '{"name": "get_weather", "arguments": {"city": "Paris", "days": 12}}   ',
]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    require_vllm()
    from transformers import PreTrainedTokenizerFast

    from cluster.harmony.hf_tokenizer import hf_tokenizer_dir
    from cluster.harmony.tokenizer import load_tokenizer

    path = hf_tokenizer_dir(tmp_path_factory.mktemp("hf") / "o200k_harmony")  # a fresh build
    return PreTrainedTokenizerFast.from_pretrained(path), load_tokenizer()


def test_hf_tokenizer_encodes_and_decodes_like_the_harmony_tokenizer(tokenizers):
    from cluster.harmony.render import Message, render_prompt

    hf, harmony = tokenizers
    assert len(hf) == harmony.vocab_size == 201088
    assert hf.eos_token_id == 199999
    for text in TEXTS:
        ids = harmony.encode(text)
        assert hf.encode(text, add_special_tokens=False) == ids, text
        assert hf.decode(ids) == text
    prompt = render_prompt([Message("user", TEXTS[0])])  # a harmony prompt: specials and text
    assert hf.encode(harmony.decode(prompt), add_special_tokens=False) == list(prompt)
    assert hf.convert_ids_to_tokens([200002, 200012, 200018, 201087]) == [
        "<|return|>", "<|call|>", "<|reserved_200018|>", "<|reserved_201087|>"]
