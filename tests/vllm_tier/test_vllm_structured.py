"""The vLLM adapter of structured output: a turn constraint becomes vLLM's StructuredOutputsParams
with the whole-turn grammar as llguidance Lark (guidance backend). Needs vllm (the vLLM tier venv);
skips elsewhere. Not run where this was written (the vLLM venv was not built there)."""

from __future__ import annotations

import llguidance
import pytest

from cluster.config import load_config
from cluster.engine.errors import InvalidRequestError
from cluster.harmony.structured import ResponseFormat, StrictTool, TurnConstraint, grammar_tokenizer
from cluster.harmony.tokenizer import load_tokenizer
from tests.vllm_tier.conftest import require_vllm


def test_engine_args_turn_on_the_tokenizer_and_guidance_only_when_asked():
    from cluster.engine.vllm_engine import engine_args_for

    off = engine_args_for(load_config(env={}, overrides={}), "/m")
    on = engine_args_for(load_config(env={}, overrides={"engine.vllm.structured_outputs": True}), "/m")
    assert off["skip_tokenizer_init"] and "structured_outputs_config" not in off
    assert not on["skip_tokenizer_init"] and on["structured_outputs_config"] == {"backend": "guidance"}


def test_a_constraint_becomes_structured_outputs_params_with_the_turn_grammar():
    require_vllm()
    from cluster.engine.vllm_engine import structured_outputs_for

    constraint = TurnConstraint(ResponseFormat("json_schema", {"type": "object", "properties": {
        "a": {"type": "integer"}}, "required": ["a"]}, strict=True),
        strict_tools=(StrictTool("w", {"type": "object", "properties": {"q": {"type": "string"}}}),),
        reasoning_budget=3)
    params = structured_outputs_for(constraint, 64)
    # What vLLM's guidance backend does with a grammar: llguidance.grammar_from("grammar", text).
    matcher = llguidance.LLMatcher(grammar_tokenizer(), llguidance.grammar_from("grammar", params.grammar))
    turn = ("<|channel|>analysis<|message|>a b c<|end|><|start|>assistant<|channel|>final<|message|>"
            '{"a":1}<|return|>')
    assert all(matcher.consume_token(t) for t in load_tokenizer().encode(turn, allow_special=True))
    with pytest.raises(InvalidRequestError) as info:
        structured_outputs_for(TurnConstraint(ResponseFormat("regex", pattern="a(")), 64)
    assert info.value.field == "response_format.pattern"
