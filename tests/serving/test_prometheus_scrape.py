"""A real Prometheus server (Debian package `prometheus`) scrapes the front door's /metrics, and its
query API returns our metrics with the values expected after a known number of requests."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request

import pytest

from gptoss.v1 import inference_pb2 as pb
from tests.tooling import missing
from tests.waiting import wait_until

from cluster.sockets import free_port

N_REQUESTS = 3
MAX_TOKENS = 4


def _query(port: int, promql: str) -> list:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(url, timeout=5) as response:
        body = json.load(response)
    assert body["status"] == "success", body
    return body["data"]["result"]


def _value(port: int, promql: str) -> float | None:
    result = _query(port, promql)
    return float(result[0]["value"][1]) if result else None


@pytest.fixture
def prometheus(frontdoor, short_tmp):
    binary = shutil.which("prometheus")
    if binary is None:
        missing("prometheus (Debian package `prometheus`)")
    metrics_port = frontdoor.server.metrics_port
    assert metrics_port
    config = short_tmp / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: gptoss\n    scrape_interval: 1s\n"
        f"    static_configs:\n      - targets: ['127.0.0.1:{metrics_port}']\n")
    port = free_port()
    proc = subprocess.Popen([binary, f"--config.file={config}", f"--storage.tsdb.path={short_tmp / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if _query(port, 'up{job="gptoss"}') and _value(port, 'up{job="gptoss"}') == 1.0:
                    break
            except OSError:
                pass
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            time.sleep(0.5)
        else:
            pytest.fail("prometheus never scraped the front door")
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


def _wait_for(port: int, promql: str, expected: float, timeout_s: float = 30.0) -> float | None:
    deadline = time.monotonic() + timeout_s
    value = None
    while time.monotonic() < deadline:
        value = _value(port, promql)
        if value is not None and abs(value - expected) < 1e-6:
            return value
        time.sleep(0.5)
    return value


def _scraped_after(port: int, moment: float) -> bool:
    """Prometheus holds a scrape of the front door taken after `moment` (time.time())."""
    return (_value(port, 'timestamp(up{job="gptoss"})') or 0.0) > moment


def test_prometheus_scrapes_our_metrics(prometheus, stub, serving_config):
    ok = 'gptoss_frontdoor_requests_total{job="gptoss",method="Generate",code="OK"}'
    tokens = 'gptoss_frontdoor_completion_tokens_total{job="gptoss",method="Generate"}'
    decisions = 'sum(gptoss_router_decisions_total{job="gptoss"})'
    # The baseline is a scrape taken after now, when earlier tests' calls on this front door have ended.
    settled = time.time()
    wait_until(lambda: _scraped_after(prometheus, settled), 30, 0.2, "no scrape after the baseline moment")
    before_ok = _value(prometheus, ok) or 0.0
    before_tokens = _value(prometheus, tokens) or 0.0
    before_decisions = _value(prometheus, decisions) or 0.0
    again = time.time()
    wait_until(lambda: _scraped_after(prometheus, again), 30, 0.2, "no second scrape")
    assert (_value(prometheus, ok) or 0.0) == before_ok  # nothing else is running
    request = pb.GenerateRequest(prompt_token_ids=[200006, 1428, 200008, 12194, 200007],
                                 sampling=pb.SamplingParams(max_tokens=MAX_TOKENS, ignore_stop=True))
    for _ in range(N_REQUESTS):
        list(stub.Generate(request, timeout=120))
    got_ok = _wait_for(prometheus, ok, before_ok + N_REQUESTS)
    got_tokens = _wait_for(prometheus, tokens, before_tokens + N_REQUESTS * MAX_TOKENS)
    got_decisions = _wait_for(prometheus, decisions, before_decisions + N_REQUESTS)
    print(f"prometheus: requests OK {before_ok} -> {got_ok}, completion tokens {before_tokens} -> {got_tokens}, "
          f"router decisions {before_decisions} -> {got_decisions}")
    assert got_ok == before_ok + N_REQUESTS
    assert got_tokens == before_tokens + N_REQUESTS * MAX_TOKENS
    assert got_decisions == before_decisions + N_REQUESTS  # the router runs in the front door's process
    app = serving_config.serving.app_name  # other tests' apps share the deployment name
    replicas = _query(prometheus, f'gptoss_router_replicas{{job="gptoss",application="{app}"}}')
    assert replicas and float(replicas[0]["value"][1]) == serving_config.serving.replicas
    # The front door's load poll sets the autoscaler gauges from the Serve controller.
    for name in ("gptoss_autoscaler_desired_replicas", "gptoss_autoscaler_replicas"):
        assert _wait_for(prometheus, f'{name}{{job="gptoss",application="{app}"}}',
                         serving_config.serving.replicas) == serving_config.serving.replicas
