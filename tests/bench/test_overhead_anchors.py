"""The floor anchor of `bench overhead`: a separate grpc.aio server process, one message per token,
paced like the echo engine, measured with the same load generator."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.bench.loadgen import Connection, LoadPlan, run_load
from cluster.bench.report import summarize
from cluster.bench.workload import IntRange, SyntheticWorkload

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def floor_server():
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "cluster.bench.floor", "--token-rate", "500"], env=env,
                            stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline().strip()
        assert line.startswith("listening "), line
        yield line.split()[1]
    finally:
        proc.terminate()
        proc.wait(10)


def test_floor_streams_one_message_per_token_at_the_given_pace(floor_server):
    workload = SyntheticWorkload(api="generate", prompt_len=IntRange(3, 3), output_len=IntRange(51, 51))
    result = run_load(Connection(floor_server), workload, LoadPlan(concurrency=4, num_requests=8))
    s = summarize(result.records)
    assert s["completed"] == 8 and s["output_tokens"] == 8 * 51 == s["output_messages"]
    # 50 gaps at 500 tokens/s: 100 ms per stream.
    assert 95 <= s["e2e_ms"]["p50"] < 400, s["e2e_ms"]
    assert s["ttft_ms"]["p50"] < 50
    for r in result.records:
        spec = workload.request(r.index)
        assert r.usage_completion_tokens == 51 and r.prompt_tokens == len(spec.prompt_token_ids)
