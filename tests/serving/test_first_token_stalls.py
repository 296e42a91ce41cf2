"""No first-token stalls: sequential requests at concurrency 1 through the real front door and the
session's Ray Serve app (tiny model) all see their first token within a bound of the median. A
stall (a lock, a poll interval, a router refresh, a garbage collection, a Serve long-poll) shows
as a few requests far above the rest, which percentiles of a load run hide."""

from __future__ import annotations

import statistics
import time

import pytest

from gptoss.v1 import inference_pb2 as pb
from tests.prompts import random_prompts

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
    ttfts = [_first_token_s(stub, prompt) for prompt in prompts[WARMUP:]]
    median = statistics.median(ttfts)
    stalls = sorted((round(t * 1000), i) for i, t in enumerate(ttfts) if t > median + STALL_BOUND_S)
    assert not stalls, (f"median TTFT {median * 1000:.0f} ms; requests over it by more than "
                        f"{STALL_BOUND_S * 1000:.0f} ms (ms, index): {stalls}")
