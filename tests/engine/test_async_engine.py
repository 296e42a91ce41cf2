"""The asyncio face of the engine: streams, admission under overload, cancellation."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch
from engine_fixtures import engine_model, one_intra_op_thread  # noqa: F401  (fixtures)

from cluster.engine.async_engine import AsyncEngine
from cluster.config import EngineConfig
from cluster.engine.core import EngineCore
from cluster.engine.errors import DeadlineExceededError, EngineOverloadedError, RequestTooLong
from cluster.engine.sequence import EndReason, SamplingSettings
from cluster.model.generate import greedy


def prompts_of(lengths, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture
def engine_factory(engine_model):
    engines = []

    def make(**config):
        engine = AsyncEngine(EngineCore(engine_model("tiny-small-vocab"), EngineConfig(block_size=4, **config)))
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.shutdown()


async def collect(engine, prompt, settings, request_id=None):
    tokens, chunks = [], []
    async for chunk in engine.generate(prompt, settings, request_id):
        chunks.append(chunk)
        tokens += chunk.token_ids
    return tokens, chunks


def test_streams_deliver_the_greedy_tokens_and_a_final_chunk(engine_factory, engine_model):
    model = engine_model("tiny-small-vocab")
    engine = engine_factory()
    prompts = prompts_of([5, 17, 40], model.config.vocab_size)
    settings = SamplingSettings(max_tokens=12, temperature=0.0, stop_token_ids=())

    async def main():
        return await asyncio.gather(*(collect(engine, p, settings) for p in prompts))

    results = asyncio.run(main())
    for prompt, (tokens, chunks) in zip(prompts, results):
        assert tokens == greedy(model, prompt, 12)
        assert chunks[-1].end_reason is EndReason.LENGTH and chunks[-1].num_output_tokens == 12
        assert all(c.end_reason is None for c in chunks[:-1])


def test_ten_times_the_queue_is_refused_promptly_and_the_rest_complete(engine_factory, engine_model):
    model = engine_model("tiny-small-vocab")
    engine = engine_factory(max_waiting_requests=4, max_num_seqs=2, max_num_batched_tokens=64)
    prompts = prompts_of([8 + i % 13 for i in range(40)], model.config.vocab_size, seed=1)
    settings = SamplingSettings(max_tokens=30, temperature=0.0, stop_token_ids=())

    # Submit all 40 at once: exactly the batch plus the queue (2 + 4) get in, although the step
    # loop has not pulled any into the batch yet (none can finish during the flood); the rest
    # must be refused at their first await.
    async def flood():
        streams = [engine.generate(p, settings, f"f{i}") for i, p in enumerate(prompts)]
        outcomes = await asyncio.gather(*(s.__anext__() for s in streams), return_exceptions=True)
        refused = [o for o in outcomes if isinstance(o, EngineOverloadedError)]
        finished = {}
        for i, (stream, first) in enumerate(zip(streams, outcomes)):
            if isinstance(first, BaseException):
                continue
            tokens = list(first.token_ids)
            async for chunk in stream:
                tokens += chunk.token_ids
            finished[i] = tokens
        return finished, refused

    finished, refused = asyncio.run(flood())
    assert len(finished) == 6 and len(refused) == 34
    assert all(r.retry_after_s > 0 for r in refused)
    for i, tokens in finished.items():
        assert tokens == greedy(model, prompts[i], 30)
    assert engine.stats().num_waiting == 0 and engine.stats().kv_blocks_used == 0


def test_refusal_is_immediate(engine_factory, engine_model):
    engine = engine_factory(max_waiting_requests=1, max_num_seqs=1, max_num_batched_tokens=8)
    prompt = prompts_of([30], engine_model("tiny-small-vocab").config.vocab_size)[0]
    long_run = SamplingSettings(max_tokens=200, temperature=0.0, stop_token_ids=())

    async def main():
        running = engine.generate(prompt, long_run, "running")
        await running.__anext__()  # admitted and decoding (max_num_seqs 1)
        waiting = engine.generate(prompt, long_run, "waiting")
        first_of_waiting = asyncio.create_task(waiting.__anext__())
        while engine.stats().num_waiting < 1:
            await asyncio.sleep(0.005)
        started = time.monotonic()
        with pytest.raises(EngineOverloadedError):
            await engine.generate(prompt, long_run, "refused").__anext__()
        elapsed = time.monotonic() - started
        first_of_waiting.cancel()
        await running.aclose()
        return elapsed

    assert asyncio.run(main()) < 0.05


def test_a_queued_request_whose_deadline_passes_is_dropped_without_closing_its_stream(engine_factory, engine_model):
    engine = engine_factory(max_num_seqs=1, max_num_batched_tokens=8)
    prompt = prompts_of([30], engine_model("tiny-small-vocab").config.vocab_size)[0]
    long_run = SamplingSettings(max_tokens=500, temperature=0.0, stop_token_ids=())

    async def main():
        running = engine.generate(prompt, long_run, "running")
        await running.__anext__()  # admitted and decoding; max_num_seqs 1 keeps the next one queued
        # The consumer waits on the stream with no timeout of its own: only the engine can end it.
        queued = engine.generate(prompt, long_run, "queued", deadline_s=time.time() + 0.2)
        with pytest.raises(DeadlineExceededError) as info:
            await asyncio.wait_for(queued.__anext__(), 10)
        stats = engine.stats()
        await running.aclose()
        return info.value, stats

    err, stats = asyncio.run(main())
    assert err.request_id == "queued" and 0 <= err.late_by_s < 5
    assert stats.num_waiting == 0 and stats.num_running == 1
    assert engine.cancelled_total == 2 and engine.finished_total == 0
    engine.shutdown()  # the step thread may still be applying the abort: join it before reading the pool
    engine.core.kv_cache.check_invariants()


def test_closing_a_stream_frees_its_blocks_at_the_next_step(engine_factory, engine_model):
    engine = engine_factory()
    prompt = prompts_of([40], engine_model("tiny-small-vocab").config.vocab_size)[0]

    async def main():
        stream = engine.generate(prompt, SamplingSettings(max_tokens=500, temperature=0.0, stop_token_ids=()))
        got = 0
        async for chunk in stream:
            got += len(chunk.token_ids)
            if got >= 3:
                break
        await stream.aclose()  # what a client disconnect does to the replica's generator
        used_while_running = engine.stats().kv_blocks_used
        for _ in range(200):
            if engine.stats().kv_blocks_used == 0 and engine.stats().num_running == 0:
                break
            await asyncio.sleep(0.01)
        return used_while_running, engine.stats()

    used_while_running, stats = asyncio.run(main())
    assert used_while_running > 0
    assert stats.kv_blocks_used == 0 and stats.num_running == 0 and stats.generation_tokens_total < 500
    engine.shutdown()
    engine.core.kv_cache.check_invariants()


def test_request_that_cannot_fit_is_refused_before_queueing(engine_factory, engine_model):
    engine = engine_factory(kv_cache_memory_mib=1 / 16)

    async def main():
        await engine.generate([1] * 50, SamplingSettings(max_tokens=4000), "big").__anext__()

    with pytest.raises(RequestTooLong):
        asyncio.run(main())
