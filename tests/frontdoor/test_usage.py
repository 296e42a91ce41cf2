"""Usage records and tenant counters without a server: bounded tenant labels and the JSON lines."""

from __future__ import annotations

import json

from prometheus_client import CollectorRegistry

from cluster.frontdoor.usage import ANONYMOUS, OTHER, Usage, UsageRecorder, configure_usage_log
from cluster.metrics import FrontdoorMetrics


def test_labels_are_bounded_and_records_are_json_lines(tmp_path):
    registry = CollectorRegistry()
    known = {"acme"}
    recorder = UsageRecorder(FrontdoorMetrics(registry).tenant, lambda: known, "gpt-oss-20b")
    configure_usage_log(str(tmp_path / "usage.jsonl"))
    for tenant, n in (("acme", 3), ("stranger-1", 4), ("stranger-2", 5), ("", 6)):
        usage = Usage()
        usage.sent(prompt=10, completion=n, cached_prompt=2, reasoning=1)
        recorder.record(request_id=f"r-{n}", tenant=tenant, method="Chat", usage=usage, outcome="OK", duration_s=0.5)
    value = lambda tenant, kind: registry.get_sample_value("gptoss_tenant_tokens_total",
                                                           {"tenant": tenant, "type": kind})
    assert value("acme", "completion") == 3 and value(OTHER, "completion") == 9 and value(ANONYMOUS, "prompt") == 10
    assert value(OTHER, "cached_prompt") == 4 and value("acme", "reasoning") == 1
    assert value("stranger-1", "completion") is None
    assert registry.get_sample_value("gptoss_tenant_requests_total", {"tenant": OTHER, "code": "OK"}) == 2
    records = [json.loads(line) for line in (tmp_path / "usage.jsonl").read_text().splitlines()]
    assert [r["tenant"] for r in records] == ["acme", "stranger-1", "stranger-2", ANONYMOUS]
    assert records[0] == {**records[0], "request_id": "r-3", "model": "gpt-oss-20b", "method": "Chat",
                          "outcome": "OK", "prompt_tokens": 10, "cached_prompt_tokens": 2, "reasoning_tokens": 1,
                          "completion_tokens": 3}
