"""TorchEngine: coalescing, stop conditions, cancellation and validation, on scripted token
streams (to control timing) and on the real tiny model (for token parity)."""

from __future__ import annotations

import asyncio
import pickle
import threading
import time

import pytest

from cluster.engine.errors import EngineOverloadedError, InvalidRequestError
from cluster.engine.request import FinishReason, GenerateRequest, ModelLimits, SamplingParams
from cluster.engine.torch_engine import TorchEngine

LIMITS = ModelLimits(vocab_size=1000, context_length=64)


class ScriptedStream:
    """A token stream like decode_stream: yields `tokens`, sleeping `delays[i]` before token i."""

    def __init__(self, tokens, delays=None):
        self.tokens = list(tokens)
        self.delays = delays or [0.0] * len(self.tokens)
        self.produced = 0
        self.calls = []

    def __call__(self, prompt, max_new_tokens, *, stop_token_ids=(), **sampling):
        self.calls.append(dict(prompt=prompt, max_new_tokens=max_new_tokens, stop_token_ids=stop_token_ids, **sampling))

        def gen():
            for i, token in enumerate(self.tokens[:max_new_tokens]):
                time.sleep(self.delays[i])
                self.produced += 1
                yield token
                if token in stop_token_ids:
                    return
        return gen()


async def collect(engine, request):
    return [chunk async for chunk in engine.generate(request)]


def request(prompt=(1, 2, 3), **sampling):
    return GenerateRequest(prompt_token_ids=tuple(prompt), sampling=SamplingParams(**sampling), request_id="t")


def test_tokens_ready_together_travel_in_one_chunk():
    # First token at once, then a burst of 9 within the 50 ms interval: two chunks, not ten.
    stream = ScriptedStream(range(10, 20), delays=[0.0] + [0.002] * 9)
    engine = TorchEngine(stream, LIMITS, chunk_interval_s=0.05)
    chunks = asyncio.run(collect(engine, request(max_tokens=10)))
    assert [t for c in chunks for t in c.token_ids] == list(range(10, 20))
    assert len(chunks) <= 3
    assert chunks[-1].finish_reason is FinishReason.LENGTH
    assert (chunks[-1].prompt_tokens, chunks[-1].completion_tokens) == (3, 10)


def test_stop_token_ends_the_stream_and_defaults_apply():
    stream = ScriptedStream([5, 6, 7, 8, 9])
    engine = TorchEngine(stream, LIMITS, stop_token_ids=(7,), default_max_tokens=4)
    chunks = asyncio.run(collect(engine, request()))
    assert [t for c in chunks for t in c.token_ids] == [5, 6, 7]
    assert chunks[-1].finish_reason is FinishReason.STOP
    assert stream.calls[0]["max_new_tokens"] == 4 and stream.calls[0]["stop_token_ids"] == (7,)
    # request stop ids replace the defaults; ignore_stop drops all of them
    asyncio.run(collect(engine, request(stop_token_ids=(9,))))
    assert stream.calls[1]["stop_token_ids"] == (9,)
    asyncio.run(collect(engine, request(ignore_stop=True, max_tokens=5)))
    assert stream.calls[2]["stop_token_ids"] == ()


def test_sampling_params_reach_the_stream():
    stream = ScriptedStream([5])
    engine = TorchEngine(stream, LIMITS)
    asyncio.run(collect(engine, request(max_tokens=1, temperature=0.7, top_p=0.9, top_k=40, seed=11)))
    call = stream.calls[0]
    assert (call["temperature"], call["top_p"], call["top_k"], call["seed"]) == (0.7, 0.9, 40, 11)


def test_closing_the_stream_stops_decoding_at_the_next_token():
    stream = ScriptedStream(range(100, 160), delays=[0.01] * 60)
    engine = TorchEngine(stream, ModelLimits(1000, 100), chunk_interval_s=0.0)

    async def consume_some():
        agen = engine.generate(request(max_tokens=60))
        seen = 0
        async for chunk in agen:
            seen += len(chunk.token_ids)
            if seen >= 5:
                break
        await agen.aclose()
        assert engine.stats().active_requests == 0
        return seen

    asyncio.run(consume_some())
    produced_at_close = stream.produced
    time.sleep(0.1)
    assert stream.produced <= produced_at_close + 1  # at most the step that was running
    stats = engine.stats()
    assert (stats.cancelled_total, stats.finished_total, stats.active_requests) == (1, 0, 0)
    assert stats.tokens_generated_total <= produced_at_close + 1 < 60


def test_task_cancellation_stops_decoding():
    stream = ScriptedStream(range(100, 160), delays=[0.01] * 60)
    engine = TorchEngine(stream, ModelLimits(1000, 100))

    async def main():
        async def consume():
            async for _ in engine.generate(request(max_tokens=60)):
                pass
        task = asyncio.create_task(consume())
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    produced = stream.produced
    time.sleep(0.1)
    assert stream.produced <= produced + 1 < 60
    assert engine.stats().cancelled_total == 1


def test_an_error_in_the_model_reaches_the_caller():
    def broken(prompt, max_new_tokens, **kw):
        yield 1
        raise RuntimeError("boom")

    engine = TorchEngine(broken, LIMITS)
    with pytest.raises(RuntimeError, match="boom"):
        asyncio.run(collect(engine, request(max_tokens=5)))
    assert engine.stats().failed_total == 1 and engine.stats().active_requests == 0


def test_overload_is_refused_with_a_typed_error():
    release = threading.Event()

    def slow(prompt, max_new_tokens, **kw):
        release.wait(5)
        yield 1

    engine = TorchEngine(slow, LIMITS, max_active_requests=1)

    async def main():
        first = engine.generate(request(max_tokens=1))
        task = asyncio.create_task(first.__anext__())
        await asyncio.sleep(0.05)
        with pytest.raises(EngineOverloadedError):
            await engine.generate(request(max_tokens=1)).__anext__()
        release.set()
        await task
        await first.aclose()

    asyncio.run(main())


@pytest.mark.parametrize("req, field", [
    (request(prompt=()), "prompt_token_ids"),
    (request(prompt=(1, 1000)), "prompt_token_ids[1]"),
    (request(prompt=(1, -1)), "prompt_token_ids[1]"),
    (request(max_tokens=0), "sampling.max_tokens"),
    (request(max_tokens=62), "sampling.max_tokens"),  # 3 prompt + 62 > 64
    (request(top_k=-1), "sampling.top_k"),
    (request(temperature=float("nan")), "sampling.temperature"),
    (request(stop_token_ids=(1, 5000)), "sampling.stop_token_ids[1]"),
    (request(prompt=range(64)), "prompt_token_ids"),
])
def test_invalid_requests_raise_naming_the_field(req, field):
    engine = TorchEngine(ScriptedStream([1]), LIMITS)
    with pytest.raises(InvalidRequestError) as info:
        asyncio.run(collect(engine, req))
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}: ")
    assert engine.stats().requests_total == 0


def test_errors_survive_pickling():
    err = pickle.loads(pickle.dumps(InvalidRequestError("prompt_token_ids[3]", "bad")))
    assert (err.field, str(err)) == ("prompt_token_ids[3]", "prompt_token_ids[3]: bad")
    over = pickle.loads(pickle.dumps(EngineOverloadedError(3, 3)))
    assert (over.active, over.limit) == (3, 3)


def test_real_model_matches_greedy(tiny_model):
    from cluster.harmony.tokenizer import STOP_TOKEN_IDS
    from cluster.model.generate import greedy

    engine = TorchEngine.for_model(tiny_model, stop_token_ids=STOP_TOKEN_IDS)
    prompt = [200006, 1428, 200008, 13225]
    chunks = asyncio.run(collect(engine, request(prompt=prompt, max_tokens=16)))
    assert [t for c in chunks for t in c.token_ids] == greedy(tiny_model, prompt, 16, stop_token_ids=STOP_TOKEN_IDS)
    assert engine.limits == ModelLimits(201088, tiny_model.config.max_position_embeddings)
