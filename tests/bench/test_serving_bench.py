"""`bench serving` against real parts: a gRPC client process -> our front door -> Ray Serve ->
ModelReplica with the echo engine; checked against the front door's own /metrics."""

from __future__ import annotations

import json
import statistics
import os
import subprocess
import sys
import time
from pathlib import Path
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cluster.bench.loadgen import Connection, LoadPlan, run_load
from cluster.bench.report import summarize
from cluster.bench.workload import IntRange, SyntheticWorkload

REPO_ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def scrape(door) -> dict[tuple[str, tuple], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{door.server.metrics_port}/metrics", timeout=10).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def delta(before, after, name, **labels):
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


def bench_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    return subprocess.run([sys.executable, "-m", "cluster", "bench", "serving", *args], env=env, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("api, method", [("generate", "Generate"), ("chat", "Chat")])
def test_client_figures_agree_with_the_front_doors_counters(echo_frontdoor, tmp_path, api, method):
    """The CLI, a separate client process, counts the same tokens and requests as /metrics."""
    before, before_unix = scrape(echo_frontdoor), time.time()
    out = tmp_path / "run.json"
    proc = bench_cli("--target", echo_frontdoor.target, "--api", api, "--concurrency", "8", "--num-requests", "60",
                     "--warmup", "4", "--prompt-len", "8:24", "--output-len", "16:64", "--sessions", "4",
                     "--json", str(out))
    after = scrape(echo_frontdoor)
    assert proc.returncode == 0, proc.stderr
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    doc = json.loads(out.read_text())
    (run,) = doc["runs"]
    summary, records = run["summary"], run["records"]
    # records count from the wall-clock start of the measured part, to find a request in server logs
    assert before_unix <= run["started_unix"] <= run["started_unix"] + records[-1]["sent_s"] <= time.time()
    assert last["output_tokens"] == summary["output_tokens"]
    assert summary["completed"] == 60 and summary["failed"] == 0 and summary["warmup"]["requests"] == 4
    client_tokens = summary["output_tokens"] + summary["warmup"]["output_tokens"]
    server_tokens = delta(before, after, "gptoss_frontdoor_completion_tokens_total", api="grpc", method=method)
    assert server_tokens > 60 * 16
    assert abs(client_tokens - server_tokens) <= 0.01 * server_tokens, (client_tokens, server_tokens)
    assert delta(before, after, "gptoss_frontdoor_requests_total", api="grpc", method=method, code="OK") == 64
    server_prompt = delta(before, after, "gptoss_frontdoor_prompt_tokens_total", api="grpc", method=method)
    assert summary["prompt_tokens"] <= server_prompt  # warm-up prompts are counted by the server only
    assert delta(before, after, "gptoss_frontdoor_time_to_first_token_seconds_count", api="grpc", method=method) == 64
    # Each request got the output length the workload asked for (ignore_stop), and the token
    # count the client saw matches the server's usage report.
    assert all(r["usage_completion_tokens"] == r["output_tokens"] for r in records)
    assert sum(r["output_tokens"] for r in records) == summary["output_tokens"]
    assert {r["session_id"] for r in records} == {f"session-{i}" for i in range(4)}
    for key in ("ttft_ms", "itl_ms", "e2e_ms"):
        assert 0 < summary[key]["p50"] <= summary[key]["p90"] <= summary[key]["p99"]
    assert "TTFT" in proc.stdout and "requests/s" in proc.stdout  # the terminal table


def test_open_loop_keeps_its_arrival_rate_when_the_server_is_slow(slow_echo_frontdoor):
    """A replica serving one 8-token request at a time at 40 tokens/s manages ~5 req/s; arrivals at
    12 req/s must keep coming on schedule while latency grows with the queue."""
    workload = SyntheticWorkload(api="generate", prompt_len=IntRange(4, 4), output_len=IntRange(8, 8))
    plan = LoadPlan(rate=12.0, num_requests=30, timeout_s=60.0, seed=7)
    result = run_load(Connection(slow_echo_frontdoor.target), workload, plan)
    records = sorted(result.records, key=lambda r: r.sent_s)
    summary = summarize(records, target_rate=12.0)
    assert summary["completed"] == 30, summary["errors_by_code"]
    scheduled = sorted(r.scheduled_s for r in records)
    scheduled_rate = (len(scheduled) - 1) / (scheduled[-1] - scheduled[0])
    # Every request went out when the schedule said. A closed loop would wait for replies: at 5 req/s
    # served against 12 scheduled, its last sends would be ~3 s late. The bound leaves room for a
    # busy 2-core machine stalling the client's loop for a moment (0.35 s was seen in a full run).
    assert max(r.sent_s - r.scheduled_s for r in records) < 1.0
    assert summary["arrival_rate"] == pytest.approx(scheduled_rate, rel=0.1)
    assert summary["arrival_rate"] > 8.0
    # The server fell behind: completions are far slower than arrivals, latency grows with the queue.
    assert summary["request_throughput"] < 0.7 * summary["arrival_rate"]
    e2e = [r.e2e_s for r in records]
    first, last = e2e[:10], e2e[-10:]
    # Medians: a queue adds ~0.12 s per arrival, so the last ten wait ~4x the first ten; one request
    # stalled by a busy machine must not decide the comparison.
    assert statistics.median(last) > 3 * statistics.median(first), (first, last)
    assert e2e[-1] > 1.0


def test_closed_loop_on_the_slow_server_adapts_instead(slow_echo_frontdoor):
    """The contrast: one closed-loop client never has more than one request waiting."""
    workload = SyntheticWorkload(api="generate", prompt_len=IntRange(4, 4), output_len=IntRange(8, 8))
    result = run_load(Connection(slow_echo_frontdoor.target), workload,
                      LoadPlan(concurrency=1, num_requests=6, timeout_s=60.0))
    e2e = [r.e2e_s for r in result.records]
    assert all(r.ok for r in result.records)
    assert max(e2e) < 2 * min(e2e) + 0.1  # no queue builds up


def test_sweep_writes_one_run_per_rate(echo_frontdoor, tmp_path):
    out = tmp_path / "sweep.json"
    proc = bench_cli("--target", echo_frontdoor.target, "--rate", "20,40", "--num-requests", "20",
                     "--output-len", "8", "--prompt-len", "8", "--goodput", "ttft_ms=5000", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    runs = json.loads(out.read_text())["runs"]
    assert [r["summary"]["target_rate"] for r in runs] == [20.0, 40.0]
    assert all(r["summary"]["completed"] == 20 and r["summary"]["goodput_ratio"] == 1.0 for r in runs)
    assert "── sweep" in proc.stdout
    assert len(json.loads(proc.stdout.strip().splitlines()[-1])["runs"]) == 2


def test_bad_options_fail_with_a_message():
    proc = bench_cli("--target", "127.0.0.1:1", "--output-len", "0")
    assert proc.returncode == 2 and "--output-len" in proc.stderr
    proc = bench_cli("--target", "127.0.0.1:1", "--goodput", "latency=3")
    assert proc.returncode == 2 and "goodput" in proc.stderr


def test_a_load_run_apart_leads_a_session_of_its_own_and_reports_its_cpu(echo_frontdoor):
    """bench vllm-serving's load generator: a child process in a session of its own (so the servers
    on the box cannot keep it off the CPU), started before `on_ready` reads the clocks, returning
    the records run_load would."""
    import multiprocessing

    from cluster.bench.loadgen import CLIENT_NICE, Connection, LoadPlan, run_load_apart
    from cluster.bench.workload import IntRange, SyntheticWorkload

    seen = {}

    def on_ready():
        (child,) = [p for p in multiprocessing.active_children() if p.name == "gptoss-load-generator"]
        group = Path(f"/proc/{child.pid}/autogroup")  # absent from kernels built without autogroups
        seen.update(pid=child.pid, session=os.getsid(child.pid), at=time.time(),
                    nice=os.getpriority(os.PRIO_PROCESS, child.pid), group=group.read_text() if group.exists() else None)

    workload = SyntheticWorkload(api="generate", prompt_len=IntRange(8, 8), output_len=IntRange(16, 16))
    connection = Connection(target=echo_frontdoor.target)
    result = run_load_apart(connection, workload, LoadPlan(concurrency=4, num_requests=12), on_ready=on_ready)
    assert seen["session"] == seen["pid"] != os.getsid(0)
    if os.geteuid() == 0:  # raised where permitted: its process and its session's scheduling group
        assert seen["nice"] == CLIENT_NICE, seen
        assert seen["group"] is None or seen["group"].endswith(f"nice {CLIENT_NICE}\n"), seen
    assert seen["at"] <= result.started_unix  # the clocks were read before the measured part began
    assert len(result.records) == 12 and all(r.ok and r.output_tokens == 16 for r in result.records)
    assert result.client_cpu_s > 0
    # a plan the load generator refuses fails here, with its reason
    with pytest.raises(RuntimeError, match="give exactly one of concurrency"):
        run_load_apart(connection, workload, LoadPlan(num_requests=1))
