"""Structured output on the vLLM engine: a turn constraint becomes vLLM's StructuredOutputsParams
with the whole-turn grammar as llguidance Lark (guidance backend), and through the session's vLLM
app (random tiny-vllm weights, gRPC front door) answers validate, a strict tool's arguments match
its parameters. Needs vllm (the vLLM tier venv); skips
elsewhere."""

from __future__ import annotations

import concurrent.futures
import json
import sys
from pathlib import Path

import llguidance
import pytest

from cluster.config import load_config
from cluster.engine.errors import InvalidRequestError
from cluster.bench.schemas import SCHEMAS
from cluster.harmony.structured import ResponseFormat, StrictTool, TurnConstraint, grammar_tokenizer
from cluster.harmony.render import Message, render_prompt
from cluster.harmony.tokenizer import RETURN_ID, load_tokenizer
from gptoss.v1 import inference_pb2 as pb
from tests.vllm_tier.conftest import require_vllm

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engine"))
from structured_cases import BUDGET, GRAMMAR, MAX_TOKENS, REGEX, check_output, strict_tool_chats  # noqa: E402

# vLLM has no wrap-up near max_tokens (docs/structured-output.md): on random weights, the schemas
# whose values are bounded (enums, bounded numbers and lengths, patterns, formats, fixed arrays).
BOUNDED_SCHEMAS = ("enum_string", "enum_mixed", "int_bounds", "string_length", "pattern", "pattern_phone",
                   "format_date", "boolean_flags", "top_level_string_enum", "top_level_integer",
                   "array_of_ints_exact")
BOUNDED_TOOL = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                 "unit": {"enum": ["celsius", "fahrenheit"]}},
                "required": ["city", "unit"], "additionalProperties": False}


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


def _formats() -> dict[str, tuple[pb.ResponseFormat, TurnConstraint]]:
    """name -> (the gRPC format, the same constraint for check_output)."""
    out = {}
    for name in BOUNDED_SCHEMAS:
        schema = SCHEMAS[name]
        out[name] = (pb.ResponseFormat(json_schema=pb.JsonSchemaFormat(name=name, schema_json=json.dumps(schema),
                                                                       strict=True)),
                     TurnConstraint(ResponseFormat("json_schema", schema, strict=True)))
    out["regex"] = (pb.ResponseFormat(regex=REGEX), TurnConstraint(ResponseFormat("regex", pattern=REGEX)))
    out["grammar"] = (pb.ResponseFormat(grammar=pb.GrammarFormat(syntax=pb.GRAMMAR_SYNTAX_LARK, text=GRAMMAR)),
                      TurnConstraint(ResponseFormat("grammar", grammar=GRAMMAR)))
    return out


def _generate(stub, prompt, fmt=None, budget=BUDGET, **sampling):
    request = pb.GenerateRequest(prompt_token_ids=prompt, sampling=pb.SamplingParams(**sampling),
                                 reasoning_budget=budget)
    if fmt is not None:
        request.response_format.CopyFrom(fmt)
    responses = list(stub.Generate(request, timeout=300))
    ids = [t for r in responses if r.HasField("chunk") for t in r.chunk.token_ids]
    return ids, responses[-1].complete.finish_reason


def test_vllm_answers_validate_greedy_and_sampled(vllm_stub):
    """Every bounded schema, a regex and a grammar, greedy and with two seeds, all at once (one vLLM
    batch): each answer is one harmony turn whose final message matches its format."""
    prompt = render_prompt([Message("user", "Answer in the requested format.")], reasoning_effort="low")
    runs = [(name, fmt, constraint, sampling) for name, (fmt, constraint) in _formats().items()
            for sampling in ({"temperature": 0.0}, {"temperature": 1.0, "seed": 1}, {"temperature": 1.0, "seed": 2})]
    with concurrent.futures.ThreadPoolExecutor(len(runs)) as pool:
        outputs = list(pool.map(lambda run: _generate(vllm_stub, prompt, run[1], max_tokens=MAX_TOKENS, **run[3]),
                                runs))
    for (name, _, constraint, sampling), (ids, finish) in zip(runs, outputs):
        assert finish == pb.FINISH_REASON_STOP and ids[-1] == RETURN_ID, (name, sampling, load_tokenizer().decode(ids))
        check_output(name, constraint, ids)


def test_vllm_strict_tool_call_arguments_match_the_parameters(vllm_stub):
    tool = pb.ToolDefinition(name="get_weather", description="Weather in a city",
                             parameters_json=json.dumps(BOUNDED_TOOL), strict=True)
    messages = [pb.ChatMessage(role=pb.ROLE_USER, content="What is the weather in Paris?")]
    calls = strict_tool_chats(vllm_stub, messages, tool, BOUNDED_TOOL, range(6), max_tokens=MAX_TOKENS, timeout=300)
    assert calls > 0

