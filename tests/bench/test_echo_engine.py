"""EchoEngine, the model-free test engine: pacing, chunking, counters, cancellation."""

from __future__ import annotations

import asyncio
import time

import pytest

from cluster.config import load_config
from cluster.engine.echo_engine import EchoEngine, echo_tokens
from cluster.engine.errors import InvalidRequestError
from cluster.engine.request import FinishReason, GenerateRequest, SamplingParams


def run(coro):
    return asyncio.run(coro)


async def collect(engine, request):
    chunks, stamps = [], []
    async for chunk in engine.generate(request):
        chunks.append(chunk)
        stamps.append(time.monotonic())
    return chunks, stamps


def test_streams_max_tokens_echoing_text_ids_and_skipping_special_ones():
    engine = EchoEngine(tokens_per_s=0)
    request = GenerateRequest(prompt_token_ids=(200006, 5, 7, 200008), sampling=SamplingParams(max_tokens=5))
    chunks, _ = run(collect(engine, request))
    tokens = [t for c in chunks for t in c.token_ids]
    assert tokens == [5, 7, 5, 7, 5] == echo_tokens((200006, 5, 7, 200008), 5)
    last = chunks[-1]
    assert (last.finish_reason, last.prompt_tokens, last.completion_tokens) == (FinishReason.LENGTH, 4, 5)
    stats = engine.stats()
    assert (stats.finished_total, stats.tokens_generated_total, stats.active_requests) == (1, 5, 0)


def test_paces_tokens_at_the_configured_rate_and_coalesces_chunks():
    engine = EchoEngine(tokens_per_s=200, chunk_interval_s=0.02)
    request = GenerateRequest(prompt_token_ids=(1, 2, 3), sampling=SamplingParams(max_tokens=41))
    started = time.monotonic()
    chunks, stamps = run(collect(engine, request))
    elapsed = time.monotonic() - started
    assert sum(len(c.token_ids) for c in chunks) == 41
    # 40 gaps of 5 ms: 0.2 s, give or take scheduling on a busy box.
    assert 0.19 <= elapsed < 0.6, elapsed
    assert len(chunks[0].token_ids) == 1 and stamps[0] - started < 0.05  # the first token at once
    assert len(chunks) <= 41 // 2 + 2  # 20 ms chunks carry about 4 tokens each, never one per token


def test_closing_the_stream_counts_a_cancellation():
    async def main():
        engine = EchoEngine(tokens_per_s=100)
        stream = engine.generate(GenerateRequest(prompt_token_ids=(9,), sampling=SamplingParams(max_tokens=1000)))
        await stream.__anext__()
        await stream.aclose()
        return engine.stats()

    stats = run(main())
    assert (stats.cancelled_total, stats.finished_total, stats.active_requests) == (1, 0, 0)
    assert stats.tokens_generated_total < 10


def test_validates_like_a_real_engine():
    engine = EchoEngine()
    with pytest.raises(InvalidRequestError) as info:
        run(collect(engine, GenerateRequest(prompt_token_ids=(1, 300000))))
    assert info.value.field == "prompt_token_ids[1]"


def test_config_selects_the_echo_engine_and_checks_its_rate():
    config = load_config(env={}, overrides={"engine.kind": "echo", "engine.echo_tokens_per_s": 50})
    assert (config.engine.kind, config.engine.echo_tokens_per_s) == ("echo", 50.0)
    with pytest.raises(Exception, match="engine.kind must be one of torch, echo"):
        load_config(env={}, overrides={"engine.kind": "magic"})
    with pytest.raises(Exception, match="engine.echo_tokens_per_s must be >= 0"):
        load_config(env={}, overrides={"engine.kind": "echo", "engine.echo_tokens_per_s": -1})
