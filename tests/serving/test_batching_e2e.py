"""The batching engine end to end: gRPC client -> front door -> Serve -> ModelReplica ->
BatchingEngine, on the session's real Ray cluster and the tiny checkpoint."""

from __future__ import annotations

import threading
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cluster.model.generate import greedy
from gptoss.v1 import inference_pb2 as pb
from tests.prompts import open_long_stream, random_prompts
from tests.serving.replica_probe import replica_stats, wait_idle

pytestmark = pytest.mark.slow

def generate(stub, prompt, timeout=120, **sampling):
    """(tokens, logprobs, complete) of one Generate call."""
    tokens, logprobs, complete = [], [], None
    request = pb.GenerateRequest(prompt_token_ids=prompt, sampling=pb.SamplingParams(**sampling))
    for response in stub.Generate(request, timeout=timeout):
        if response.HasField("chunk"):
            tokens.extend(response.chunk.token_ids)
            logprobs.extend(response.chunk.logprobs)
        else:
            complete = response.complete
    return tokens, logprobs, complete


def concurrently(calls):
    """Run the zero-argument callables in threads at once; returns their results (or exceptions)."""
    results: list = [None] * len(calls)

    def run(i):
        try:
            results[i] = calls[i]()
        except Exception as err:  # noqa: BLE001 - handed back to the test
            results[i] = err

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    return results


def test_32_concurrent_mixed_length_requests_equal_greedy(stub, tiny_model, ray_serving):
    lengths = [3 + (i * 37) % 300 for i in range(32)]  # 3..299 tokens: across many blocks and the window
    prompts = random_prompts(lengths, seed=11)
    expected = [greedy(tiny_model, p, 16) for p in prompts]
    started = time.monotonic()
    results = concurrently([lambda p=p: generate(stub, p, max_tokens=16, ignore_stop=True) for p in prompts])
    elapsed = time.monotonic() - started
    for i, result in enumerate(results):
        assert not isinstance(result, Exception), f"request {i}: {result!r}"
        tokens, _, complete = result
        assert tokens == expected[i], f"request {i} (prompt of {lengths[i]}) differs from greedy"
        assert (complete.usage.prompt_tokens, complete.usage.completion_tokens) == (lengths[i], 16)
        assert complete.finish_reason == pb.FINISH_REASON_LENGTH
    idle = wait_idle(ray_serving)
    assert idle.kv_blocks_used == 0 and idle.waiting_requests == 0
    print(f"32 mixed-length streams x 16 tokens in {elapsed:.2f} s")


def test_shared_256_token_prefix_is_a_counted_cache_hit_with_the_same_tokens(stub, tiny_model, ray_serving):
    prefix, tail_a, tail_b = random_prompts([256, 9, 13], seed=12)
    before = replica_stats(ray_serving)
    first, _, first_done = generate(stub, prefix + tail_a, max_tokens=12, ignore_stop=True)
    second, _, second_done = generate(stub, prefix + tail_b, max_tokens=12, ignore_stop=True)
    after = replica_stats(ray_serving)
    assert first == greedy(tiny_model, prefix + tail_a, 12)
    assert second == greedy(tiny_model, prefix + tail_b, 12)  # as without a cache
    assert first_done.usage.cached_prompt_tokens == 0
    assert second_done.usage.cached_prompt_tokens == 256
    assert after.prefix_cache_hit_tokens_total - before.prefix_cache_hit_tokens_total == 256
    assert after.prefix_cache_queried_tokens_total - before.prefix_cache_queried_tokens_total == 256 * 2 + 9 + 13
    assert after.prefix_cache_hit_rate > 0


def test_cancelling_a_stream_returns_kv_blocks_to_the_baseline(stub, ray_serving):
    baseline = wait_idle(ray_serving)
    (prompt,) = random_prompts([200], seed=13)
    call = open_long_stream(stub, prompt)
    busy = replica_stats(ray_serving)
    assert busy.running_requests == baseline.running_requests + 1
    assert busy.kv_blocks_used > baseline.kv_blocks_used
    call.cancel()
    cancelled_at = time.monotonic()
    while True:
        asked_at = time.monotonic()  # only a stats call *sent* 2 s after the cancel proves blocks were held too long
        if (now := replica_stats(ray_serving)).kv_blocks_used == baseline.kv_blocks_used:
            break
        assert asked_at - cancelled_at < 2.0, f"blocks still held 2 s after cancel: {now}"
        time.sleep(0.02)
    assert now.running_requests == baseline.running_requests
    assert now.cancelled_total == baseline.cancelled_total + 1


def test_a_seed_gives_the_same_tokens_alone_and_in_a_busy_batch(stub, tiny_model):
    (prompt,) = random_prompts([21], seed=14)
    seeded = dict(max_tokens=20, temperature=0.8, top_p=0.95, top_k=100, seed=777, ignore_stop=True)
    alone, _, _ = generate(stub, prompt, **seeded)
    others = random_prompts([5 + 13 * i for i in range(12)], seed=15)
    calls = [lambda: generate(stub, prompt, **seeded)]
    calls += [lambda p=p: generate(stub, p, max_tokens=30, temperature=1.0, ignore_stop=True) for p in others]
    results = concurrently(calls)
    assert not any(isinstance(r, Exception) for r in results), results
    assert results[0][0] == alone and len(alone) == 20
    assert alone != greedy(tiny_model, prompt, 20)  # it really sampled
    other_seed, _, _ = generate(stub, prompt, **{**seeded, "seed": 778})
    assert other_seed != alone


def test_logprobs_travel_with_their_tokens(stub, tiny_model):
    (prompt,) = random_prompts([15], seed=16)
    tokens, logprobs, _ = generate(stub, prompt, max_tokens=6, ignore_stop=True, logprobs=3)
    assert tokens == greedy(tiny_model, prompt, 6)
    assert [lp.token_id for lp in logprobs] == tokens
    for lp in logprobs:
        assert len(lp.top) == 3 and lp.top[0].token_id == lp.token_id  # greedy: the top alternative
        assert lp.logprob == pytest.approx(lp.top[0].logprob) and lp.top[0].logprob >= lp.top[1].logprob
        assert lp.logprob <= 0
    _, none_asked, _ = generate(stub, prompt, max_tokens=3, ignore_stop=True)
    assert none_asked == []


def test_get_loads_reports_the_engines_queue_and_kv_use(stub, ray_serving):
    (prompt,) = random_prompts([100], seed=17)
    call = open_long_stream(stub, prompt, min_tokens=1)
    try:
        loads = stub.GetLoads(pb.GetLoadsRequest(), timeout=30)
    finally:
        call.cancel()
    (load,) = loads.replicas
    assert load.running_requests >= 1 and load.waiting_requests == 0
    assert load.HasField("kv_cache_usage") and 0 < load.kv_cache_usage < 1


def _scrape(frontdoor) -> dict[tuple[str, tuple], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{frontdoor.server.metrics_port}/metrics", timeout=10).read()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text.decode()) for s in family.samples}


def test_metrics_show_the_replica_engine_gauges(stub, frontdoor, ray_serving):
    replica_id = ray_serving.handle.load_report.remote().result(timeout_s=30)[0]
    label = (("replica", replica_id),)
    (prompt,) = random_prompts([40], seed=18)
    generate(stub, prompt, max_tokens=8, ignore_stop=True)
    engine = replica_stats(ray_serving)
    deadline = time.monotonic() + 10  # the front door polls every 0.5 s in the test config
    while (scraped := _scrape(frontdoor)).get(("gptoss_replica_generation_tokens_total", label), -1) \
            < engine.tokens_generated_total:
        assert time.monotonic() < deadline, "the replica metrics did not catch up with the engine"
        time.sleep(0.1)
    for name in ("gptoss_replica_waiting_requests", "gptoss_replica_running_requests",
                 "gptoss_replica_kv_cache_usage_ratio", "gptoss_replica_kv_cache_blocks",
                 "gptoss_replica_generation_tokens_per_second", "gptoss_replica_prefix_cache_queried_tokens_total",
                 "gptoss_replica_prefix_cache_hit_tokens_total", "gptoss_replica_preemptions_total"):
        assert (name, label) in scraped, f"{name} missing"
    assert scraped[("gptoss_replica_kv_cache_blocks", label)] == engine.kv_blocks_total > 0
    assert 0 <= scraped[("gptoss_replica_kv_cache_usage_ratio", label)] <= 1
    assert scraped[("gptoss_replica_prefix_cache_queried_tokens_total", label)] >= 40


def test_a_kv_budget_too_small_for_the_model_fails_naming_the_field(tiny_model, serving_config):
    from cluster.config import ConfigError
    from cluster.serving.replica import _batching_engine

    config = serving_config.model_copy(update={"engine": serving_config.engine.model_copy(
        update={"kv_cache_memory_mib": 0.001})})
    with pytest.raises(ConfigError, match="engine.kv_cache_memory_mib"):
        _batching_engine(tiny_model, config)
