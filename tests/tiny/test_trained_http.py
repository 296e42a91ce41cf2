"""The OpenAI HTTP API through the OFFICIAL `openai` Python package against a real server serving the
trained demo model: `python -m cluster serve` (default preset gpt-oss-tiny: Ray Serve replica,
torch engine, front door) as a user starts it. Harmony structure, tool calls and usage are asserted
on whatever the model writes (greedy); what it should SAY is asserted apart (test_content_*)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import urllib.request
from pathlib import Path

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cluster.sockets import free_port
from tests.serving.test_serve_cli import start_serve
from tests.tooling import NODE_DIR, missing
from tests.waiting import holds, wait_until

pytestmark = pytest.mark.slow

KEY = "tiny-key-0123456789abcdef"
WEATHER = {"name": "get_weather", "description": "Current weather in a city.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
CHAT_TOOLS = [{"type": "function", "function": WEATHER}]
RESPONSE_TOOLS = [{"type": "function", **WEATHER}]
WEATHER_RESULT = json.dumps({"temperature_c": 18, "sky": "sunny"})  # the result shape gpt-oss-tiny learned
GREEDY = {"temperature": 0}


class Server:
    def __init__(self, process: subprocess.Popen, banner: str, metrics_port: int) -> None:
        self.process = process
        self.base_url = banner.split("| HTTP ")[1].split()[0] + "/v1"
        self.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url, api_key=KEY, max_retries=0, timeout=120)

    def metrics(self) -> dict:
        text = urllib.request.urlopen(self.metrics_url, timeout=10).read().decode()
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    def tokens(self, route: str) -> tuple[float, float]:
        """The front door's (prompt, completion) token counters of an HTTP route."""
        snapshot, labels = self.metrics(), (("api", "http"), ("method", route))
        return (snapshot.get(("gptoss_frontdoor_prompt_tokens_total", labels), 0.0),
                snapshot.get(("gptoss_frontdoor_completion_tokens_total", labels), 0.0))

    def replica(self, name: str) -> float:
        """A gptoss_replica_* gauge or counter, summed over replicas (the engine's own numbers)."""
        return sum(v for (n, _), v in self.metrics().items() if n == name)


@pytest.fixture(scope="module")
def server(cache_dir):
    ray_tmp = Path(tempfile.mkdtemp(prefix="gt"))  # Ray's socket paths must stay short
    config = ray_tmp / "config.yaml"
    config.write_text("frontdoor:\n  load_poll_interval_s: 0.2\n")  # the replica metrics, fresh for the cancel test
    env = dict(os.environ, GPTOSS_CACHE_DIR=str(cache_dir), GPTOSS_RAY_TEMP_DIR=str(ray_tmp), GPTOSS_RAY_NUM_CPUS="2",
               GPTOSS_API_KEYS=f"acme:{KEY}")
    metrics_port = free_port()
    process, banner = start_serve(env, free_port(), metrics_port, "--config", str(config))
    try:
        assert "serving gpt-oss-tiny" in banner  # the default preset: the trained model
        yield Server(process, banner, metrics_port)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(30)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


# ───────────────────────────────────────── chat ─────────────────────────────────────────

def test_chat_answers_with_reasoning_apart_and_usage_equal_to_the_counters(server):
    before = server.tokens("/v1/chat/completions")
    with server.client() as client:
        completion = client.chat.completions.create(model="gpt-oss-tiny", messages=user("Repeat after me: hello world"),
                                                    max_completion_tokens=200, **GREEDY)
    after = server.tokens("/v1/chat/completions")
    choice = completion.choices[0]
    assert choice.finish_reason == "stop" and not choice.message.tool_calls
    assert choice.message.reasoning_content.strip() and choice.message.content.strip()
    assert "<|" not in choice.message.content + choice.message.reasoning_content  # parsed, not raw harmony
    usage = completion.usage
    assert (usage.prompt_tokens, usage.completion_tokens) == (after[0] - before[0], after[1] - before[1])
    assert 0 < usage.completion_tokens_details.reasoning_tokens < usage.completion_tokens


def test_chat_streams_reasoning_before_the_answer_and_the_same_turn_as_unstreamed(server):
    request = {"model": "gpt-oss-tiny", "messages": user("Repeat after me: hello world"),
               "max_completion_tokens": 200, **GREEDY}
    with server.client() as client:
        whole = client.chat.completions.create(**request).choices[0].message
        before = server.tokens("/v1/chat/completions")
        chunks = list(client.chat.completions.create(**request, stream=True, stream_options={"include_usage": True}))
    after = server.tokens("/v1/chat/completions")
    kinds = []
    for chunk in chunks[:-1]:
        delta = chunk.choices[0].delta
        if getattr(delta, "reasoning_content", None):
            kinds.append("reasoning")
        if delta.content:
            kinds.append("content")
    assert kinds.count("reasoning") > 1 and kinds.count("content") > 1
    assert kinds == sorted(kinds, key=["reasoning", "content"].index)  # all reasoning first, never interleaved
    reasoning = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks[:-1])
    content = "".join(c.choices[0].delta.content or "" for c in chunks[:-1])
    assert (reasoning, content) == (whole.reasoning_content, whole.content)  # greedy: the same turn
    usage = chunks[-1].usage
    assert not chunks[-1].choices and (usage.prompt_tokens, usage.completion_tokens) == \
        (after[0] - before[0], after[1] - before[1])


def test_chat_tool_call_streams_json_arguments_and_round_trips_to_an_answer(server):
    messages = user("What is the weather in Paris?")
    before = server.tokens("/v1/chat/completions")
    with server.client() as client:
        chunks = list(client.chat.completions.create(model="gpt-oss-tiny", messages=messages, tools=CHAT_TOOLS,
                                                     max_completion_tokens=200, stream=True,
                                                     stream_options={"include_usage": True}, **GREEDY))
        after = server.tokens("/v1/chat/completions")
        deltas = [call for c in chunks if c.choices for call in c.choices[0].delta.tool_calls or []]
        assert deltas and deltas[0].id and deltas[0].function.name
        arguments = "".join(d.function.arguments or "" for d in deltas)
        assert sum(1 for d in deltas if d.function.arguments) > 1  # streamed while written, not in one piece
        assert isinstance(json.loads(arguments).get("city"), str)  # JSON with the schema's required key
        assert chunks[-2].choices[0].finish_reason == "tool_calls"
        usage = chunks[-1].usage
        assert (usage.prompt_tokens, usage.completion_tokens) == (after[0] - before[0], after[1] - before[1])
        call = {"id": deltas[0].id, "type": "function",
                "function": {"name": deltas[0].function.name, "arguments": arguments}}
        answer = client.chat.completions.create(
            model="gpt-oss-tiny", tools=CHAT_TOOLS, max_completion_tokens=200, **GREEDY,
            messages=messages + [{"role": "assistant", "tool_calls": [call]},
                                 {"role": "tool", "tool_call_id": deltas[0].id, "content": WEATHER_RESULT}])
    assert answer.choices[0].finish_reason == "stop" and answer.choices[0].message.content.strip()
    assert answer.usage.prompt_tokens > usage.prompt_tokens  # the call and its result were rendered


# ─────────────────────────────────────── responses ───────────────────────────────────────

def test_response_streams_reasoning_then_message_with_usage_equal_to_the_counters(server):
    before = server.tokens("/v1/responses")
    with server.client() as client:
        with client.responses.stream(model="gpt-oss-tiny", input="Repeat after me: green house",
                                     max_output_tokens=200, **GREEDY) as stream:
            events = list(stream)
            final = stream.get_final_response()
    after = server.tokens("/v1/responses")
    types = [e.type for e in events]
    assert types[:2] == ["response.created", "response.in_progress"] and types[-1] == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert types.index("response.reasoning_text.done") < types.index("response.output_text.delta")
    assert [item.type for item in final.output] == ["reasoning", "message"]
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text.strip() and text == final.output_text and "<|" not in text
    usage = final.usage
    assert (usage.input_tokens, usage.output_tokens) == (after[0] - before[0], after[1] - before[1])
    assert 0 < usage.output_tokens_details.reasoning_tokens < usage.output_tokens


def test_response_function_call_round_trip_through_previous_response_id(server):
    with server.client() as client:
        with client.responses.stream(model="gpt-oss-tiny", input="What is the weather in Paris?",
                                     tools=RESPONSE_TOOLS, max_output_tokens=200, **GREEDY) as stream:
            events = list(stream)
            first = stream.get_final_response()
        call = first.output[-1]
        assert [item.type for item in first.output] == ["reasoning", "function_call"]
        assert isinstance(json.loads(call.arguments).get("city"), str) and call.call_id
        streamed = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
        assert len(streamed) > 1 and "".join(streamed) == call.arguments
        answer = client.responses.create(model="gpt-oss-tiny", previous_response_id=first.id, tools=RESPONSE_TOOLS,
                                         max_output_tokens=200, **GREEDY,
                                         input=[{"type": "function_call_output", "call_id": call.call_id,
                                                 "output": WEATHER_RESULT}])
    assert answer.output[-1].type == "message" and answer.output_text.strip()
    assert answer.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens - 1


def test_a_background_cancel_stops_the_engine_request(server):
    """The engine's own numbers: its running batch empties and it generates no more tokens."""
    with server.client() as client:
        before = server.replica("gptoss_replica_generation_tokens_total")
        created = client.responses.create(model="gpt-oss-tiny", input="Count to a thousand", background=True,
                                          max_output_tokens=3000, extra_body={"ignore_eos": True})
        wait_until(lambda: server.replica("gptoss_replica_running_requests") == 1, 60, 0.1, "the response running")
        wait_until(lambda: server.replica("gptoss_replica_generation_tokens_total") > before, 30, 0.1,
                   "the response decoding")
        cancelled = client.responses.cancel(created.id)
        assert cancelled.status == "cancelled"
        wait_until(lambda: server.replica("gptoss_replica_running_requests") == 0, 10, 0.1,
                   "the engine's running batch empty after the cancel")
        # Once in about ten runs the counter still moved in the reports just after the batch read
        # empty (cause not found): it must settle, far below max_output_tokens, and then stay.
        generated = wait_until(lambda: settled(lambda: server.replica("gptoss_replica_generation_tokens_total")),
                               10, 0.1, "the engine's token count settling after the cancel")
        assert generated - before < 1000, "the engine decoded on towards max_output_tokens after the cancel"
        holds(lambda: server.replica("gptoss_replica_generation_tokens_total") == generated, 0.6, 0.1,
              "the engine generated tokens after the cancel (three load reports, 0.2 s apart)")
        assert client.responses.retrieve(created.id).status == "cancelled"


def settled(read, duration: float = 0.6):
    """`read()`'s value if it stays the same for `duration` seconds (the next load reports), else None."""
    first = read()
    try:
        holds(lambda: read() == first, duration, 0.1)
    except AssertionError:
        return None
    return first


def test_node_openai_sdk_chats_calls_a_tool_and_streams_responses(server):
    """The official npm package (tests/node/openai_client.mjs, greedy) on the same server."""
    node = shutil.which("node")
    if node is None:
        missing("node")
    if not (NODE_DIR / "node_modules" / "openai").is_dir():
        missing("tests/node/node_modules/openai (npm ci --prefix tests/node)")
    result = subprocess.run([node, str(NODE_DIR / "openai_client.mjs"), server.base_url, KEY, "gpt-oss-tiny", "0"],
                            cwd=NODE_DIR, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["chat"]["content"].strip() and report["chat"]["reasoning"].strip()
    assert 0 < report["chat"]["usage"]["completion_tokens_details"]["reasoning_tokens"] < \
        report["chat"]["usage"]["completion_tokens"]
    call = report["toolCall"]
    assert call["finish"] == "tool_calls" and call["name"] and call["argumentDeltas"] > 1
    assert isinstance(json.loads(call["arguments"]).get("city"), str)
    assert report["toolAnswer"].strip()
    events = report["responses"]["events"]
    assert events[:2] == ["response.created", "response.in_progress"] and events[-1] == "response.completed"
    assert events.index("response.reasoning_text.done") < events.index("response.output_text.delta")
    assert report["responses"]["followUp"].strip()
    errors = report["errors"]
    assert (errors["badField"]["status"], errors["unknownModel"]["status"], errors["unknownResponse"]["status"],
            errors["badKey"]["status"]) == (400, 404, 404, 401)


# ─────────────────── what the model should say (once it is trained enough) ───────────────────

def test_content_repeat_after_me(server):
    with server.client() as client:
        chat = client.chat.completions.create(model="gpt-oss-tiny", messages=user("Repeat after me: hello world"),
                                              max_completion_tokens=200, **GREEDY)
        response = client.responses.create(model="gpt-oss-tiny", input="Repeat after me: green house",
                                           max_output_tokens=200, **GREEDY)
    assert chat.choices[0].message.content.strip() == "hello world"
    assert response.output_text.strip() == "green house"


def test_content_the_weather_tool_is_called_with_the_city_asked_and_its_result_answered(server):
    with server.client() as client:
        chat = client.chat.completions.create(model="gpt-oss-tiny", messages=user("What is the weather in Paris?"),
                                              tools=CHAT_TOOLS, max_completion_tokens=200, **GREEDY)
        (call,) = chat.choices[0].message.tool_calls
        assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
        first = client.responses.create(model="gpt-oss-tiny", input="What is the weather in Tokyo?",
                                        tools=RESPONSE_TOOLS, max_output_tokens=200, **GREEDY)
        call = first.output[-1]
        assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Tokyo"}
        answer = client.responses.create(model="gpt-oss-tiny", previous_response_id=first.id, tools=RESPONSE_TOOLS,
                                         max_output_tokens=200, **GREEDY,
                                         input=[{"type": "function_call_output", "call_id": call.call_id,
                                                 "output": json.dumps({"temperature_c": 18, "sky": "sunny"})}])
    assert "18" in answer.output_text
