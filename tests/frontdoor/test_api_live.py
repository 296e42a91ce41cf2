"""The gptoss.v1 contract against the live session cluster (real front door, Serve, tiny model):
every RPC, metadata conventions, deadlines, gzip, stop sequences, and error details."""

from __future__ import annotations

import time

import grpc
import pytest

from cluster.harmony.tokenizer import load_tokenizer
from gptoss.v1 import inference_pb2 as pb
from tests.frontdoor.status_details import bad_fields, details

pytestmark = pytest.mark.slow

PROMPT = [200006, 1428, 200008, 13225, 11, 2375, 0, 200007, 200006, 173781]
WEATHER = pb.ToolDefinition(name="get_weather", description="Current weather in a city",
                            parameters_json='{"type":"object","properties":{"city":{"type":"string"}}}')


def _error(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        result = call()
        if not isinstance(result, (pb.TokenizeResponse, pb.DetokenizeResponse, pb.GetLoadsResponse)):
            list(result)
    return info.value


def test_chat_with_a_tool_streams_tagged_deltas_and_usage(stub):
    request = pb.ChatRequest(messages=[pb.ChatMessage(role=pb.ROLE_USER, content="Weather in Paris?")],
                             tools=[WEATHER], reasoning_effort=pb.REASONING_EFFORT_LOW, return_token_ids=True,
                             sampling=pb.SamplingParams(max_tokens=12))
    responses = list(stub.Chat(request, timeout=60))
    deltas = [r.delta for r in responses if r.HasField("delta")]
    complete = responses[-1].complete
    # Random weights: raw, channel unspecified; every generated id rides on exactly one delta.
    assert all(d.raw and d.channel == pb.CHANNEL_UNSPECIFIED for d in deltas)
    assert sum(len(d.token_ids) for d in deltas) == complete.usage.completion_tokens == 12
    assert complete.usage.reasoning_tokens == 0
    # Earlier chats share the rendered system prompt: whole KV blocks of it may come from the cache.
    assert complete.usage.cached_prompt_tokens < complete.usage.prompt_tokens
    assert complete.usage.cached_prompt_tokens % 16 == 0
    # The tool definition was rendered into the prompt: it is longer than without the tool.
    without = list(stub.Chat(pb.ChatRequest(messages=request.messages, reasoning_effort=pb.REASONING_EFFORT_LOW,
                                            sampling=pb.SamplingParams(max_tokens=1)), timeout=60))
    assert complete.usage.prompt_tokens > without[-1].complete.usage.prompt_tokens + 10


def test_generate_on_text_returns_text_and_cuts_at_a_stop_sequence(stub):
    first = list(stub.Generate(pb.GenerateRequest(prompt_text="The sky is", sampling=pb.SamplingParams(
        max_tokens=24, ignore_stop=True)), timeout=60))
    text = "".join(r.chunk.text for r in first if r.HasField("chunk"))
    ids = [t for r in first if r.HasField("chunk") for t in r.chunk.token_ids]
    assert text == load_tokenizer().decode(ids)
    stop = text[len(text) // 2:len(text) // 2 + 3]
    assert stop.strip(), text
    cut = list(stub.Generate(pb.GenerateRequest(prompt_text="The sky is", sampling=pb.SamplingParams(
        max_tokens=24, stop=[stop])), timeout=60))
    complete = cut[-1].complete
    shown = "".join(r.chunk.text for r in cut if r.HasField("chunk"))
    assert shown == text[:text.index(stop)]
    assert (complete.finish_reason, complete.stop_sequence) == (pb.FINISH_REASON_STOP, stop)
    assert complete.usage.completion_tokens == sum(len(r.chunk.token_ids) for r in cut if r.HasField("chunk"))


def test_tokenize_and_detokenize_round_trip(stub):
    text = "<|start|>user<|message|>héllo, wörld"
    special = stub.Tokenize(pb.TokenizeRequest(text=text, allow_special_tokens=True), timeout=10).token_ids
    plain = stub.Tokenize(pb.TokenizeRequest(text=text), timeout=10).token_ids
    assert special[0] == 200006 and 200006 not in plain
    assert stub.Detokenize(pb.DetokenizeRequest(token_ids=special), timeout=10).text == text
    assert stub.Detokenize(pb.DetokenizeRequest(token_ids=special, skip_special_tokens=True),
                           timeout=10).text == "userhéllo, wörld"
    err = _error(lambda: stub.Detokenize(pb.DetokenizeRequest(token_ids=[5, 300000]), timeout=10))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and bad_fields(err) == ["token_ids[1]"]


def test_model_info_reports_layout_and_engine(stub):
    info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
    assert info.parallel.expert_parallel_size == 1 and info.parallel.tensor_parallel_size == 1
    assert info.engine == "torch" and info.supports_logprobs
    assert info.default_max_tokens == 256  # the replica's engine.default_max_tokens, whoever built the front door


def _idle_loads(stub, timeout_s: float = 30.0):
    """GetLoads once the replica runs and queues nothing (an earlier test's stream may still be ending)."""
    deadline = time.monotonic() + timeout_s
    while True:
        loads = stub.GetLoads(pb.GetLoadsRequest(), timeout=10)
        if loads.replicas and not loads.replicas[0].running_requests and not loads.replicas[0].waiting_requests:
            return loads
        assert time.monotonic() < deadline, f"replica still busy {timeout_s:.0f} s into the test: {loads}"
        time.sleep(0.05)


def test_get_loads_sees_a_running_stream(stub):
    idle = _idle_loads(stub)
    assert idle.expected_replicas == 1 and len(idle.replicas) == 1
    assert idle.replicas[0].replica_id and idle.replicas[0].HasField("kv_cache_usage")  # the paged cache
    call = stub.Generate(pb.GenerateRequest(prompt_token_ids=PROMPT, sampling=pb.SamplingParams(
        max_tokens=3000, ignore_stop=True)), timeout=60)
    next(call)
    busy = stub.GetLoads(pb.GetLoadsRequest(), timeout=10)
    call.cancel()
    assert busy.replicas[0].running_requests == idle.replicas[0].running_requests + 1
    assert busy.frontdoor_in_flight >= 1
    assert busy.replicas[0].generated_tokens_total > idle.replicas[0].generated_tokens_total
    assert busy.replicas[0].kv_cache_usage > idle.replicas[0].kv_cache_usage


def test_request_id_is_echoed_or_generated_and_tags_logs(stub, caplog):
    stream = stub.Generate(pb.GenerateRequest(prompt_token_ids=[1, 2], sampling=pb.SamplingParams(max_tokens=2)),
                           timeout=30, metadata=(("x-request-id", "client-id-42"), ("x-session-id", "s-1")))
    list(stream)
    assert dict(stream.initial_metadata())["x-request-id"] == "client-id-42"
    _, unary = stub.GetModelInfo.with_call(pb.GetModelInfoRequest(), timeout=10)
    generated = dict(unary.initial_metadata())["x-request-id"]
    assert len(generated) == 32 and generated != "client-id-42"
    with caplog.at_level("INFO", logger="cluster.frontdoor"):
        err = _error(lambda: stub.Generate(pb.GenerateRequest(prompt_token_ids=[]), timeout=10,
                                           metadata=(("x-request-id", "bad-one-7"),)))
    assert details(err)["RequestInfo"].request_id == "bad-one-7"
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("cluster.frontdoor")]
    assert lines and all("request_id=bad-one-7" in line for line in lines)
    err = _error(lambda: stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10,
                                           metadata=(("x-request-id", "spaces are bad"),)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and bad_fields(err) == ["x-request-id"]


def test_every_bad_field_is_named_at_once(stub):
    sampling = pb.SamplingParams(temperature=-1, top_p=2, stop=["", "x" * 300], logprobs=21)
    err = _error(lambda: stub.Chat(pb.ChatRequest(
        messages=[pb.ChatMessage(role=pb.ROLE_USER, content="hi")], sampling=sampling,
        tools=[pb.ToolDefinition(name="f", parameters_json="{not json")]), timeout=10))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert sorted(bad_fields(err)) == sorted(["tools[0].parameters_json", "sampling.stop[0]", "sampling.stop[1]",
                                              "sampling.logprobs", "sampling.temperature", "sampling.top_p"])
    err = _error(lambda: stub.Generate(pb.GenerateRequest(prompt_token_ids=[1], prompt_text="x"), timeout=10))
    assert bad_fields(err) == ["prompt_text"]


def test_undecodable_bytes_are_invalid_argument(grpc_channel):
    call = grpc_channel.unary_stream("/gptoss.v1.Inference/Generate", request_serializer=None,
                                     response_deserializer=None)
    err = _error(lambda: call(b"\xff\xff\xff\xff", timeout=10))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert details(err)["ErrorInfo"].reason == "MALFORMED_MESSAGE"
    assert "gptoss.v1.GenerateRequest" in err.details()


def test_deadline_stops_generation_in_the_replica(stub, ray_serving):
    stats = lambda: ray_serving.handle.stats.remote().result(timeout_s=30)  # noqa: E731
    before = stats()
    started = time.monotonic()
    err = _error(lambda: stub.Generate(pb.GenerateRequest(prompt_token_ids=PROMPT, sampling=pb.SamplingParams(
        max_tokens=3000, ignore_stop=True)), timeout=1.5))
    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 5
    deadline = time.monotonic() + 10
    while stats().active_requests != before.active_requests and time.monotonic() < deadline:
        time.sleep(0.05)
    assert stats().active_requests == before.active_requests


def test_replica_alone_enforces_the_deadline(ray_serving):
    """Without any front door: the deadline inside the request stops the replica's stream."""
    from cluster.engine.request import GenerateRequest, SamplingParams
    from cluster.frontdoor.errors import status_for

    request = GenerateRequest(prompt_token_ids=tuple(PROMPT), request_id="deadline-test",
                              sampling=SamplingParams(max_tokens=3000, ignore_stop=True),
                              deadline_s=time.time() + 1.0)
    got = 0
    with pytest.raises(Exception) as info:
        for chunk in ray_serving.handle.options(stream=True).generate.remote(request):
            got += len(chunk.token_ids)
    assert status_for(info.value).code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert 0 < got < 3000


def test_gzip_requests_are_accepted(frontdoor):
    with grpc.insecure_channel(frontdoor.target, compression=grpc.Compression.Gzip) as channel:
        from gptoss.v1 import inference_pb2_grpc as pb_grpc

        ids = pb_grpc.InferenceStub(channel).Tokenize(pb.TokenizeRequest(text="hello " * 200), timeout=10).token_ids
    assert len(ids) >= 200
