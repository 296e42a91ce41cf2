"""End to end through real parts: a gRPC client -> grpc.aio front door -> DeploymentHandle ->
ModelReplica on a real Ray cluster -> BatchingEngine (continuous batching) -> the tiny gpt-oss checkpoint."""

from __future__ import annotations

import threading
import time
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cluster.harmony.tokenizer import load_tokenizer
from cluster.model.generate import greedy
from gptoss.v1 import inference_pb2 as pb
from tests.serving.replica_probe import replica_stats, wait_idle
from tests.waiting import holds, wait_until

pytestmark = pytest.mark.slow

PROMPT = [200006, 1428, 200008, 13225, 11, 2375, 0, 200007, 200006, 173781]
STOP_TOKEN_IDS = load_tokenizer().message_end_ids  # what Generate stops at by default


def collect_generate(stub, prompt, max_tokens, **kwargs):
    """(tokens, number of chunks, complete message) of one Generate call."""
    tokens, chunks, complete = [], 0, None
    request = pb.GenerateRequest(prompt_token_ids=prompt, sampling=pb.SamplingParams(max_tokens=max_tokens))
    for response in stub.Generate(request, timeout=120, **kwargs):
        if response.HasField("chunk"):
            tokens.extend(response.chunk.token_ids)
            chunks += 1
        else:
            assert complete is None, "exactly one complete message ends a stream"
            complete = response.complete
    return tokens, chunks, complete


def test_generate_streams_the_same_tokens_as_greedy(stub, tiny_model):
    expected = greedy(tiny_model, PROMPT, 48, stop_token_ids=STOP_TOKEN_IDS)
    tokens, chunks, complete = collect_generate(stub, PROMPT, 48)
    assert tokens == expected
    assert chunks >= 1
    assert complete.usage.prompt_tokens == len(PROMPT)
    assert complete.usage.completion_tokens == len(expected)
    stopped = expected[-1] in STOP_TOKEN_IDS
    assert complete.finish_reason == (pb.FINISH_REASON_STOP if stopped else pb.FINISH_REASON_LENGTH)


def test_generate_honours_explicit_stop_tokens(stub, tiny_model):
    """Stop at the 5th greedy token by naming it a stop token; the stream ends with it."""
    expected = greedy(tiny_model, PROMPT, 20)
    stop = expected[4]
    cut = expected[: expected.index(stop) + 1]
    request = pb.GenerateRequest(prompt_token_ids=PROMPT,
                                 sampling=pb.SamplingParams(max_tokens=20, stop_token_ids=[stop]))
    responses = list(stub.Generate(request, timeout=60))
    tokens = [t for r in responses if r.HasField("chunk") for t in r.chunk.token_ids]
    assert tokens == cut
    assert responses[-1].complete.finish_reason == pb.FINISH_REASON_STOP


def test_chat_on_random_weights_streams_raw_flagged_text(stub):
    request = pb.ChatRequest(messages=[pb.ChatMessage(role=pb.ROLE_USER, content="What is the capital of France?")],
                             reasoning_effort=pb.REASONING_EFFORT_LOW, sampling=pb.SamplingParams(max_tokens=24))
    responses = list(stub.Chat(request, timeout=60))
    deltas = [r.delta for r in responses if r.HasField("delta")]
    assert deltas, "the stream carries text"
    assert "".join(d.text for d in deltas).strip()
    # Random weights do not speak harmony: the text must be flagged raw, with no channel claimed.
    assert all(d.raw and d.channel == pb.CHANNEL_UNSPECIFIED for d in deltas if d.text)
    complete = responses[-1].complete
    assert complete.usage.completion_tokens == 24
    assert complete.usage.prompt_tokens > 10  # the rendered harmony prompt, not the bare question
    assert complete.finish_reason == pb.FINISH_REASON_LENGTH


def test_get_model_info_describes_the_model(stub, tiny_model):
    info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
    c = tiny_model.config
    assert info.model_name == "gpt-oss-tiny-test"
    assert (info.vocab_size, info.context_length, info.num_layers) == (201088, c.max_position_embeddings,
                                                                     c.num_hidden_layers)
    assert (info.num_experts, info.experts_per_token) == (c.num_local_experts, c.num_experts_per_tok)
    assert info.quantization == pb.QUANTIZATION_MXFP4
    assert (info.engine, info.dtype, info.replicas) == ("torch", "float32", 1)


def test_health_reports_serving(grpc_channel):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    health = health_pb2_grpc.HealthStub(grpc_channel)
    for service in ("", "gptoss.v1.Inference"):
        response = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_inference_service(grpc_channel):
    from google.protobuf.descriptor_pool import DescriptorPool
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    database = ProtoReflectionDescriptorDatabase(grpc_channel)
    assert "gptoss.v1.Inference" in database.get_services()
    service = DescriptorPool(database).FindServiceByName("gptoss.v1.Inference")
    assert {m.name for m in service.methods} == {"Generate", "Chat", "Tokenize", "Detokenize", "GetModelInfo",
                                                "GetLoads"}


def _tokens_after_stop(ray_serving, before, started: float, stopped):
    """How the replica's generation ended after a call was stopped (`stopped` returns the replica's
    stats at that moment): (tokens it generated after the stop, tokens it generated before it, the
    seconds from `started` to the stop). Polls until the replica is idle, then checks the token
    counter stays frozen."""
    at_stop = stopped()
    ran_s = time.monotonic() - started

    def idle():
        stats = replica_stats(ray_serving)
        return stats if stats.active_requests == before.active_requests else None

    frozen = wait_until(idle, 30, message="the replica still generates after the call ended").tokens_generated_total
    # Must not happen: tokens after the request left the batch (a few load reports' time).
    holds(lambda: replica_stats(ray_serving).tokens_generated_total == frozen, 0.3, message="tokens after idle")
    return frozen - at_stop.tokens_generated_total, at_stop.tokens_generated_total - before.tokens_generated_total, \
        ran_s


def test_client_cancel_stops_generation_in_the_replica(stub, ray_serving):
    before = wait_idle(ray_serving)
    request = pb.GenerateRequest(prompt_token_ids=PROMPT, sampling=pb.SamplingParams(max_tokens=3000, ignore_stop=True))
    started = time.monotonic()
    call = stub.Generate(request, timeout=120)
    received = 0
    for response in call:
        received += len(response.chunk.token_ids)
        if received >= 20:
            break

    def cancel():
        stats = replica_stats(ray_serving)
        assert stats.active_requests == before.active_requests + 1
        call.cancel()
        return stats

    after, during, ran_s = _tokens_after_stop(ray_serving, before, started, cancel)
    # Generation stops promptly, measured against this run's own pace (the box may be loaded):
    # after the cancel the replica makes fewer tokens than it made to get the first 20 out.
    print(f"cancel: {after} tokens after it, {during} in the {ran_s * 1000:.0f} ms before")
    assert after < max(during, 20), f"{after} tokens after the cancel, {during} before it"
    assert replica_stats(ray_serving).cancelled_total == before.cancelled_total + 1


def test_deadline_exceeded_stops_generation(stub, ray_serving):
    before = wait_idle(ray_serving)
    request = pb.GenerateRequest(prompt_token_ids=PROMPT, sampling=pb.SamplingParams(max_tokens=3000, ignore_stop=True))
    started = time.monotonic()

    def expire():
        with pytest.raises(grpc.RpcError) as info:
            for _ in stub.Generate(request, timeout=0.5):
                pass
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        return replica_stats(ray_serving)

    after, during, ran_s = _tokens_after_stop(ray_serving, before, started, expire)
    print(f"deadline: {after} tokens after it, {during} in the {ran_s * 1000:.0f} ms before")
    assert during < 3000  # the deadline, not max_tokens, ended it
    assert after < max(during, 20), f"{after} tokens after the deadline, {during} before it"


def test_sixteen_concurrent_streams_all_complete_correctly(stub, tiny_model):
    prompts = [[100 + i, 2000 + 7 * i, 31 * i + 5] for i in range(16)]
    expected = [greedy(tiny_model, p, 24, stop_token_ids=STOP_TOKEN_IDS) for p in prompts]
    results: list = [None] * 16

    def run(i):
        results[i] = collect_generate(stub, prompts[i], 24)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(16)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    elapsed = time.monotonic() - started
    for i, result in enumerate(results):
        assert result is not None, f"stream {i} did not finish"
        tokens, chunks, complete = result
        assert tokens == expected[i], f"stream {i} differs"
        assert complete is not None
    total_chunks = sum(r[1] for r in results)
    total_tokens = sum(len(r[0]) for r in results)
    print(f"16 streams: {total_tokens} tokens in {total_chunks} chunks, {elapsed:.2f} s")


def _invalid(call):
    with pytest.raises(grpc.RpcError) as info:
        result = call()
        list(result) if not isinstance(result, pb.GetModelInfoResponse) else None
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    return info.value


def _bad_request_fields(err) -> list[str]:
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    status = rpc_status.from_call(err)
    fields = []
    for detail in status.details:
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):  # other details (RequestInfo) ride along
            fields += [v.field for v in bad.field_violations]
    return fields


@pytest.mark.parametrize("prompt, sampling, field, words", [
    ([], {}, "prompt_token_ids", "must not be empty"),
    ([1, 2, 3, 250000], {}, "prompt_token_ids[3]", "250000 is outside the vocabulary [0, 201088)"),
    ([1, 2], {"max_tokens": -5}, "sampling.max_tokens", "must be >= 1"),
    ([1, 2], {"max_tokens": 0}, "sampling.max_tokens", "must be >= 1"),
    ([1, 2], {"max_tokens": 2_000_000_000}, "sampling.max_tokens", "exceeds"),
    ([1, 2], {"top_p": 1.5}, "sampling.top_p", "(0, 1]"),
    ([1, 2], {"temperature": -1.0}, "sampling.temperature", "must be in"),
])
def test_generate_rejects_bad_input_naming_the_field(stub, prompt, sampling, field, words):
    request = pb.GenerateRequest(prompt_token_ids=prompt, sampling=pb.SamplingParams(**sampling))
    err = _invalid(lambda: stub.Generate(request, timeout=30))
    assert err.details().startswith(f"{field}: ")
    assert words in err.details()
    assert "Traceback" not in err.details()
    assert _bad_request_fields(err) == [field]


@pytest.mark.parametrize("messages, field", [
    ([], "messages"),
    ([pb.ChatMessage(role=pb.ROLE_UNSPECIFIED, content="hi")], "messages[0].role"),
    ([pb.ChatMessage(role=pb.ROLE_USER, content="hi"), pb.ChatMessage(role=42, content="x")], "messages[1].role"),
    ([pb.ChatMessage(role=pb.ROLE_ASSISTANT, content="x", channel=42)], "messages[0].channel"),
])
def test_chat_rejects_bad_messages_naming_the_field(stub, messages, field):
    request = pb.ChatRequest(messages=messages)
    err = _invalid(lambda: stub.Chat(request, timeout=30))
    assert err.details().startswith(f"{field}: "), err.details()
    assert _bad_request_fields(err) == [field]


def test_a_normal_request_succeeds_after_bad_ones(stub):
    _invalid(lambda: stub.Generate(pb.GenerateRequest(prompt_token_ids=[]), timeout=30))
    tokens, _, complete = collect_generate(stub, [1, 2, 3], 4)
    assert len(tokens) == complete.usage.completion_tokens >= 1


def _scrape(frontdoor) -> dict[tuple[str, tuple], float]:
    port = frontdoor.server.metrics_port
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return values


def test_metrics_count_requests_codes_and_tokens(stub, frontdoor):
    def value(snapshot, name, **labels):
        return snapshot.get((name, tuple(sorted(labels.items()))), 0.0)

    before = _scrape(frontdoor)
    for i in range(3):
        collect_generate(stub, [10 + i, 20, 30], 5)
    _invalid(lambda: stub.Generate(pb.GenerateRequest(prompt_token_ids=[]), timeout=30))
    stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
    after = _scrape(frontdoor)

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("gptoss_frontdoor_requests_total", api="grpc", method="Generate", code="OK") == 3
    assert delta("gptoss_frontdoor_requests_total", api="grpc", method="Generate", code="INVALID_ARGUMENT") == 1
    assert delta("gptoss_frontdoor_requests_total", api="grpc", method="GetModelInfo", code="OK") == 1
    assert delta("gptoss_frontdoor_prompt_tokens_total", api="grpc", method="Generate") == 9
    assert delta("gptoss_frontdoor_completion_tokens_total", api="grpc", method="Generate") == 15
    assert delta("gptoss_frontdoor_time_to_first_token_seconds_count", api="grpc", method="Generate") == 3
    assert delta("gptoss_frontdoor_inter_token_latency_seconds_count", api="grpc", method="Generate") == 12
    assert value(after, "gptoss_frontdoor_requests_in_flight", api="grpc", method="Generate") == 0


def test_replica_validates_too_and_its_typed_error_survives_ray(ray_serving):
    """Defense in depth: a request that skipped the front door is refused by the engine, and the
    error keeps its type and field across Ray, so the front door would still map it."""
    from cluster.engine.errors import InvalidRequestError
    from cluster.engine.request import GenerateRequest, SamplingParams
    from cluster.frontdoor.errors import status_for

    bad = GenerateRequest(prompt_token_ids=(1, 2, 999_999), sampling=SamplingParams(max_tokens=3))
    with pytest.raises(Exception) as info:
        for _ in ray_serving.handle.options(stream=True).generate.remote(bad):
            pass
    status = status_for(info.value)
    assert status.code == grpc.StatusCode.INVALID_ARGUMENT
    assert status.field == "prompt_token_ids[2]"
    assert isinstance(info.value, InvalidRequestError)
