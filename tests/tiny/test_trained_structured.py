"""Structured output on the trained gpt-oss-tiny (torch engine, greedy): the constraint makes the
answer valid, and the content makes sense for the question.

Two kinds of assertion, marked as such:
* FORMAT: what the constraint guarantees (a strict tool's arguments match its parameters, the final
  answer matches the regex). These must hold for any weights.
* CONTENT: what the trained model writes (the city asked for, the right capital): the constraint
  must let a model that knows harmony keep to its own path (its tool-call header, its JSON style).
"""

from __future__ import annotations

import asyncio
import json
import re

import jsonschema
import pytest

from cluster.config import EngineConfig
from cluster.engine.batching_engine import BatchingEngine
from cluster.engine.request import FinishReason, GenerateRequest, SamplingParams
from cluster.harmony.parse import StreamParser
from cluster.harmony.render import Message, ToolDefinition, render_prompt
from cluster.harmony.structured import ResponseFormat, StrictTool, TurnConstraint

WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
           "additionalProperties": False}
CAPITAL = r"The capital of [A-Z][a-z]+ is [A-Z][a-z]+\."


@pytest.fixture(scope="module")
def engine(trained_model):
    engine = BatchingEngine.for_model(trained_model, EngineConfig(max_num_seqs=4, kv_cache_memory_mib=32,
                                                                  chunk_interval_ms=0))
    yield engine
    engine.shutdown()


def answer(engine, prompt, constraint):
    """The last harmony message of the greedy constrained turn, and the finish reason."""
    async def run():
        request = GenerateRequest(tuple(prompt), SamplingParams(max_tokens=160, temperature=0.0), constraint=constraint)
        return [c async for c in engine.generate(request)]

    chunks = asyncio.run(run())
    parser = StreamParser()
    parser.feed([t for c in chunks for t in c.token_ids])
    parser.finish()
    assert not parser.is_raw and parser.done
    return parser.messages[-1], chunks[-1].finish_reason


@pytest.fixture(scope="module")
def weather_call(engine):
    prompt = render_prompt([Message("user", "What is the weather in Paris?")], reasoning_effort="low",
                           tools=[ToolDefinition("get_weather", "Current weather in a city.", WEATHER)])
    # The answer: a call with schema-valid arguments, or free final text (no response format).
    constraint = TurnConstraint(strict_tools=(StrictTool("get_weather", WEATHER),), reasoning_budget=64)
    return answer(engine, prompt, constraint)


@pytest.fixture(scope="module")
def capital_answer(engine):
    prompt = render_prompt([Message("user", "What is the capital of France?")], reasoning_effort="low")
    return answer(engine, prompt, TurnConstraint(ResponseFormat("regex", pattern=CAPITAL), reasoning_budget=64))


def test_format_a_strict_tool_call_has_arguments_matching_the_schema(weather_call):
    message, finish = weather_call
    assert finish is FinishReason.STOP
    if message.recipient is None:  # the model answered instead of calling: free text is allowed
        assert message.channel == "final"
        return
    assert message.recipient == "functions.get_weather" and message.content_type == "<|constrain|>json"
    jsonschema.validate(json.loads(message.content), WEATHER)


def test_content_the_model_calls_the_tool_for_the_city_asked_for(weather_call):
    message, _ = weather_call
    assert message.recipient == "functions.get_weather"
    assert json.loads(message.content) == {"city": "Paris"}


def test_format_the_final_answer_matches_the_regex(capital_answer):
    message, finish = capital_answer
    assert finish is FinishReason.STOP and message.channel == "final"
    assert re.fullmatch(CAPITAL, message.content), message.content


def test_content_the_final_answer_names_paris_for_france(capital_answer):
    message, _ = capital_answer
    assert message.content == "The capital of France is Paris."
