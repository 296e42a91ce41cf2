"""The OpenAI-compatible HTTP API through the OFFICIAL `openai` Python package, against a real
front door (uvicorn + grpc.aio on one loop) whose replicas are a script answering in real harmony
(tests/frontdoor/harmony_script.py: analysis -> final, or analysis -> a function call), since no
trained model exists yet. Raw HTTP only for protocol-level checks (malformed JSON, a client that leaves)."""

from __future__ import annotations

import asyncio
import threading
import time

import json
import urllib.error
import urllib.request

import grpc
import openai
import pytest

from cluster.config import FrontdoorConfig, LimitsConfig
from cluster.engine.errors import EngineOverloadedError
from cluster.frontdoor.auth import ApiKeys
from cluster.harmony.tokenizer import load_tokenizer
from gptoss.v1 import inference_pb2 as pb
from gptoss.v1 import inference_pb2_grpc as pb_grpc
from tests.frontdoor.harmony_script import (CALL_ARGUMENTS, CALL_REASONING, INFO, REASONING, HarmonyScriptHandle,
                                            ThreadedFrontdoor, completion_for)
from tests.waiting import wait_until

MODEL = INFO.model_name
KEY, OTHER_KEY = "acme-key-0123456789abcdef", "other-key-0123456789abcdef"
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"type": "string"}},
                   "required": ["city"]}}}]
RESPONSE_TOOLS = [{"type": "function", **TOOLS[0]["function"]}]


def config(**fields) -> FrontdoorConfig:
    return FrontdoorConfig(grpc_port=0, metrics_port=0, http_port=0, load_poll_interval_s=0, **fields)


def keys() -> ApiKeys:
    return ApiKeys([("acme", KEY), ("other", OTHER_KEY)])


@pytest.fixture(scope="module")
def door():
    door = ThreadedFrontdoor(HarmonyScriptHandle(chunk_tokens=3, cached_tokens=7), config(), api_keys=keys())
    yield door
    door.close()


@pytest.fixture(scope="module")
def client(door):
    with openai.OpenAI(base_url=door.base_url, api_key=KEY, max_retries=0) as client:
        yield client


def counter(snapshot, name, **labels) -> float:
    return snapshot.get((name, tuple(sorted(labels.items()))), 0.0)


def reasoning_tokens_of(prompt_ids) -> int:
    """Tokens of the script's analysis message as the model writes it (header and <|end|> included)."""
    ids = completion_for(prompt_ids)
    return ids.index(200007) + 1  # through the analysis message's <|end|>


# ───────────────────────────────────────── chat ─────────────────────────────────────────

def test_chat_completion_answers_with_reasoning_apart_and_usage_equal_to_the_counters(door, client):
    route = "/v1/chat/completions"
    before = door.metrics()
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}],
        reasoning_effort="high", extra_headers={"x-request-id": "chat-1"})
    after = door.settled_metrics()
    assert raw.headers["x-request-id"] == "chat-1"
    completion = raw.parse()
    message = completion.choices[0].message
    assert message.content == "You said: hi. (user turns: 1)"
    assert message.model_extra["reasoning_content"] == REASONING
    assert completion.choices[0].finish_reason == "stop" and message.tool_calls is None
    request = door.handle.requests[-1]
    usage = completion.usage
    assert usage.prompt_tokens == len(request.prompt_token_ids)
    assert usage.completion_tokens == len(completion_for(request.prompt_token_ids))
    assert usage.completion_tokens_details.reasoning_tokens == reasoning_tokens_of(request.prompt_token_ids)
    assert usage.prompt_tokens_details.cached_tokens == 7  # what the engine reported
    labels = {"api": "http", "method": route}
    assert counter(after, "gptoss_frontdoor_prompt_tokens_total", **labels) - \
        counter(before, "gptoss_frontdoor_prompt_tokens_total", **labels) == usage.prompt_tokens
    assert counter(after, "gptoss_frontdoor_completion_tokens_total", **labels) - \
        counter(before, "gptoss_frontdoor_completion_tokens_total", **labels) == usage.completion_tokens
    assert counter(after, "gptoss_frontdoor_requests_total", code="OK", **labels) - \
        counter(before, "gptoss_frontdoor_requests_total", code="OK", **labels) == 1
    assert request.request_id == "chat-1" and request.tenant == "acme"
    text = load_tokenizer().decode(request.prompt_token_ids)
    assert "Reasoning: high" in text and "Be brief." in text


def test_chat_and_grpc_chat_build_the_same_prompt(door, client):
    client.chat.completions.create(model=MODEL, messages=[{"role": "developer", "content": "Answer in French."},
                                                          {"role": "user", "content": "hello"}],
                                   tools=TOOLS, reasoning_effort="low", max_completion_tokens=50)
    http_request = door.handle.requests[-1]
    with grpc.insecure_channel(door.server.grpc_target) as channel:
        stub = pb_grpc.InferenceStub(channel)
        tool = pb.ToolDefinition(name="get_weather", description="Current weather in a city",
                                 parameters_json='{"type": "object", "properties": {"city": {"type": "string"}, '
                                                 '"unit": {"type": "string"}}, "required": ["city"]}')
        list(stub.Chat(pb.ChatRequest(
            messages=[pb.ChatMessage(role=pb.ROLE_DEVELOPER, content="Answer in French."),
                      pb.ChatMessage(role=pb.ROLE_USER, content="hello")],
            reasoning_effort=pb.REASONING_EFFORT_LOW, tools=[tool], sampling=pb.SamplingParams(max_tokens=50)),
            metadata=(("authorization", f"Bearer {KEY}"),), timeout=10))
    grpc_request = door.handle.requests[-1]
    assert http_request.prompt_token_ids == grpc_request.prompt_token_ids
    assert http_request.sampling.max_tokens == grpc_request.sampling.max_tokens == 50


def test_chat_stream_sends_reasoning_then_tool_call_argument_deltas_and_usage(door, client):
    door.handle.chunk_tokens = 0  # the engine hands the whole turn over in ONE chunk
    try:
        chunks = list(client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Weather in Paris?"}], tools=TOOLS, stream=True,
            stream_options={"include_usage": True}))
    finally:
        door.handle.chunk_tokens = 3
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert deltas[0].role == "assistant"
    reasoning = "".join(d.model_extra.get("reasoning_content") or "" for d in deltas)
    assert reasoning == CALL_REASONING
    calls = [call for d in deltas for call in (d.tool_calls or [])]
    assert calls[0].id.startswith("call_") and calls[0].function.name == "get_weather"
    argument_deltas = [c.function.arguments for c in calls[1:]]
    assert len(argument_deltas) > 3  # streamed while written, though the engine sent one chunk
    assert "".join(argument_deltas) == CALL_ARGUMENTS
    assert all(c.index == 0 for c in calls)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage.completion_tokens == len(completion_for(door.handle.requests[-1]
                                                                                       .prompt_token_ids))


def test_chat_tool_call_round_trip(client):
    first = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Weather in Paris?"}],
                                           tools=TOOLS, tool_choice="auto")
    call = first.choices[0].message.tool_calls[0]
    assert first.choices[0].finish_reason == "tool_calls" and call.function.arguments == CALL_ARGUMENTS
    assert first.choices[0].message.content is None
    messages = [{"role": "user", "content": "Weather in Paris?"}, first.choices[0].message.model_dump(exclude_none=True),
                {"role": "tool", "tool_call_id": call.id, "content": "18 C and sunny"}]
    second = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS)
    assert second.choices[0].message.content == "The tool said: 18 C and sunny. (user turns: 1)"
    assert second.choices[0].finish_reason == "stop"


def test_chat_logprobs_are_refused_by_an_engine_without_them(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], logprobs=True,
                                       top_logprobs=2)
    assert err.value.body["param"] == "top_logprobs"


# ─────────────────────────────────────── responses ───────────────────────────────────────

def test_response_streams_the_documented_events_and_is_stored(door, client):
    route = "/v1/responses"
    before = door.metrics()
    with client.responses.stream(model=MODEL, input="hello", instructions="Be brief.",
                                 reasoning={"effort": "low"}, max_output_tokens=200) as stream:
        events = [event for event in stream]
        final = stream.get_final_response()
    after = door.settled_metrics()
    types = [e.type for e in events]
    reasoning_deltas = types.count("response.reasoning_text.delta")
    text_deltas = types.count("response.output_text.delta")
    assert reasoning_deltas > 1 and text_deltas > 1
    assert types == (["response.created", "response.in_progress",
                      "response.output_item.added", "response.content_part.added"]
                     + ["response.reasoning_text.delta"] * reasoning_deltas
                     + ["response.reasoning_text.done", "response.content_part.done", "response.output_item.done",
                        "response.output_item.added", "response.content_part.added"]
                     + ["response.output_text.delta"] * text_deltas
                     + ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                        "response.completed"])
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert final.output_text == "You said: hello. (user turns: 1)"
    assert [item.type for item in final.output] == ["reasoning", "message"]
    assert final.output[0].content[0].text == REASONING
    request = door.handle.requests[-1]
    usage = final.usage
    assert usage.input_tokens == len(request.prompt_token_ids)
    assert usage.output_tokens == len(completion_for(request.prompt_token_ids))
    assert usage.output_tokens_details.reasoning_tokens == reasoning_tokens_of(request.prompt_token_ids)
    assert usage.input_tokens_details.cached_tokens == 7
    labels = {"api": "http", "method": route}
    assert counter(after, "gptoss_frontdoor_prompt_tokens_total", **labels) - \
        counter(before, "gptoss_frontdoor_prompt_tokens_total", **labels) == usage.input_tokens
    assert counter(after, "gptoss_frontdoor_completion_tokens_total", **labels) - \
        counter(before, "gptoss_frontdoor_completion_tokens_total", **labels) == usage.output_tokens
    stored = client.responses.retrieve(final.id)
    assert stored.id == final.id and stored.output_text == final.output_text and stored.usage == final.usage
    follow = client.responses.create(model=MODEL, input="and again", previous_response_id=final.id)
    assert follow.output_text == "You said: and again. (user turns: 2)" and follow.previous_response_id == final.id


def test_response_function_call_streams_arguments_and_round_trips(door, client):
    with client.responses.stream(model=MODEL, input="Weather in Paris?", tools=RESPONSE_TOOLS) as stream:
        events = [event for event in stream]
        final = stream.get_final_response()
    argument_deltas = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
    assert len(argument_deltas) > 3 and "".join(argument_deltas) == CALL_ARGUMENTS
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert done[0].arguments == CALL_ARGUMENTS and done[0].name == "get_weather"
    call = final.output[-1]
    assert call.type == "function_call" and call.name == "get_weather" and call.arguments == CALL_ARGUMENTS
    follow = client.responses.create(model=MODEL, previous_response_id=final.id, tools=RESPONSE_TOOLS,
                                     input=[{"type": "function_call_output", "call_id": call.call_id,
                                             "output": "18 C and sunny"}])
    assert follow.output_text == "The tool said: 18 C and sunny. (user turns: 1)"
    # The whole conversation, as items, works without a stored response too.
    again = client.responses.create(model=MODEL, store=False, tools=RESPONSE_TOOLS, input=[
        {"role": "user", "content": "Weather in Paris?"},
        {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": CALL_ARGUMENTS},
        {"type": "function_call_output", "call_id": "c1", "output": "rain"}])
    assert again.output_text == "The tool said: rain. (user turns: 1)"
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(again.id)  # store: false


def test_stored_responses_are_per_tenant_and_deletable(door, client):
    response = client.responses.create(model=MODEL, input="secret")
    with openai.OpenAI(base_url=door.base_url, api_key=OTHER_KEY, max_retries=0) as other:
        with pytest.raises(openai.NotFoundError):
            other.responses.retrieve(response.id)
        with pytest.raises(openai.NotFoundError) as err:
            other.responses.create(model=MODEL, input="x", previous_response_id=response.id)
        assert err.value.body["param"] == "previous_response_id"
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.cancel(response.id)  # only background responses can be cancelled; there are none
    assert err.value.body["param"] == "response_id"
    client.responses.delete(response.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(response.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(response.id)


# ─────────────────────────────────── completions, models ───────────────────────────────────

def test_completions_take_text_or_token_ids_and_models_list_the_one_served(door, client):
    text = client.completions.create(model=MODEL, prompt="<|start|>user<|message|>hi<|end|><|start|>assistant",
                                     max_tokens=4)
    assert text.choices[0].finish_reason == "length" and text.usage.completion_tokens == 4
    assert text.choices[0].text == "<|channel|>analysis<|message|>The"
    ids = client.completions.create(model=MODEL, prompt=list(door.handle.requests[-1].prompt_token_ids),
                                    max_tokens=4, stream=True, stream_options={"include_usage": True})
    chunks = list(ids)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text.choices[0].text
    assert chunks[-1].usage.prompt_tokens == text.usage.prompt_tokens
    assert [m.id for m in client.models.list()] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


# ───────────────────────────────────────── errors ─────────────────────────────────────────

@pytest.mark.parametrize("kwargs, param", [
    ({"temperature": -1}, "temperature"),
    ({"max_completion_tokens": 0}, "max_completion_tokens"),
    ({"max_tokens": 100000}, "max_tokens"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice.function.name"),
    ({"reasoning_effort": "extreme"}, "reasoning_effort"),
    ({"n": 2}, "n"),
    ({"stop": ["x"] * 17}, "stop"),
    ({"messages": [{"role": "tool", "tool_call_id": "nope", "content": "x"}]}, "messages[0].tool_call_id"),
])
def test_a_bad_chat_field_is_400_naming_it(client, kwargs, param):
    request = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **kwargs}
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(**request)
    assert err.value.status_code == 400
    assert err.value.body["param"] == param and err.value.body["type"] == "invalid_request_error"
    assert err.value.response.headers["x-request-id"]


@pytest.mark.parametrize("kwargs, param", [
    ({"input": []}, "input"),
    ({"max_output_tokens": -5}, "max_output_tokens"),
    ({"reasoning": {"effort": "max"}}, "reasoning.effort"),
    ({"text": {"format": {"type": "xml"}}}, "text.format.type"),
    ({"background": True, "store": False}, "store"),
    ({"background": "yes"}, "background"),
    ({"input": [{"type": "function_call_output", "call_id": "nope", "output": "x"}]}, "input[0].call_id"),
])
def test_a_bad_response_field_is_400_naming_it(client, kwargs, param):
    request = {"model": MODEL, "input": "hi", **kwargs}
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(**request)
    assert err.value.body["param"] == param


def test_unknown_model_is_404_and_auth_failures_are_401(door, client):
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert err.value.body["param"] == "model" and err.value.body["code"] == "model_not_found"
    for key in ("wrong-key-0123456789abcdef", ""):
        with openai.OpenAI(base_url=door.base_url, api_key=key or "x", max_retries=0,
                           default_headers={} if key else {"Authorization": ""}) as bad:
            with pytest.raises(openai.AuthenticationError) as err:
                bad.models.list()
            assert err.value.status_code == 401
            assert err.value.body["code"] == ("api_key_invalid" if key else "api_key_missing")


def test_malformed_json_is_400(door):
    request = urllib.request.Request(door.base_url + "/chat/completions", data=b"{not json", method="POST",
                                     headers={"authorization": f"Bearer {KEY}", "content-type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=10)
    assert err.value.code == 400 and err.value.headers["x-request-id"]
    assert json.loads(err.value.read())["error"]["param"] == "body"


def test_tenant_rate_limit_is_429_with_retry_after():
    door = ThreadedFrontdoor(HarmonyScriptHandle(), config(limits=LimitsConfig(requests_per_s=0.2, request_burst=1)),
                             api_keys=keys())
    try:
        with openai.OpenAI(base_url=door.base_url, api_key=KEY, max_retries=0) as client:
            client.models.list()
            with pytest.raises(openai.RateLimitError) as err:
                client.models.list()
        assert err.value.status_code == 429 and err.value.body["code"] == "tenant_rate_limited"
        assert 1 <= int(err.value.response.headers["retry-after"]) <= 5
        rejected = door.metrics()
        assert counter(rejected, "gptoss_frontdoor_rejected_requests_total", api="http", method="/v1/models",
                       reason="TENANT_RATE_LIMITED") == 1
    finally:
        door.close()


def test_engine_overload_is_429_and_draining_is_503():
    class Overloaded(HarmonyScriptHandle):
        def chunks_for(self, request):  # the replica refuses before its first chunk
            raise EngineOverloadedError(4, 4, retry_after_s=2.5)

    door = ThreadedFrontdoor(Overloaded(), config(), api_keys=keys())
    try:
        with openai.OpenAI(base_url=door.base_url, api_key=KEY, max_retries=0) as client:
            with pytest.raises(openai.RateLimitError) as err:
                client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                               stream=True)
            assert err.value.body["code"] == "model_overloaded" and err.value.response.headers["retry-after"] == "3"
            door.call(door.server.drain(0.1))
            with pytest.raises(openai.InternalServerError) as err:
                client.models.list()
            assert err.value.status_code == 503 and err.value.body["code"] == "draining"
            assert err.value.response.headers["retry-after"] == "1"
    finally:
        door.close()


def test_deadline_header_ends_a_slow_call_with_504():
    door = ThreadedFrontdoor(HarmonyScriptHandle(delay_s=0.2, endless=True), config(), api_keys=keys())
    try:
        with openai.OpenAI(base_url=door.base_url, api_key=KEY, max_retries=0) as client:
            started = time.monotonic()
            with pytest.raises(openai.APIStatusError) as err:
                client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                               extra_headers={"x-request-timeout": "0.5"})
            assert err.value.status_code == 504 and time.monotonic() - started < 3
        assert door.handle.requests[-1].deadline_s is not None  # the replica knows the deadline too
        deadline = time.monotonic() + 2
        while not door.handle.responses[-1].cancelled.is_set() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert door.handle.responses[-1].cancelled.is_set()
    finally:
        door.close()


# ─────────────────────────────────── cancel by disconnect ───────────────────────────────────

@pytest.mark.parametrize("api", ["chat", "responses"])
def test_a_client_that_disconnects_cancels_the_engine_request_within_a_second(api):
    door = ThreadedFrontdoor(HarmonyScriptHandle(chunk_tokens=2, delay_s=0.02, endless=True), config(),
                             api_keys=keys())
    try:
        with openai.OpenAI(base_url=door.base_url, api_key=KEY, max_retries=0) as client:
            if api == "chat":
                stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                        stream=True)
            else:
                stream = client.responses.create(model=MODEL, input="hi", stream=True)
            for i, _ in enumerate(stream):
                if i == 5:
                    break
            response = door.handle.responses[-1]
            assert not response.cancelled.is_set()
            closed_at = time.monotonic()
            stream.close()  # the SDK closes the HTTP connection
            cancelled = threading.Event()
            door.loop.call_soon_threadsafe(
                lambda: door.loop.create_task(response.cancelled.wait()).add_done_callback(
                    lambda _: cancelled.set()))
            assert cancelled.wait(1.0), "the replica stream was not cancelled within a second"
            print(f"{api}: cancelled {1000 * (time.monotonic() - closed_at):.0f} ms after the client disconnected")
        method = "/v1/chat/completions" if api == "chat" else "/v1/responses"
        snapshot = door.settled_metrics()
        assert counter(snapshot, "gptoss_frontdoor_requests_in_flight", api="http", method=method) == 0
        assert counter(snapshot, "gptoss_frontdoor_requests_total", api="http", method=method, code="CANCELLED") == 1
    finally:
        door.close()


@pytest.mark.parametrize("api", ["chat", "responses"])
def test_a_client_that_leaves_after_the_last_event_ends_an_answered_call(api, monkeypatch):
    """A client may close the connection once it has the last event ([DONE], response.completed)
    without reading the body's end. The answer was whole: the call counts as OK, not CANCELLED.
    The server is held after its last event here, so that the client's disconnect always comes first."""
    import http.client

    from cluster.frontdoor.http import app as http_app

    original = http_app.sse_writes

    async def held_after_the_last(*args, **kwargs):
        async for data in original(*args, **kwargs):
            yield data
        await asyncio.sleep(5.0)  # the client's disconnect arrives here

    monkeypatch.setattr(http_app, "sse_writes", held_after_the_last)
    door = ThreadedFrontdoor(HarmonyScriptHandle(chunk_tokens=3), config(), api_keys=keys())
    try:
        if api == "chat":
            path, last = "/chat/completions", "data: [DONE]"
            body = {"messages": [{"role": "user", "content": "hi"}], "stream_options": {"include_usage": True}}
        else:
            path, body, last = "/responses", {"input": "hi"}, "event: response.completed"
        connection = http.client.HTTPConnection("127.0.0.1", door.server.http_port, timeout=30)
        connection.request("POST", "/v1" + path, json.dumps({"model": MODEL, "stream": True, **body}),
                           {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
        response = connection.getresponse()
        lines = []
        while not (lines[-2:-1] == [last] or lines[-1:] == ["data: [DONE]"]):  # the last event read whole
            lines.append(response.readline().decode().rstrip("\n"))
        connection.close()  # without reading the body's end
        assert last in lines and any('"usage"' in line for line in lines)
        method = "/v1/chat/completions" if api == "chat" else "/v1/responses"
        snapshot = door.settled_metrics()
        labels = dict(api="http", method=method)
        assert counter(snapshot, "gptoss_frontdoor_requests_total", code="OK", **labels) == 1
        assert counter(snapshot, "gptoss_frontdoor_requests_total", code="CANCELLED", **labels) == 0
    finally:
        door.close()


def test_unknown_routes_and_methods_answer_in_the_error_shape(door):
    for method, path, status in (("GET", "/v1/nope", 404), ("GET", "/v1/chat/completions", 405)):
        request = urllib.request.Request(door.server.http_url + path, method=method)
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(request, timeout=10)
        assert err.value.code == status
        assert json.loads(err.value.read())["error"]["message"].startswith(f"{method} {path}")


def test_a_client_that_disconnects_before_a_non_streamed_answer_cancels_the_engine_request():
    """Raw HTTP here: the SDK gives no way to walk away from a non-streamed call mid-flight."""
    import socket

    door = ThreadedFrontdoor(HarmonyScriptHandle(chunk_tokens=2, delay_s=0.02, endless=True), config(),
                             api_keys=keys())
    try:
        body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}).encode()
        head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
        with socket.create_connection(("127.0.0.1", door.server.http_port)) as conn:
            conn.sendall(head + body)
            # tokens are flowing into the unfinished answer
            wait_until(lambda: door.handle.responses and door.handle.responses[-1].yielded >= 3, timeout=30)
        response = door.handle.responses[-1]
        deadline = time.monotonic() + 1.0
        while not response.cancelled.is_set() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert response.cancelled.is_set(), "the replica stream was not cancelled within a second"
    finally:
        door.close()
