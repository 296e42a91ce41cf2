"""BatchingEngine: the Engine protocol over the batching engine - defaults, finish reasons,
cancellation, statistics, logprobs, overload hints and a dead step loop."""

from __future__ import annotations

import asyncio

import pytest
import torch
from engine_fixtures import engine_model, one_intra_op_thread  # noqa: F401  (fixtures)

from cluster.engine.batching_engine import BatchingEngine
from cluster.config import EngineConfig
from cluster.engine.errors import EngineDead, EngineOverloadedError, InvalidRequestError
from cluster.engine.request import FinishReason, GenerateRequest, SamplingParams
from cluster.model.generate import decode_stream, greedy

MODEL = "tiny-small-vocab"


def prompts_of(lengths, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture
def make_engine(engine_model):
    engines = []

    def make(stop_token_ids=(), **config):
        engine = BatchingEngine.for_model(engine_model(MODEL), EngineConfig(block_size=4, default_max_tokens=7,
                                                                            chunk_interval_ms=0, **config),
                                          stop_token_ids=stop_token_ids)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.shutdown()


async def collect(engine, request):
    chunks = [c async for c in engine.generate(request)]
    return [t for c in chunks for t in c.token_ids], chunks


def request(prompt, **sampling):
    return GenerateRequest(prompt_token_ids=tuple(prompt), sampling=SamplingParams(**sampling), request_id="r")


def test_defaults_stop_tokens_and_finish_reasons(make_engine, engine_model):
    model = engine_model(MODEL)
    (prompt,) = prompts_of([9], model.config.vocab_size, seed=3)
    free_run = greedy(model, prompt, 7)
    engine = make_engine(stop_token_ids=(free_run[2],))

    async def main():
        default = await collect(engine, request(prompt))  # engine stops at its default stop id
        ignoring = await collect(engine, request(prompt, ignore_stop=True))  # default_max_tokens 7
        explicit = await collect(engine, request(prompt, max_tokens=5, stop_token_ids=(free_run[4],)))
        return default, ignoring, explicit

    (tokens, chunks), (all_tokens, all_chunks), (cut, cut_chunks) = asyncio.run(main())
    stop_at = free_run.index(free_run[2])
    assert tokens == free_run[: stop_at + 1] and chunks[-1].finish_reason is FinishReason.STOP
    assert all_tokens == free_run and all_chunks[-1].finish_reason is FinishReason.LENGTH
    assert all_chunks[-1].completion_tokens == 7 and all_chunks[-1].prompt_tokens == 9
    assert cut == free_run[: free_run.index(free_run[4]) + 1] and cut_chunks[-1].finish_reason is FinishReason.STOP
    assert all(c.finish_reason is None for c in all_chunks[:-1])
    stats = engine.stats()
    assert (stats.requests_total, stats.finished_total, stats.cancelled_total, stats.active_requests) == (3, 3, 0, 0)
    assert stats.tokens_generated_total == len(tokens) + len(all_tokens) + len(cut)


def test_invalid_requests_are_refused_naming_the_field(make_engine):
    engine = make_engine()

    async def first(req):
        return await engine.generate(req).__anext__()

    with pytest.raises(InvalidRequestError, match="prompt_token_ids\\[1\\]"):
        asyncio.run(first(request([1, 5000])))
    with pytest.raises(InvalidRequestError, match="sampling.logprobs"):
        asyncio.run(first(request([1, 2], logprobs=21)))


def test_seeded_sampling_matches_the_plain_decode_loop_distribution_and_repeats(make_engine, engine_model):
    model = engine_model(MODEL)
    (prompt,) = prompts_of([11], model.config.vocab_size, seed=4)
    engine = make_engine()
    seeded = request(prompt, max_tokens=12, temperature=0.9, top_k=50, top_p=0.95, seed=1234)

    async def main():
        alone = (await collect(engine, seeded))[0]
        crowd = [request(p, max_tokens=12, temperature=1.0) for p in prompts_of([5, 17, 30], model.config.vocab_size)]
        together = await asyncio.gather(collect(engine, seeded), *(collect(engine, r) for r in crowd))
        return alone, together[0][0]

    alone, in_batch = asyncio.run(main())
    assert alone == in_batch and len(alone) == 12
    assert alone != list(decode_stream(model, prompt, 12))  # sampled, not greedy (vocab 1024)


def test_logprobs_and_cached_prompt_tokens_reach_the_token_chunks(make_engine, engine_model):
    model = engine_model(MODEL)
    (shared,) = prompts_of([40], model.config.vocab_size, seed=6)
    engine = make_engine()

    async def main():
        first = await collect(engine, request(shared + [1, 2], max_tokens=4, logprobs=3))
        second = await collect(engine, request(shared + [3, 4], max_tokens=4, logprobs=0))
        return first, second

    (tokens, chunks), (tokens2, chunks2) = asyncio.run(main())
    logprobs = [lp for c in chunks for lp in c.logprobs]
    assert [lp.token_id for lp in logprobs] == tokens == greedy(model, shared + [1, 2], 4)
    assert all(len(lp.top_token_ids) == 3 and lp.top_token_ids[0] == lp.token_id for lp in logprobs)
    assert chunks[-1].cached_prompt_tokens == 0
    assert chunks2[-1].cached_prompt_tokens == 40  # ten full 4-token blocks of the shared prefix
    assert tokens2 == greedy(model, shared + [3, 4], 4)
    assert all(lp.top_token_ids == () for c in chunks2 for lp in c.logprobs)
    stats = engine.stats()
    assert stats.prefix_cache_hit_tokens_total == 40 and stats.prefix_cache_queried_tokens_total == 84


def test_cancelling_mid_stream_aborts_and_frees_blocks(make_engine, engine_model):
    engine = make_engine()
    (prompt,) = prompts_of([20], engine_model(MODEL).config.vocab_size)

    async def main():
        stream = engine.generate(request(prompt, max_tokens=400, ignore_stop=True))
        await stream.__anext__()
        busy = engine.stats()
        await stream.aclose()
        for _ in range(200):
            if engine.stats().active_requests == 0:
                break
            await asyncio.sleep(0.01)
        return busy, engine.stats()

    busy, after = asyncio.run(main())
    assert busy.running_requests == 1 and busy.kv_blocks_used > 0 and busy.kv_cache_usage > 0
    assert (after.active_requests, after.kv_blocks_used, after.cancelled_total) == (0, 0, 1)
    assert after.tokens_generated_total < 400


def test_overload_hint_grows_with_the_queue_and_falls_with_throughput(make_engine, engine_model):
    from cluster.engine.errors import DEFAULT_RETRY_AFTER_S, retry_after_s

    assert retry_after_s(4, 0.0) == DEFAULT_RETRY_AFTER_S
    assert retry_after_s(8, 4.0) == pytest.approx(2.0) and retry_after_s(8, 16.0) == pytest.approx(0.5)
    assert retry_after_s(10_000, 0.01) == 30.0
    engine = make_engine(max_waiting_requests=1, max_num_seqs=1, max_num_batched_tokens=32)
    (prompt,) = prompts_of([6], engine_model(MODEL).config.vocab_size)

    async def main():
        running = engine.generate(request(prompt, max_tokens=300, ignore_stop=True))
        await running.__anext__()
        waiting = asyncio.ensure_future(engine.generate(request(prompt, max_tokens=3)).__anext__())
        while engine.stats().waiting_requests < 1:
            await asyncio.sleep(0.005)
        with pytest.raises(EngineOverloadedError) as refused:
            await engine.generate(request(prompt, max_tokens=3)).__anext__()
        waiting.cancel()
        await running.aclose()
        return refused.value

    refused = asyncio.run(main())
    assert (refused.queued, refused.limit) == (1, 1) and refused.retry_after_s > 0


def test_a_dead_step_loop_fails_health_and_open_streams(make_engine, engine_model):
    engine = make_engine()
    (prompt,) = prompts_of([6], engine_model(MODEL).config.vocab_size)
    engine.check_health()

    def broken_step():
        raise RuntimeError("simulated kernel failure")

    engine.core.step = broken_step

    async def main():
        return await collect(engine, request(prompt, max_tokens=3))

    with pytest.raises(EngineDead):
        asyncio.run(main())
    with pytest.raises(EngineDead):
        engine.check_health()
    assert engine.stats().failed_total == 1
