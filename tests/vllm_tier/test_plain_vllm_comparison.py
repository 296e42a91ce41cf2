"""`gptoss-cluster bench vllm-serving` at a tiny size: it starts plain `vllm serve` and our cluster
with engine.kind vllm on the tiny-vllm checkpoint, one after the other, loads both, stops both and
prints the comparison as its last line. Real servers, real vLLM (this tier's virtualenv); the
sizes are small so it fits a CI run, and the figures are only checked for being measured."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.vllm_tier.conftest import require_vllm

pytestmark = pytest.mark.slow


def test_bench_vllm_serving_compares_both_servers_on_one_workload(tmp_path):
    require_vllm()
    out = tmp_path / "runs.json"
    result = subprocess.run(
        [sys.executable, "-m", "cluster", "bench", "vllm-serving", "--prompt-len", "32", "--output-len", "8",
         "--concurrency", "4", "--num-requests", "8", "--c1-requests", "4", "--warmup", "2", "--json", str(out)],
        capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-4000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    for key in ("throughput_ratio_vs_plain_vllm", "tpot_ratio_vs_plain_vllm", "ttft_p50_ratio_vs_plain_vllm",
                "ttft_p99_ratio_vs_plain_vllm"):
        assert figures[key] > 0, key
    for side in ("plain", "ours"):
        assert figures[side]["failed"] == 0 and figures[side]["output_tokens_per_s"] > 0
    # the serving path's CPU per streamed token, read from /proc around the throughput run
    assert set(figures["plain"]["cpu_s_per_1k_tokens"]) == {"api_server"}
    assert set(figures["ours"]["cpu_s_per_1k_tokens"]) == {"frontdoor", "replica"}
    for side in ("plain", "ours"):
        assert all(v > 0 for v in figures[side]["cpu_s_per_1k_tokens"].values()), figures[side]
    assert 0 < figures["frontdoor_cpu_ratio_vs_api_server"] < figures["serving_path_cpu_ratio_vs_api_server"]
    # and the rest of the box: the engines' own processes (working), Ray's daemons, the load generator
    assert set(figures["plain"]["box_cpu_s_per_1k_tokens"]) == {"engine", "load_generator"}
    assert set(figures["ours"]["box_cpu_s_per_1k_tokens"]) == {"engine", "load_generator", "ray"}
    for side in ("plain", "ours"):
        assert figures[side]["box_cpu_s_per_1k_tokens"]["engine"] > 0, figures[side]
    # vLLM binds its worker's threads; ours keeps its front door and replica off those cores
    # (serving.keep_off_engine_cores), plain vLLM's API server runs on every core
    ours_cores, plain_cores = figures["ours"]["cores"], figures["plain"]["cores"]
    assert ours_cores["engine"] and plain_cores["engine"], (ours_cores, plain_cores)
    if len(os.sched_getaffinity(0)) > len(ours_cores["engine"]):
        for process in ("frontdoor", "replica"):
            assert ours_cores[process] and not set(ours_cores[process]) & set(ours_cores["engine"]), ours_cores
    assert plain_cores["api_server"] == sorted(os.sched_getaffinity(0))
    doc = json.loads(out.read_text())
    assert doc["args"]["c1_client"] == "blocking"  # ours' c=1 run read each stream on one thread
    runs = doc["runs"]
    for side in ("plain", "ours"):
        load, c1 = runs[side][0]["load"], runs[side][0]["c1"]
        # Exactly --output-len tokens per request (ignore_eos), the warm-up counted apart.
        assert (load["completed"], load["output_tokens"]) == (8, 8 * 8)
        assert (c1["completed"], c1["output_tokens"]) == (4, 4 * 8)
        assert c1["ttft_ms"]["n"] == 4
    # the checkpoint written for the run is removed at its end; the servers' logs stay, where it said
    scratch = Path(result.stderr.split("; logs in ")[1].split()[0])
    assert not (scratch / "tiny-vllm").exists()
    assert {p.name for p in scratch.glob("*.log")} == {"plain-vllm-1.log", "ours-1.log"}
    shutil.rmtree(scratch)
