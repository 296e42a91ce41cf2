"""gpt-oss-tiny end to end through the real stack: gRPC Chat -> front door -> Ray Serve replica ->
torch engine (expert parallel 1 and 2) -> the trained checkpoint, with real harmony conversations:
channels streamed in order, tool calls, a tool result fed back, multi-turn, usage and stop tokens."""

from __future__ import annotations

import copy
import json

import pytest

from cluster.harmony import CALL_ID, RETURN_ID
from gptoss.v1 import inference_pb2 as pb
from tests.parallel.ep_apps import EpApp

pytestmark = pytest.mark.slow

WEATHER = pb.ToolDefinition(name="get_weather", description="Current weather in a city.", parameters_json=json.dumps(
    {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}))
CLOCK = pb.ToolDefinition(name="get_time", description="Current local time in a city.", parameters_json=json.dumps(
    {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}))
EFFORT = {"low": pb.REASONING_EFFORT_LOW, "medium": pb.REASONING_EFFORT_MEDIUM, "high": pb.REASONING_EFFORT_HIGH}


@pytest.fixture(scope="module", params=[1, 2], ids=["ep1", "ep2"])
def tiny_stub(request, ray_serving, serving_config, trained_checkpoint):
    config = copy.deepcopy(serving_config)
    config.model.path, config.model.name = str(trained_checkpoint), "gpt-oss-tiny"
    app = EpApp(config, f"gptoss-tiny-ep{request.param}", ep_size=request.param)
    yield app.stub
    app.close()


def user(text: str) -> pb.ChatMessage:
    return pb.ChatMessage(role=pb.ROLE_USER, content=text)


def chat(stub, messages, *, effort="low", tools=()):
    """(text per channel name, tool calls, complete, all token ids, order of channels seen)."""
    request = pb.ChatRequest(messages=messages, reasoning_effort=EFFORT[effort], tools=list(tools),
                             return_token_ids=True, sampling=pb.SamplingParams(max_tokens=200))
    text: dict[str, str] = {}
    calls, tokens, order, complete = [], [], [], None
    for response in stub.Chat(request, timeout=120):
        if response.HasField("complete"):
            complete = response.complete
            continue
        delta = response.delta
        assert not delta.raw, f"a trained model's output parses as harmony, got raw {delta.text!r}"
        tokens.extend(delta.token_ids)
        if delta.HasField("tool_call"):
            calls.append(delta.tool_call)
        if delta.text:
            channel = pb.Channel.Name(delta.channel).removeprefix("CHANNEL_").lower()
            text[channel] = text.get(channel, "") + delta.text
            if not order or order[-1] != channel:
                order.append(channel)
    return text, calls, complete, tokens, order


def test_chat_streams_the_analysis_then_the_final_answer(tiny_stub):
    text, calls, complete, tokens, order = chat(tiny_stub, [user("Repeat after me: hello world")])
    assert order == ["analysis", "final"]
    assert text["analysis"].strip() and text["final"].strip()
    assert not calls
    assert complete.finish_reason == pb.FINISH_REASON_STOP
    assert tokens[-1] == RETURN_ID  # the turn ends at <|return|>, not at the analysis' <|end|>
    usage = complete.usage
    assert usage.completion_tokens == len(tokens)
    assert 0 < usage.reasoning_tokens < usage.completion_tokens


def test_a_declared_tool_is_called_with_schema_arguments(tiny_stub):
    text, calls, complete, tokens, order = chat(tiny_stub, [user("What is the weather in Paris?")],
                                                tools=[CLOCK, WEATHER])
    assert order[0] == "analysis" and "final" not in text
    (call,) = calls
    assert call.name in ("get_weather", "get_time") and call.recipient == f"functions.{call.name}"
    assert set(json.loads(call.arguments_json)) == {"city"}  # the declared schema's one required key
    assert complete.finish_reason == pb.FINISH_REASON_TOOL_CALL
    assert tokens[-1] == CALL_ID


def test_a_tool_result_fed_back_gets_a_final_answer(tiny_stub):
    question = user("What time is it in Tokyo?")
    _, calls, _, _, _ = chat(tiny_stub, [question], tools=[WEATHER, CLOCK])
    (call,) = calls
    messages = [question,
                pb.ChatMessage(role=pb.ROLE_ASSISTANT, channel=pb.CHANNEL_COMMENTARY, recipient=call.recipient,
                               content_type="<|constrain|>json", content=call.arguments_json),
                pb.ChatMessage(role=pb.ROLE_TOOL, name=call.recipient, content=json.dumps({"time": "07:45"}))]
    text, calls, complete, tokens, order = chat(tiny_stub, messages, tools=[WEATHER, CLOCK])
    assert order == ["analysis", "final"] and not calls
    assert text["final"].strip()
    assert complete.finish_reason == pb.FINISH_REASON_STOP and tokens[-1] == RETURN_ID


def test_a_multi_turn_conversation_gets_an_answer_to_its_latest_turn(tiny_stub):
    messages = [user("Repeat after me: red fox"), pb.ChatMessage(role=pb.ROLE_ASSISTANT, content="red fox"),
                user("Why is the sky blue?")]
    text, _, complete, tokens, order = chat(tiny_stub, messages)
    assert order == ["analysis", "final"]
    assert complete.finish_reason == pb.FINISH_REASON_STOP and tokens[-1] == RETURN_ID
