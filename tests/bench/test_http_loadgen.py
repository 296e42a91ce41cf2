"""`bench serving --api openai-chat|responses|completions`: the load generator's HTTP client
against a real front door (replicas: the harmony script), its token counts checked against the
front door's /metrics."""

from __future__ import annotations

import pytest

from cluster.bench.loadgen import Connection, LoadPlan, run_load
from cluster.bench.report import summarize
from cluster.bench.workload import IntRange, SyntheticWorkload
from cluster.config import FrontdoorConfig
from tests.frontdoor.harmony_script import HarmonyScriptHandle, ThreadedFrontdoor

ROUTES = {"openai-chat": "/v1/chat/completions", "responses": "/v1/responses", "completions": "/v1/completions"}


@pytest.fixture(scope="module")
def door():
    door = ThreadedFrontdoor(HarmonyScriptHandle(chunk_tokens=4),
                             FrontdoorConfig(grpc_port=0, metrics_port=0, http_port=0, load_poll_interval_s=0))
    yield door
    door.close()


@pytest.mark.parametrize("api", sorted(ROUTES))
def test_http_load_counts_what_the_front_door_counted(door, api):
    workload = SyntheticWorkload(api=api, prompt_len=IntRange(8, 8), output_len=IntRange(12, 12))
    key = ("gptoss_frontdoor_completion_tokens_total", (("api", "http"), ("method", ROUTES[api])))
    before = door.metrics().get(key, 0.0)
    result = run_load(Connection(target=door.server.http_url.removeprefix("http://")), workload,
                      LoadPlan(api=api, concurrency=4, num_requests=12, ignore_stop=True))
    counted = door.settled_metrics()[key] - before
    summary = summarize(result.records)
    assert summary["completed"] == 12 and summary["failed"] == 0, summary["errors_by_code"]
    assert all(r.output_tokens == 12 for r in result.records)  # ignore_eos: exactly max_tokens
    assert sum(r.output_tokens for r in result.records) == counted
    assert all(r.first_token_s is not None and r.messages >= 2 for r in result.records)
