"""Constrained requests and the checks on their outputs, shared by the engine, expert-parallel and
front-door tests of structured output (a plain module, imported by name like engine_fixtures)."""

from __future__ import annotations

import json
import re

import jsonschema

from cluster.bench.schemas import SCHEMAS
from cluster.harmony.parse import StreamParser
from cluster.harmony.render import Message, render_prompt
from cluster.harmony.structured import ResponseFormat, StrictTool, TurnConstraint

# Room for a random model: the budget's analysis, the final header, and the value with its wrap-up.
MAX_TOKENS = 128
BUDGET = 8
# The `email` format forces its local part, @ and a domain: a random model writes the local part
# until it runs out of tokens (docs/structured-output.md, wrap-up); a trained one does not.
RANDOM_MODEL_SCHEMAS = {name: schema for name, schema in SCHEMAS.items() if name != "format_email"}
REGEX = r"[A-Z]{2}-[0-9]{3}"
GRAMMAR = 'start: "yes" | "no" | "n=" NUMBER\nNUMBER: /[0-9]{1,3}/'
TOOL = StrictTool("get_weather", SCHEMAS["weather_tool"])
# Random weights pick "analysis" or "final" after <|channel|> by chance: the analysis tests take the
# first of these questions whose greedy answer starts with an analysis.
ANALYSIS_QUESTIONS = ("Why?", "What is 2+2?", "Hello", "Tell me a story", "Weather?", "Name a color", "Pick one",
                      "Count to three")


def prompt() -> list[int]:
    return render_prompt([Message("user", "Answer in the requested format.")], reasoning_effort="low")


def cases() -> dict[str, TurnConstraint]:
    """name -> constraint: every random-model schema, plus json_object, regex, grammar and a strict tool."""
    out = {name: TurnConstraint(ResponseFormat("json_schema", schema, strict=True), reasoning_budget=BUDGET)
           for name, schema in RANDOM_MODEL_SCHEMAS.items()}
    out["json_object"] = TurnConstraint(ResponseFormat("json_object"), reasoning_budget=BUDGET)
    out["regex"] = TurnConstraint(ResponseFormat("regex", pattern=REGEX), reasoning_budget=BUDGET)
    out["grammar"] = TurnConstraint(ResponseFormat("grammar", grammar=GRAMMAR), reasoning_budget=BUDGET)
    out["strict_tool_only"] = TurnConstraint(ResponseFormat("json_schema", {"type": "boolean"}, strict=True),
                                             strict_tools=(TOOL,), reasoning_budget=BUDGET)
    return out


def check_output(name: str, constraint: TurnConstraint, ids: list[int]) -> str:
    """Assert that `ids` is one harmony turn whose answer matches `constraint`; returns the answer."""
    parser = StreamParser()
    parser.feed(ids)
    parser.finish()
    assert not parser.is_raw and parser.done, (name, parser.raw_text[:300])
    messages = parser.messages
    assert [m.channel for m in messages[:-1]] in ([], ["analysis"]), (name, messages)
    answer = messages[-1]
    fmt = constraint.response_format
    if answer.recipient is not None:  # a strict tool call
        tool = next(t for t in constraint.strict_tools if answer.recipient == f"functions.{t.name}")
        assert answer.channel == "commentary" and answer.content_type == "<|constrain|>json", answer
        jsonschema.validate(json.loads(answer.content), tool.parameters)
        return answer.content
    assert answer.channel == "final", (name, answer)
    if fmt.type == "json_schema":
        jsonschema.validate(json.loads(answer.content), fmt.schema, format_checker=jsonschema.FormatChecker())
    elif fmt.type == "json_object":
        assert isinstance(json.loads(answer.content), dict), answer.content
    elif fmt.type == "regex":
        assert re.fullmatch(fmt.pattern, answer.content), answer.content
    elif fmt.type == "grammar":
        assert re.fullmatch(r"yes|no|n=[0-9]{1,3}", answer.content), answer.content
    return answer.content


def strict_tool_chats(stub, messages, tool, parameters: dict, seeds, *, max_tokens: int, timeout: float) -> int:
    """Sampled gRPC Chats with the strict `tool` (gptoss.v1 ToolDefinition) and a final answer held to
    the regex "no": each one ends in a call whose arguments match `parameters`, or in exactly "no".
    Returns how many called the tool."""
    from gptoss.v1 import inference_pb2 as pb

    calls = 0
    for seed in seeds:
        sampling = pb.SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=seed)
        responses = list(stub.Chat(pb.ChatRequest(messages=messages, sampling=sampling, tools=[tool],
                                                  response_format=pb.ResponseFormat(regex="no"), reasoning_budget=2),
                                   timeout=timeout))
        deltas = [r.delta for r in responses if r.HasField("delta")]
        tool_calls = [d.tool_call for d in deltas if d.HasField("tool_call")]
        if responses[-1].complete.finish_reason == pb.FINISH_REASON_TOOL_CALL:
            calls += 1
            assert tool_calls[0].name == tool.name
            jsonschema.validate(json.loads(tool_calls[0].arguments_json), parameters)
        else:
            assert "".join(d.text for d in deltas if d.channel == pb.CHANNEL_FINAL) == "no"
    return calls
