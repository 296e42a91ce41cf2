"""Chat input that openai-harmony cannot render is refused as INVALID_ARGUMENT naming the field.

Python's json.loads takes NaN, Infinity, 1e400 (read as infinity), lone surrogate escapes and
nesting deeper than openai-harmony's JSON reader allows; Python callers of render_prompt can pass
sets, bytes and impossible dates too. Hypothesis puts such a value at a random place of an
otherwise valid request and requires, for every one, the status a client would get from the
chat request conversion (chat_request_from_proto, then errors.status_for): INVALID_ARGUMENT with a
BadRequest naming the field. One case goes through a real gRPC server and client as well.
"""

from __future__ import annotations

import asyncio
import datetime
import json

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from status_details import bad_fields
from test_servicer import INFO, ScriptedHandle, with_server

from cluster.frontdoor import errors
from cluster.frontdoor.call import CallInfo
from cluster.frontdoor.conversion import chat_request_from_proto
from cluster.harmony.render import MAX_SCHEMA_DEPTH, HarmonyInputError, Message, ToolDefinition, render_prompt
from gptoss.v1 import inference_pb2 as pb

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)

names = st.text(st.characters(exclude_categories=("Cs",)), max_size=6)
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**63), names,
                         st.floats(allow_nan=False, allow_infinity=False))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(names, inner, max_size=3)), max_leaves=12)

# JSON text Python's json.loads accepts but no JSON reader that follows the spec (openai-harmony's) does.
POISON_JSON = st.one_of(
    st.sampled_from(["NaN", "Infinity", "-Infinity", "1e400", "-1e999", "1" + "0" * 400, '"\\ud800"',
                     '"tail \\udfff"', '{"\\ud83d": 1}', '["\\udc00"]']),
    st.integers(MAX_SCHEMA_DEPTH, 400).map(lambda depth: "[" * depth + "1" + "]" * depth),
    st.just("[" * 5000 + "]" * 5000),  # deeper than Python's own recursion limit
)


@st.composite
def poisoned_schema(draw) -> str:
    """A JSON object schema with one poison value somewhere inside."""
    text = draw(POISON_JSON)
    for step in draw(st.lists(st.one_of(names, st.integers(0, 2)), max_size=4)):
        if isinstance(step, str):
            text = "{" + json.dumps(step) + ": " + text + "}"
        else:
            text = "[" + ", ".join(["0"] * step + [text]) + "]"
    return '{"type": "object", "properties": {"x": ' + text + "}}"


class Context:
    """The part of a grpc.aio ServicerContext the conversion reads."""

    def time_remaining(self):
        return None


def chat_status(request: pb.ChatRequest) -> errors.RpcError | None:
    """What a client would get for `request` from the conversion (None: it converts)."""
    try:
        chat_request_from_proto(request, INFO, CallInfo("Chat", "r"), Context())
    except Exception as err:  # noqa: BLE001 - every error must map to a status, INTERNAL included
        return errors.status_for(err)
    return None


def user_asks(**fields) -> pb.ChatRequest:
    return pb.ChatRequest(messages=[pb.ChatMessage(role=pb.ROLE_USER, content="Weather in Paris?")], **fields)


GOOD_TOOL = pb.ToolDefinition(name="get_weather", description="Current weather",
                              parameters_json='{"type": "object", "properties": {"city": {"type": "string"}}}')


@FUZZ
@given(schema=poisoned_schema(), before=st.integers(0, 2), after=st.integers(0, 1))
def test_a_schema_harmony_cannot_read_is_invalid_argument_naming_the_tool(schema, before, after):
    tools = [pb.ToolDefinition(name=f"tool_{i}", description="d", parameters_json=GOOD_TOOL.parameters_json)
             for i in range(before)]
    tools.append(pb.ToolDefinition(name="poisoned", description="d", parameters_json=schema))
    tools += [pb.ToolDefinition(name=f"later_{i}", description="d") for i in range(after)]
    status = chat_status(user_asks(tools=tools))
    assert status is not None and status.code == grpc.StatusCode.INVALID_ARGUMENT, status
    assert [field for field, _ in status.violations] == [f"tools[{before}].parameters_json"]


@FUZZ
@given(schema=st.dictionaries(names, json_values, max_size=4))
def test_any_plain_json_schema_still_renders(schema):
    schema = {"type": "object", "properties": schema}
    assert chat_status(user_asks(tools=[pb.ToolDefinition(name="f", description="d",
                                                          parameters_json=json.dumps(schema))])) is None


# Values a Python caller of render_prompt may pass, each with the field it must be reported on.
LONE = "text \ud800 more"
BAD_SCHEMA_VALUES = [float("nan"), float("inf"), -float("inf"), 10**400, {1, 2}, b"bytes", 1j, object(),
                     {"\udfff": 1}, {3: "int key"}, LONE]


def nested(depth: int) -> dict:
    value: dict = {}
    for _ in range(depth - 1):
        value = {"a": value}
    return value


@st.composite
def bad_render_input(draw) -> tuple[dict, str]:
    """(render_prompt keyword arguments, the field the error must name)."""
    messages = [Message("user", "hi"), Message("assistant", "ok", channel="final"), Message("user", "and?")]
    tools = [ToolDefinition("a", "first", {"type": "object"}), ToolDefinition("b", "second", None)]
    kwargs = {"messages": messages, "tools": tools}
    where = draw(st.sampled_from(["content", "recipient", "content_type", "name", "description", "schema",
                                  "deep_schema", "instructions", "date"]))
    index = draw(st.integers(0, 1))
    if where in ("content", "recipient", "content_type", "name"):
        message = messages[index * 2]
        fields = {"role": "tool" if where == "name" else message.role, "content": message.content}
        fields[where] = LONE if where == "content" else "functions.\udc80"
        messages[index * 2] = Message(**fields)
        return kwargs, f"messages[{index * 2}].{where}"
    if where == "description":
        tools[index] = ToolDefinition(tools[index].name, LONE, None)
        return kwargs, f"tools[{index}].description"
    if where in ("schema", "deep_schema"):
        bad = draw(st.sampled_from(BAD_SCHEMA_VALUES)) if where == "schema" else nested(
            draw(st.integers(MAX_SCHEMA_DEPTH + 1, 300)))
        tools[index] = ToolDefinition(tools[index].name, "d", {"type": "object", "properties": {"x": bad}})
        return kwargs, f"tools[{index}].parameters"
    if where == "instructions":
        return {**kwargs, "instructions": LONE}, "instructions"
    day = draw(st.sampled_from(["2025-02-30", "2025-13-01", "2023-02-29", "0000-01-01", "2025-00-10"]))
    return {**kwargs, "conversation_start_date": day}, "conversation_start_date"


@FUZZ
@given(case=bad_render_input())
def test_render_prompt_names_the_field_of_every_input_harmony_refuses(case):
    kwargs, field = case
    with pytest.raises(HarmonyInputError) as raised:
        render_prompt(**kwargs)
    assert raised.value.field == field
    status = errors.status_for(raised.value)
    assert status.code == grpc.StatusCode.INVALID_ARGUMENT and status.field == field
    json.dumps(status.message)  # the description itself is valid text (no lone surrogate echoed back)
    status.message.encode("utf-8")


def test_a_real_date_and_a_deep_but_allowed_schema_render():
    tool = ToolDefinition("deep", "d", nested(MAX_SCHEMA_DEPTH))
    prompt = render_prompt([Message("user", "hi")], tools=[tool], conversation_start_date=datetime.date(2024, 2, 29))
    assert prompt


def test_the_client_gets_invalid_argument_naming_the_tool_over_grpc():
    handle = ScriptedHandle(lambda request: pytest.fail("a request that does not render reached a replica"))
    tools = [GOOD_TOOL, pb.ToolDefinition(name="lookup", description="d",
                                          parameters_json='{"type": "object", "default": NaN}')]

    async def body(stub):
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            [r async for r in stub.Chat(user_asks(tools=tools), timeout=10)]
        return raised.value

    err = asyncio.run(with_server(handle, body))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_fields(err) == ["tools[1].parameters_json"]
    assert "NaN" in err.details() or "nan" in err.details()
