"""No first-token stalls: sequential requests at concurrency 1 through the real front door and the
session's Ray Serve app (tiny model) all see their first token within a bound of the median. A
stall (a lock, a poll interval, a router refresh, a garbage collection, a Serve long-poll) shows
as a few requests far above the rest, which percentiles of a load run hide."""

from __future__ import annotations

import os
import statistics
import time

import pytest

from cluster.bench.loadgen import Connection, LoadPlan, run_load
from cluster.bench.workload import IntRange, SyntheticWorkload
from cluster.sockets import free_port
from gptoss.v1 import inference_pb2 as pb
from tests.prompts import random_prompts
from tests.serving.test_serve_cli import start_serve, stop_serve_and_check_nothing_left

pytestmark = pytest.mark.slow

REQUESTS = 60
WARMUP = 5
STALL_BOUND_S = 0.25  # issue 24: no request more than 250 ms beyond the median


def _first_token_s(stub, prompt) -> float:
    request = pb.GenerateRequest(prompt_token_ids=prompt, sampling=pb.SamplingParams(max_tokens=4, ignore_stop=True))
    start = time.perf_counter()
    first = None
    for response in stub.Generate(request, timeout=60):
        if first is None and response.WhichOneof("response") == "chunk" and response.chunk.token_ids:
            first = time.perf_counter() - start
    assert first is not None, "the stream carried no token"
    return first


def test_no_request_waits_far_beyond_the_median_for_its_first_token(stub):
    prompts = random_prompts([32] * (WARMUP + REQUESTS), seed=24)
    for prompt in prompts[:WARMUP]:
        _first_token_s(stub, prompt)
    _assert_no_stall([_first_token_s(stub, prompt) for prompt in prompts[WARMUP:]])


def _assert_no_stall(ttfts: list[float]) -> None:
    median = statistics.median(ttfts)
    stalls = sorted((round(t * 1000), i) for i, t in enumerate(ttfts) if t > median + STALL_BOUND_S)
    assert not stalls, (f"median TTFT {median * 1000:.0f} ms; requests over it by more than "
                        f"{STALL_BOUND_S * 1000:.0f} ms (ms, index): {stalls}")


def test_serve_process_keeps_first_tokens_within_the_bound(tmp_path, short_tmp):
    """The same bound through `gptoss-cluster serve` as a user runs it (its own Ray; the front door
    in the serve process, whose startup heap is frozen: a full collection of it took 0.2-0.4 s on
    a loaded 2-core box), loaded by `bench serving`'s load generator, 120 requests."""
    grpc_port = free_port()
    env = dict(os.environ, GPTOSS_CACHE_DIR=str(tmp_path / "cache"), GPTOSS_RAY_TEMP_DIR=str(short_tmp),
               GPTOSS_RAY_NUM_CPUS="2")
    serve, _ = start_serve(env, grpc_port, free_port())
    try:
        workload = SyntheticWorkload(api="generate", prompt_len=IntRange(64, 64), output_len=IntRange(8, 8), seed=3)
        result = run_load(Connection(target=f"127.0.0.1:{grpc_port}"), workload,
                          LoadPlan(concurrency=1, num_requests=2 * REQUESTS, warmup_requests=WARMUP, timeout_s=60.0))
    finally:
        stop_serve_and_check_nothing_left(serve, short_tmp)
    assert all(r.ok for r in result.records), [r.code for r in result.records if not r.ok]
    _assert_no_stall([r.ttft_s for r in result.records])
