"""A real gpt-oss turn of several harmony messages reaches the client whole: the torch engine
(BatchingEngine over EngineCore, the replica's engine) behind a real grpc.aio front door and client.

The one double is the model's forward: `ScriptedForward` puts all probability on the next token
of a completion rendered by openai-harmony. The tiny model's random weights never emit harmony,
and a trained gpt-oss cannot run here, so without it no test would see what a real model does:
close its analysis with <|end|>, open the next message with <|start|>assistant, and end the turn
with <|return|> or <|call|>. It plugs in where expert parallelism plugs its worker group in
(EngineCore's forward_factory), so scheduling, sampling, stop tokens and chunking are the engine's own.
"""

from __future__ import annotations

import asyncio
import itertools

import openai_harmony as oh
import pytest
import torch
from test_servicer import ScriptedHandle, with_server

from cluster.engine.async_engine import AsyncEngine
from cluster.engine.batching_engine import BatchingEngine
from cluster.config import EngineConfig
from cluster.engine.core import EngineCore
from cluster.harmony.tokenizer import load_tokenizer
from cluster.model.config import GptOssConfig
from cluster.model.paged import PagedBatch
from cluster.model.transformer import GptOssModel
from gptoss.v1 import inference_pb2 as pb

USER = oh.Message.from_role_and_content(oh.Role.USER, "What is the weather in Paris?")
ANALYSIS = oh.Message.from_role_and_content(
    oh.Role.ASSISTANT, "The user wants the weather; I should call get_weather.").with_channel("analysis")
PREAMBLE = oh.Message.from_role_and_content(oh.Role.ASSISTANT, "Let me look that up.").with_channel("commentary")
FINAL = oh.Message.from_role_and_content(oh.Role.ASSISTANT, "It is sunny in Paris, 24 °C.").with_channel("final")
TOOL_CALL = (oh.Message.from_role_and_content(oh.Role.ASSISTANT, '{"city": "Paris"}').with_channel("commentary")
             .with_recipient("functions.get_weather").with_content_type("<|constrain|>json"))
WEATHER_TOOL = pb.ToolDefinition(name="get_weather", description="Current weather in a city",
                                 parameters_json='{"type": "object", "properties": {"city": {"type": "string"}}}')


def harmony_turn(messages: list[oh.Message]) -> list[list[int]]:
    """The completion tokens of an assistant turn, one list per message, as openai-harmony renders
    it: the first message without the `<|start|>assistant` the prompt already ends with, the last
    one closed the way a model ends its turn (<|return|> after a final answer, <|call|> after a call)."""
    encoding = load_tokenizer()._encoding
    *inner, last = messages
    rendered = [encoding.render(m) for m in inner]
    rendered.append(encoding.render_conversation_for_training(oh.Conversation.from_messages([last])))
    prompt_end = encoding.render_conversation_for_completion(oh.Conversation.from_messages([]), oh.Role.ASSISTANT)
    assert rendered[0][:len(prompt_end)] == prompt_end
    rendered[0] = rendered[0][len(prompt_end):]
    return rendered


class ScriptedForward:
    """The model's forward for one request at a time: hidden states whose unembedding puts the
    highest logit on the next token of `completion`.

    A forward returns hidden states; the engine's runner unembeds them with the model's own
    unembedding. So the script writes that weight: each token of the completion gets a distinct
    pair of hidden dimensions (row = e_i + e_j), every other row is zero, and the hidden state for
    a token is its own pair. Its logit is then 2, any other scripted token's at most 1, the rest 0.

    The first row it samples is the prompt's last position; each later position is one more
    completion token. Asked for more tokens than the script has, it fails the step (the engine
    should have stopped)."""

    def __init__(self, completion: list[int], model) -> None:
        self.completion = completion
        self.first_position: int | None = None
        hidden_size = model.config.hidden_size
        pairs = itertools.combinations(range(hidden_size), 2)
        self.codes: dict[int, torch.Tensor] = {}
        weight = model.unembedding.weight
        with torch.no_grad():
            weight.zero_()
            for token in dict.fromkeys(completion):
                i, j = next(pairs)
                code = torch.zeros(hidden_size)
                code[i] = code[j] = 1.0
                weight[token] = code
                self.codes[token] = code

    def factory(self, spec, num_blocks):  # EngineCore's forward_factory
        return self

    def __call__(self, batch: PagedBatch) -> torch.Tensor:
        positions = batch.positions[batch.logits_indices].tolist()
        rows = []
        for position in positions:
            if self.first_position is None:
                self.first_position = position
            step = position - self.first_position
            assert step < len(self.completion), \
                f"the engine asked for token {step + 1} of a {len(self.completion)}-token script"
            rows.append(self.codes[self.completion[step]])
        return torch.stack(rows)  # [R, H]


@pytest.fixture(scope="module")
def scripted_model():
    """A tiny-shaped model of this module's own: only its cache layout and its unembedding (which
    ScriptedForward rewrites, so it must not be the session's shared tiny_model) are used."""
    return GptOssModel(GptOssConfig.from_preset("tiny"))


class EngineResponse:
    """What a Serve handle's streaming call returns, over the engine in this process."""

    def __init__(self, engine: BatchingEngine, request) -> None:
        self._stream = engine.generate(request)

    def cancel(self) -> None:
        pass  # the front door closes its iteration; BatchingEngine.generate aborts in its finally

    def __aiter__(self):
        return self._stream


def over_engine(model, completion: list[int], rpc: str, request) -> list:
    """The responses of one `rpc` call ("Chat" or "Generate") through a real front door whose
    replica is the real engine over a ScriptedForward of `completion`."""
    forward = ScriptedForward(completion, model)
    engine = BatchingEngine(AsyncEngine(EngineCore(model, EngineConfig(block_size=16, chunk_interval_ms=0),
                                                   forward.factory)))
    try:
        handle = ScriptedHandle(lambda generate_request: EngineResponse(engine, generate_request))

        async def body(stub):
            return [r async for r in getattr(stub, rpc)(request, timeout=30)]

        return asyncio.run(with_server(handle, body))
    finally:
        engine.shutdown()


def chat(model, completion: list[int], request: pb.ChatRequest) -> list[pb.ChatResponse]:
    return over_engine(model, completion, "Chat", request)


def channel_texts(responses) -> list[tuple[int, str]]:
    """(channel, text) of each message, in order, from the deltas."""
    messages, current = [], []
    for r in responses:
        if not r.HasField("delta"):
            continue
        assert not r.delta.raw, "the parser gave up on harmony output"
        current.append(r.delta)
        if r.delta.message_end:
            messages.append((current[0].channel, "".join(d.text for d in current)))
            current = []
    assert not current, "a message never ended"
    return messages


def ask(**fields) -> pb.ChatRequest:
    return pb.ChatRequest(messages=[pb.ChatMessage(role=pb.ROLE_USER, content=USER.content[0].text)], **fields)


def test_analysis_then_final_answer_reaches_the_client(scripted_model):
    segments = harmony_turn([ANALYSIS, FINAL])
    completion = [t for s in segments for t in s]
    responses = chat(scripted_model, completion, ask())

    assert channel_texts(responses) == [(pb.CHANNEL_ANALYSIS, ANALYSIS.content[0].text),
                                        (pb.CHANNEL_FINAL, FINAL.content[0].text)]
    complete = responses[-1].complete
    assert complete.finish_reason == pb.FINISH_REASON_STOP
    assert complete.usage.completion_tokens == len(completion)
    assert complete.usage.reasoning_tokens == len(segments[0])  # the analysis message, header and <|end|> included


def test_analysis_then_tool_call_ends_the_turn_with_the_call(scripted_model):
    segments = harmony_turn([ANALYSIS, TOOL_CALL])
    completion = [t for s in segments for t in s]
    responses = chat(scripted_model, completion, ask(tools=[WEATHER_TOOL]))

    assert channel_texts(responses) == [(pb.CHANNEL_ANALYSIS, ANALYSIS.content[0].text),
                                        (pb.CHANNEL_COMMENTARY, '{"city": "Paris"}')]
    calls = [r.delta.tool_call for r in responses if r.HasField("delta") and r.delta.HasField("tool_call")]
    assert [(c.name, c.arguments_json, c.recipient) for c in calls] == [
        ("get_weather", '{"city": "Paris"}', "functions.get_weather")]
    complete = responses[-1].complete
    assert complete.finish_reason == pb.FINISH_REASON_TOOL_CALL
    assert complete.usage.completion_tokens == len(completion)
    assert complete.usage.reasoning_tokens == len(segments[0])


def test_commentary_preamble_then_final_answer(scripted_model):
    segments = harmony_turn([PREAMBLE, FINAL])
    completion = [t for s in segments for t in s]
    responses = chat(scripted_model, completion, ask(tools=[WEATHER_TOOL]))

    assert channel_texts(responses) == [(pb.CHANNEL_COMMENTARY, PREAMBLE.content[0].text),
                                        (pb.CHANNEL_FINAL, FINAL.content[0].text)]
    assert not any(r.delta.HasField("tool_call") for r in responses if r.HasField("delta"))
    complete = responses[-1].complete
    assert complete.finish_reason == pb.FINISH_REASON_STOP
    assert complete.usage.completion_tokens == len(completion)
    assert complete.usage.reasoning_tokens == 0  # a preamble is not reasoning


def generate(model, completion: list[int], request: pb.GenerateRequest) -> list[pb.GenerateResponse]:
    return over_engine(model, completion, "Generate", request)


def streamed_ids(responses) -> list[int]:
    return [t for r in responses if r.HasField("chunk") for t in r.chunk.token_ids]


def test_generate_keeps_its_default_of_stopping_at_every_message_end(scripted_model):
    segments = harmony_turn([ANALYSIS, FINAL])
    completion = [t for s in segments for t in s]
    prompt = load_tokenizer().encode("<|start|>user<|message|>Hi<|end|><|start|>assistant", allow_special=True)

    one_message = generate(scripted_model, completion, pb.GenerateRequest(prompt_token_ids=prompt))
    assert streamed_ids(one_message) == segments[0]  # the analysis, ending in <|end|>
    assert one_message[-1].complete.finish_reason == pb.FINISH_REASON_STOP

    whole_turn = generate(scripted_model, completion, pb.GenerateRequest(
        prompt_token_ids=prompt, sampling=pb.SamplingParams(stop_token_ids=[200002, 200012])))
    assert streamed_ids(whole_turn) == completion
