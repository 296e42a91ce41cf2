"""Percentiles, goodput and the summary figures of cluster.bench.report."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from cluster.bench.report import (RequestRecord, format_sweep, format_table, meets_slo, parse_slo, percentile,
                                  summarize)


@pytest.mark.parametrize("n", [1, 2, 3, 10, 101, 1000])
def test_percentiles_match_numpy_linear_interpolation(n):
    rng = random.Random(n)
    values = [rng.expovariate(1.0) for _ in range(n)]
    for q in (0, 1, 50, 90, 99, 99.9, 100):
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)), rel=1e-12)


def test_percentile_edge_cases():
    assert math.isnan(percentile([], 50))
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0  # order of input does not matter
    assert percentile([0.0, 10.0], 90) == 9.0
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def record(index, *, sent, first, end, tokens, code="OK", gaps=None, scheduled=None):
    return RequestRecord(index=index, code=code, sent_s=sent, scheduled_s=sent if scheduled is None else scheduled,
                         first_token_s=first, end_s=end, output_tokens=tokens, gaps_s=gaps or [],
                         usage_completion_tokens=tokens if code == "OK" else None)


def test_summary_throughput_latency_and_errors():
    records = [
        record(0, sent=0.0, first=0.1, end=1.0, tokens=10, gaps=[0.1] * 9),
        record(1, sent=0.5, first=0.7, end=2.0, tokens=20, gaps=[0.05] * 19),
        record(2, sent=1.0, first=None, end=1.2, tokens=0, code="UNAVAILABLE"),
        record(3, sent=1.5, first=None, end=1.6, tokens=0, code="UNAVAILABLE"),
        record(4, sent=1.8, first=None, end=1.9, tokens=0, code="RESOURCE_EXHAUSTED"),
    ]
    s = summarize(records)
    assert (s["requests"], s["completed"], s["failed"]) == (5, 2, 3)
    assert s["errors_by_code"] == {"RESOURCE_EXHAUSTED": 1, "UNAVAILABLE": 2}
    assert s["duration_s"] == pytest.approx(2.0)
    assert s["request_throughput"] == pytest.approx(1.0)
    assert s["output_tokens"] == 30 and s["output_token_throughput"] == pytest.approx(15.0)
    assert s["ttft_ms"]["p50"] == pytest.approx(150.0)  # failed requests have no TTFT
    assert s["ttft_ms"]["n"] == 2 and s["e2e_ms"]["n"] == 2
    assert s["e2e_ms"]["p50"] == pytest.approx(1250.0)
    assert s["itl_ms"]["n"] == 28
    # TPOT: (1.0 - 0.1) / 9 and (2.0 - 0.7) / 19
    assert s["tpot_ms"]["mean"] == pytest.approx(1000 * (0.1 + 1.3 / 19) / 2)
    assert s["goodput"] == pytest.approx(1.0)  # no objective: every success counts
    assert "target_rate" not in s
    table = format_table(s, "t")
    assert "errors UNAVAILABLE" in table and "TTFT" in table


def test_goodput_counts_only_successes_within_every_objective():
    records = [
        record(0, sent=0.0, first=0.05, end=0.5, tokens=10),  # ttft 50 ms, e2e 500 ms
        record(1, sent=0.0, first=0.30, end=0.6, tokens=10),  # ttft 300 ms: misses ttft
        record(2, sent=0.0, first=0.05, end=3.0, tokens=10),  # e2e 3 s: misses e2e
        record(3, sent=0.0, first=None, end=0.1, tokens=0, code="INTERNAL"),
    ]
    slo = parse_slo(["ttft_ms=100", "e2e_ms=1000"])
    assert slo == {"ttft_ms": 100.0, "e2e_ms": 1000.0}
    assert [meets_slo(r, slo) for r in records] == [True, False, False, False]
    s = summarize(records, slo=slo)
    assert s["goodput"] == pytest.approx(1 / 3.0)
    assert s["goodput_ratio"] == pytest.approx(0.25)


def test_itl_objective_uses_the_worst_gap_of_a_stream():
    r = record(0, sent=0.0, first=0.01, end=0.3, tokens=4, gaps=[0.01, 0.2, 0.01])
    assert meets_slo(r, {"itl_ms": 250})
    assert not meets_slo(r, {"itl_ms": 150})


@pytest.mark.parametrize("items, message", [
    (["ttft=100"], "KEY one of"),
    (["ttft_ms"], "KEY one of"),
    (["ttft_ms=fast"], "number of milliseconds"),
    (["e2e_ms=0"], "must be > 0"),
])
def test_parse_slo_rejects_bad_objectives(items, message):
    with pytest.raises(ValueError, match=message):
        parse_slo(items)


def test_open_loop_summary_reports_arrival_rate_and_send_lag():
    records = [record(i, sent=i * 0.1 + 0.002, scheduled=i * 0.1, first=i * 0.1 + 0.05, end=i * 0.1 + 0.5,
                      tokens=5) for i in range(11)]
    s = summarize(records, target_rate=10.0)
    assert s["arrival_rate"] == pytest.approx(10.0)
    assert s["send_lag_ms"]["p50"] == pytest.approx(2.0)
    assert s["target_rate"] == 10.0
    assert "10.00" in format_sweep([s])


def test_sweep_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    from cluster.bench.plot import plot_sweep

    def run(rate, ms):
        s = summarize([record(i, sent=i / rate, first=i / rate + ms / 1000, end=i / rate + 2 * ms / 1000, tokens=4)
                       for i in range(20)], target_rate=rate)
        return s

    path = tmp_path / "sweep.png"
    plot_sweep([run(5, 10), run(10, 20), run(20, 80)], str(path), title="test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
