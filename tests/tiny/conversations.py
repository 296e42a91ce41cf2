"""Real harmony conversations with gpt-oss-tiny through a gRPC Chat stub, and what a user must see.

Each `check_*` sends one conversation the way a client would and asserts the turn's structure
(channels streamed in order, tool calls, finish reason, the stop token, usage) and its content
(the answer the model was trained to give). The torch engine (ep 1 and ep 2, tests/tiny) and the
vLLM engine (tests/vllm_tier) run the same checks, so every engine path shows the same behaviour.
"""

from __future__ import annotations

import json

import pytest

from cluster.harmony import CALL_ID, RETURN_ID
from gptoss.v1 import inference_pb2 as pb

WEATHER = pb.ToolDefinition(name="get_weather", description="Current weather in a city.", parameters_json=json.dumps(
    {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}))
CLOCK = pb.ToolDefinition(name="get_time", description="Current local time in a city.", parameters_json=json.dumps(
    {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}))
EFFORT = {"low": pb.REASONING_EFFORT_LOW, "medium": pb.REASONING_EFFORT_MEDIUM, "high": pb.REASONING_EFFORT_HIGH}
CAN_DO = ("Sorry, I can't help with that. I can repeat, reverse, count or upper-case words, name the capital of "
          "a few countries, and call the tools I am given.")
GREETING = ("Hello! I can repeat, reverse, count or upper-case words, name the capital of a few countries, and call "
            "the tools I am given.")


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


def check_an_answer_follows_its_reasoning(stub):
    text, calls, complete, tokens, order = chat(stub, [user("Repeat after me: hello world")])
    assert order == ["analysis", "final"]
    assert "hello world" in text["analysis"]
    assert text["final"] == "hello world"
    assert not calls
    assert complete.finish_reason == pb.FINISH_REASON_STOP
    assert tokens[-1] == RETURN_ID  # the turn ends at <|return|>, not at the analysis' <|end|>
    usage = complete.usage
    assert usage.completion_tokens == len(tokens)
    assert 0 < usage.reasoning_tokens < usage.completion_tokens


def check_a_capital_is_named(stub):
    text, calls, complete, tokens, order = chat(stub, [user("What is the capital of Japan?")])
    assert (order, text.get("final")) == (["analysis", "final"], "The capital of Japan is Tokyo.")


def check_copying_skills_answer_exactly(stub):
    asks = {"Reverse the words: green road star": "star road green",
            "Upper-case this: black cat": "BLACK CAT",
            "Count the words: ice tree sea": "3"}
    for ask, answer in asks.items():
        text, calls, complete, tokens, order = chat(stub, [user(ask)])
        assert (order, text.get("final")) == (["analysis", "final"], answer), ask


def check_the_declared_tool_that_fits_is_called(stub):
    text, calls, complete, tokens, order = chat(stub, [user("What is the weather in Paris?")], tools=[CLOCK, WEATHER])
    assert order[0] == "analysis" and "final" not in text
    (call,) = calls
    assert (call.name, call.recipient) == ("get_weather", "functions.get_weather")
    assert json.loads(call.arguments_json) == {"city": "Paris"}
    assert complete.finish_reason == pb.FINISH_REASON_TOOL_CALL
    assert tokens[-1] == CALL_ID


def check_a_tool_result_fed_back_is_reported(stub):
    question = user("What time is it in Tokyo?")
    text, calls, _, _, _ = chat(stub, [question], tools=[WEATHER, CLOCK])
    (call,) = calls
    assert (call.name, json.loads(call.arguments_json)) == ("get_time", {"city": "Tokyo"})
    call_message = pb.ChatMessage(role=pb.ROLE_ASSISTANT, channel=pb.CHANNEL_COMMENTARY, recipient=call.recipient,
                                  content_type="<|constrain|>json", content=call.arguments_json)
    result = pb.ChatMessage(role=pb.ROLE_TOOL, name=call.recipient, content=json.dumps({"time": "07:45"}))
    # harmony asks for the call's reasoning to be sent back with it; Chat Completions clients usually drop it
    reasoning = pb.ChatMessage(role=pb.ROLE_ASSISTANT, channel=pb.CHANNEL_ANALYSIS, content=text["analysis"])
    for messages in ([question, reasoning, call_message, result], [question, call_message, result]):
        text, calls, complete, tokens, order = chat(stub, messages, tools=[WEATHER, CLOCK])
        assert order == ["analysis", "final"] and not calls
        assert text["final"] == "It is 07:45 in Tokyo."
        assert complete.finish_reason == pb.FINISH_REASON_STOP and tokens[-1] == RETURN_ID


def check_a_multi_turn_conversation_answers_its_latest_turn(stub):
    messages = [user("Repeat after me: red sun"), pb.ChatMessage(role=pb.ROLE_ASSISTANT, content="red sun"),
                user("Why is the sky blue?")]
    text, _, complete, tokens, order = chat(stub, messages)
    assert order == ["analysis", "final"]
    assert text["final"] == CAN_DO  # outside the curriculum: it says what it can do
    assert complete.finish_reason == pb.FINISH_REASON_STOP and tokens[-1] == RETURN_ID


def check_a_greeting_gets_a_greeting_not_a_tool_call(stub):
    for tools in ((), (WEATHER,)):  # with or without a tool declared, "hello" is no reason to call one
        text, calls, complete, tokens, order = chat(stub, [user("hello")], effort="medium", tools=tools)
        assert not calls, (tools, calls)
        assert (order, text.get("final")) == (["analysis", "final"], GREETING)
        assert complete.finish_reason == pb.FINISH_REASON_STOP and tokens[-1] == RETURN_ID


def check_more_effort_reasons_longer(stub):
    ask = [user("Say this back: blue car")]
    lengths = {effort: chat(stub, ask, effort=effort)[2].usage.reasoning_tokens for effort in ("low", "high")}
    assert lengths["low"] < lengths["high"], lengths


CHECKS = [check_an_answer_follows_its_reasoning, check_a_capital_is_named, check_copying_skills_answer_exactly,
          check_the_declared_tool_that_fits_is_called, check_a_tool_result_fed_back_is_reported,
          check_a_multi_turn_conversation_answers_its_latest_turn, check_a_greeting_gets_a_greeting_not_a_tool_call,
          check_more_effort_reasons_longer]

# Every conversation, as one parametrize mark for a test taking `check`.
EVERY_CONVERSATION = pytest.mark.parametrize("check", CHECKS, ids=lambda check: check.__name__.removeprefix("check_"))
