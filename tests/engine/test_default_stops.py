"""The stop ids every engine uses when a request names none: the end of a harmony assistant turn,
exactly openai-harmony's stop_tokens_for_assistant_actions() (<|return|>, <|call|>; not <|end|>)."""

from __future__ import annotations

from types import SimpleNamespace

import openai_harmony
import pytest
from engine_fixtures import engine_model, one_intra_op_thread  # noqa: F401  (fixtures)

from cluster.config import EngineConfig
from cluster.engine.batching_engine import BatchingEngine
from cluster.engine.request import GenerateRequest
from cluster.engine.vllm_engine import VllmEngine
from cluster.harmony.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def harmony_turn_stops() -> set[int]:
    load_tokenizer()  # points openai-harmony at the local BPE file
    encoding = openai_harmony.load_harmony_encoding(openai_harmony.HarmonyEncodingName.HARMONY_GPT_OSS)
    return set(encoding.stop_tokens_for_assistant_actions())


def test_torch_engine_defaults_to_harmonys_turn_end(engine_model, harmony_turn_stops):
    engine = BatchingEngine.for_model(engine_model("tiny"), EngineConfig())
    try:
        settings = engine.settings_for(GenerateRequest(prompt_token_ids=(200006, 173781)))
    finally:
        engine.shutdown()
    assert set(settings.stop_token_ids) == harmony_turn_stops
    assert 200007 not in settings.stop_token_ids  # <|end|>


def test_vllm_adapter_defaults_to_harmonys_turn_end(harmony_turn_stops):
    # vLLM is not installed in this tier: the adapter only reads these fields of its AsyncLLM here.
    model_config = SimpleNamespace(get_vocab_size=lambda: 201088, max_model_len=4096, max_logprobs=20)
    llm = SimpleNamespace(model_config=model_config,
                          vllm_config=SimpleNamespace(cache_config=SimpleNamespace(num_gpu_blocks=0)))
    assert set(VllmEngine(llm, EngineConfig())._stop_token_ids) == harmony_turn_stops
