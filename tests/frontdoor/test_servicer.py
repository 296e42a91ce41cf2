"""The servicer's mapping through a real grpc.aio server and client, with the Serve handle
replaced by a scripted replica (no Ray): harmony parsing into channels, cancellation of the
downstream call, and error codes raised mid-stream."""

from __future__ import annotations

import asyncio
import dataclasses

import grpc
import pytest
from prometheus_client import CollectorRegistry
from ray import exceptions as ray_exceptions

from cluster.config import FrontdoorConfig
from cluster.engine.errors import EngineOverloadedError
from cluster.engine.request import FinishReason, TokenChunk
from cluster.frontdoor.server import FrontdoorServer
from cluster.harmony.tokenizer import load_tokenizer
from cluster.metrics import FrontdoorMetrics
from cluster.serving.model_info import ModelInfo
from gptoss.v1 import inference_pb2 as pb
from gptoss.v1 import inference_pb2_grpc as pb_grpc

INFO = ModelInfo(model_name="scripted", preset="", vocab_size=201088, context_length=4096, num_layers=1,
                 num_experts=1, experts_per_token=1, quantization="none", dtype="float32", engine="scripted",
                 replicas=1)


class ScriptedResponse:
    """Stands in for a DeploymentResponseGenerator: yields scripted chunks, records cancel()."""

    def __init__(self, chunks, *, delay_s=0.0, error=None):
        self.chunks, self.delay_s, self.error = chunks, delay_s, error
        self.cancelled = asyncio.Event()

    def cancel(self):
        self.cancelled.set()

    async def __aiter__(self):
        for chunk in self.chunks:
            await asyncio.sleep(self.delay_s)
            yield chunk
        if self.error is not None:
            raise self.error


class ScriptedHandle:
    """Stands in for a Serve DeploymentHandle (generate streams scripted per test)."""

    app_name, deployment_name = "scripted", "ScriptedReplica"

    def __init__(self, response_factory, info=INFO):
        self.requests, self.responses = [], []
        self._factory = response_factory
        handle = self

        class _Generate:
            def remote(self, request):
                handle.requests.append(request)
                handle.responses.append(handle._factory(request))
                return handle.responses[-1]

        class _ModelInfo:
            async def remote(self):
                return info

        self.generate, self.model_info = _Generate(), _ModelInfo()

    def options(self, **kwargs):
        return self


def chunked(ids, size, finish=FinishReason.STOP, prompt_tokens=0):
    pieces = [ids[i:i + size] for i in range(0, len(ids), size)]
    chunks = [TokenChunk(tuple(p)) for p in pieces[:-1]]
    chunks.append(TokenChunk(tuple(pieces[-1]), finish, prompt_tokens=prompt_tokens, completion_tokens=len(ids)))
    return chunks


async def with_server(handle, body, metrics=None, **config):
    server = FrontdoorServer(handle, FrontdoorConfig(grpc_port=0, metrics_port=-1, http_port=-1, **config),
                             metrics or FrontdoorMetrics(CollectorRegistry()), bind_to_loop=False)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(server.grpc_target) as channel:
            return await body(pb_grpc.InferenceStub(channel))
    finally:
        await server.stop(0.1)


def test_chat_maps_harmony_output_to_channel_deltas():
    completion = load_tokenizer().encode(
        "<|channel|>analysis<|message|>User asks for the capital. Easy.<|end|>"
        "<|start|>assistant<|channel|>final<|message|>Paris is the capital of France.<|return|>", allow_special=True)
    handle = ScriptedHandle(lambda request: ScriptedResponse(
        chunked(completion, 3, prompt_tokens=len(request.prompt_token_ids))))

    async def body(stub):
        request = pb.ChatRequest(messages=[pb.ChatMessage(role=pb.ROLE_USER, content="Capital of France?")],
                                 reasoning_effort=pb.REASONING_EFFORT_HIGH)
        return [r async for r in stub.Chat(request, timeout=10)]

    responses = asyncio.run(with_server(handle, body))
    deltas = [r.delta for r in responses if r.HasField("delta")]
    text = {channel: "".join(d.text for d in deltas if d.channel == channel)
            for channel in (pb.CHANNEL_ANALYSIS, pb.CHANNEL_FINAL)}
    assert text == {pb.CHANNEL_ANALYSIS: "User asks for the capital. Easy.",
                    pb.CHANNEL_FINAL: "Paris is the capital of France."}
    assert not any(d.raw for d in deltas)
    assert [d.channel for d in deltas if d.message_end] == [pb.CHANNEL_ANALYSIS, pb.CHANNEL_FINAL]
    complete = responses[-1].complete
    assert complete.finish_reason == pb.FINISH_REASON_STOP
    assert complete.usage.completion_tokens == len(completion)
    # The replica got the rendered harmony prompt, with the requested reasoning effort in it.
    prompt_text = load_tokenizer().decode(handle.requests[0].prompt_token_ids)
    assert "Reasoning: high" in prompt_text and "Capital of France?" in prompt_text
    assert prompt_text.endswith("<|start|>assistant")


def test_chat_flags_output_that_is_not_harmony_as_raw():
    tokenizer = load_tokenizer()
    completion = tokenizer.encode("just some words, no structure at all")
    handle = ScriptedHandle(lambda request: ScriptedResponse(chunked(completion, 2, FinishReason.LENGTH)))

    async def body(stub):
        request = pb.ChatRequest(messages=[pb.ChatMessage(role=pb.ROLE_USER, content="hi")])
        return [r async for r in stub.Chat(request, timeout=10)]

    responses = asyncio.run(with_server(handle, body))
    deltas = [r.delta for r in responses if r.HasField("delta")]
    assert all(d.raw and not d.channel for d in deltas)
    assert "".join(d.text for d in deltas) == "just some words, no structure at all"
    assert responses[-1].complete.finish_reason == pb.FINISH_REASON_LENGTH


def test_generate_relays_chunks_and_maps_sampling():
    handle = ScriptedHandle(lambda request: ScriptedResponse(chunked([7, 8, 9, 10, 11], 2, FinishReason.LENGTH, 3)))

    async def body(stub):
        sampling = pb.SamplingParams(max_tokens=5, temperature=0.5, top_p=0.8, top_k=7, seed=3, stop_token_ids=[11])
        request = pb.GenerateRequest(prompt_token_ids=[1, 2, 3], sampling=sampling)
        return [r async for r in stub.Generate(request, timeout=10, metadata=(("x-request-id", "r1"),))]

    responses = asyncio.run(with_server(handle, body))
    assert [list(r.chunk.token_ids) for r in responses[:-1]] == [[7, 8], [9, 10], [11]]
    assert responses[-1].complete.usage == pb.Usage(prompt_tokens=3, completion_tokens=5)
    assert handle.requests[0].deadline_s is not None  # the call's deadline travels with the request
    sent = handle.requests[0]
    assert sent.request_id == "r1" and sent.prompt_token_ids == (1, 2, 3)
    s = sent.sampling
    assert (s.max_tokens, s.top_k, s.seed, s.stop_token_ids) == (5, 7, 3, (11,))
    assert s.temperature == pytest.approx(0.5) and s.top_p == pytest.approx(0.8)
    # A stream that finished is not cancelled afterwards (that costs the replica a cancellation).
    assert not handle.responses[0].cancelled.is_set()


def test_request_id_comes_back_in_the_initial_metadata_of_a_stream():
    # The id is sent while the request is routed (not before), and still ahead of the first chunk.
    handle = ScriptedHandle(lambda request: ScriptedResponse(chunked([7, 8], 1, FinishReason.LENGTH, 1)))

    async def body(stub):
        call = stub.Generate(pb.GenerateRequest(prompt_token_ids=[1]), timeout=10,
                             metadata=(("x-request-id", "rid-7"),))
        metadata = await call.initial_metadata()
        return dict(metadata), [r async for r in call]

    metadata, responses = asyncio.run(with_server(handle, body))
    assert metadata["x-request-id"] == "rid-7"
    assert [list(r.chunk.token_ids) for r in responses[:-1]] == [[7], [8]]


def test_client_cancel_cancels_the_downstream_call():
    endless = [TokenChunk((1,))] * 10_000
    handle = ScriptedHandle(lambda request: ScriptedResponse(endless, delay_s=0.01))

    async def body(stub):
        call = stub.Generate(pb.GenerateRequest(prompt_token_ids=[1, 2]), timeout=10)
        async for _ in call:
            break
        call.cancel()
        await asyncio.wait_for(handle.responses[0].cancelled.wait(), timeout=1.0)
        return True

    assert asyncio.run(with_server(handle, body))


@pytest.mark.parametrize("error, code", [
    (ray_exceptions.RayActorError(), grpc.StatusCode.UNAVAILABLE),
    (EngineOverloadedError(1, 1), grpc.StatusCode.RESOURCE_EXHAUSTED),
    (RuntimeError("secret internals"), grpc.StatusCode.INTERNAL),
])
def test_errors_mid_stream_end_with_their_status(error, code):
    handle = ScriptedHandle(lambda request: ScriptedResponse([TokenChunk((1, 2))], error=error))

    async def body(stub):
        got = []
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for response in stub.Generate(pb.GenerateRequest(prompt_token_ids=[1]), timeout=10):
                got.append(response)
        return got, info.value

    got, err = asyncio.run(with_server(handle, body, migration_attempts=0))
    assert [list(r.chunk.token_ids) for r in got] == [[1, 2]]
    assert err.code() == code
    assert "secret" not in err.details() and "Traceback" not in err.details()


class PositionReplica:
    """A scripted replica whose next token is the position it lands at (a deterministic model: a
    resumed request continues exactly where the lost one stopped); it dies after `dies_after`
    tokens, as a replica whose process is killed."""

    def __init__(self, request, dies_after=None, error=None):
        self.request, self.dies_after = request, dies_after
        self.error = error or ray_exceptions.ActorDiedError()
        self.cancelled = asyncio.Event()

    def cancel(self):
        self.cancelled.set()

    async def __aiter__(self):
        start = len(self.request.prompt_token_ids)
        total = self.request.sampling.max_tokens
        for i in range(total):
            if self.dies_after is not None and i == self.dies_after:
                raise self.error
            await asyncio.sleep(0.001)
            last = i == total - 1
            yield TokenChunk((start + i,), FinishReason.LENGTH if last else None,
                             prompt_tokens=start, completion_tokens=i + 1)


def _generate_all(stub_call_args):
    async def body(stub):
        ids = []
        async for response in stub.Generate(*stub_call_args, timeout=10):
            if response.HasField("chunk"):
                ids += response.chunk.token_ids
            else:
                complete = response.complete
        return ids, complete
    return body


def test_a_stream_whose_replica_dies_resumes_on_another_with_nothing_lost_or_repeated():
    deaths = [5, 3]  # the first replica dies after 5 tokens, the next after 3 more, the third lives
    handle = ScriptedHandle(lambda request: PositionReplica(request, deaths.pop(0) if deaths else None))
    request = pb.GenerateRequest(prompt_token_ids=[7, 7, 7], sampling=pb.SamplingParams(max_tokens=12, seed=5))

    ids, complete = asyncio.run(with_server(handle, _generate_all((request,))))
    assert ids == list(range(3, 15))  # positions 3..14: one stream, no token lost or repeated
    assert complete.finish_reason == pb.FINISH_REASON_LENGTH and complete.usage.completion_tokens == 12
    assert complete.usage.prompt_tokens == 3  # the client's prompt, not the resumed one
    first, second, third = handle.requests
    assert second.prompt_token_ids == (7, 7, 7, 3, 4, 3 + 2, 6, 7) and second.sampling.max_tokens == 7
    assert third.prompt_token_ids == second.prompt_token_ids + (8, 9, 10) and third.sampling.max_tokens == 4
    assert len({first.sampling.seed, second.sampling.seed, third.sampling.seed}) == 3  # a fresh draw each time
    assert second.deadline_s == first.deadline_s and second.request_id == first.request_id


def test_migration_gives_up_after_its_attempts_with_unavailable():
    handle = ScriptedHandle(lambda request: PositionReplica(request, dies_after=2))
    request = pb.GenerateRequest(prompt_token_ids=[1], sampling=pb.SamplingParams(max_tokens=50))

    async def body(stub):
        got = []
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for response in stub.Generate(request, timeout=10):
                got += response.chunk.token_ids
        return got, info.value

    got, err = asyncio.run(with_server(handle, body, migration_attempts=2))
    assert got == list(range(1, 7))  # 2 tokens from each of the 3 replicas, in order
    assert err.code() == grpc.StatusCode.UNAVAILABLE and len(handle.requests) == 3


def _constrained_stream(dies_after: int, resumes_constrained: bool):
    """(handle, metrics, prompt, request): a json_object Generate of 10 tokens whose first replica
    dies after `dies_after` tokens, on an engine that does or does not resume grammars."""
    from cluster.harmony.render import Message, render_prompt

    deaths = [dies_after]
    handle = ScriptedHandle(lambda request: PositionReplica(request, deaths.pop(0) if deaths else None),
                            info=dataclasses.replace(INFO, resumes_constrained=resumes_constrained))
    metrics = FrontdoorMetrics(CollectorRegistry())
    prompt = render_prompt([Message("user", "Answer in JSON.")], reasoning_effort="low")
    request = pb.GenerateRequest(prompt_token_ids=prompt, sampling=pb.SamplingParams(max_tokens=10),
                                 response_format=pb.ResponseFormat(json_object=pb.JsonObjectFormat()))
    return handle, metrics, prompt, request


def _migration_outcomes(metrics) -> dict[str, float]:
    return {s.labels["outcome"]: s.value for m in metrics.migrations_total.collect() for s in m.samples
            if s.name.endswith("_total")}


@pytest.mark.parametrize("resumes_constrained", [True, False])
def test_a_constrained_stream_migrates_only_to_an_engine_that_resumes_its_grammar(resumes_constrained):
    """torch (ModelInfo.resumes_constrained): the rest goes out with resumed_tokens = the tokens sent,
    for the engine to advance the turn's grammar over them. vLLM (False): the stream is not resumed
    (a grammar restarted after the sent tokens would break the answer); it ends UNAVAILABLE with
    RetryInfo after the tokens it had, counted as outcome `constrained`."""
    from tests.frontdoor.status_details import details

    handle, metrics, prompt, request = _constrained_stream(3, resumes_constrained)

    async def body(stub):
        got = []
        try:
            async for response in stub.Generate(request, timeout=10):
                got += response.chunk.token_ids
        except grpc.aio.AioRpcError as err:
            return got, err
        return got, None

    got, err = asyncio.run(with_server(handle, body, metrics=metrics))
    outcomes = _migration_outcomes(metrics)
    n = len(prompt)
    if resumes_constrained:
        assert err is None and got == list(range(n, n + 10))
        first, rest = handle.requests
        assert rest.constraint == first.constraint and rest.constraint.active
        assert first.resumed_tokens == 0 and rest.resumed_tokens == 3 and rest.sampling.max_tokens == 7
        assert outcomes == {"resumed": 1}
    else:
        assert got == list(range(n, n + 3)) and len(handle.requests) == 1
        assert err.code() == grpc.StatusCode.UNAVAILABLE
        assert details(err)["RetryInfo"].retry_delay.ToTimedelta().total_seconds() > 0
        assert outcomes == {"constrained": 1}


def test_a_constrained_stream_lost_before_its_first_token_starts_afresh_even_where_grammars_do_not_resume():
    """vLLM (resumes_constrained False) cannot advance a grammar over sent tokens, but none were sent:
    a replica whose engine died (and which Serve has not replaced yet) fails the stream at once, and
    the same request goes to another replica, its grammar from the start; the client sees nothing."""
    handle, metrics, prompt, request = _constrained_stream(0, resumes_constrained=False)

    ids, complete = asyncio.run(with_server(handle, _generate_all((request,)), metrics=metrics))
    n = len(prompt)
    assert ids == list(range(n, n + 10)) and complete.usage.completion_tokens == 10
    first, again = handle.requests
    assert again.prompt_token_ids == first.prompt_token_ids and again.resumed_tokens == 0
    assert again.constraint == first.constraint and again.constraint.active
    outcomes = _migration_outcomes(metrics)
    assert outcomes == {"resumed": 1}
