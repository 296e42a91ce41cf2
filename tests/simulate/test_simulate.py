"""The simulator drives the real policies: prefix_affinity beats the baselines on a multi-turn load."""

from __future__ import annotations

import json

from cluster.cli import main


def test_simulate_cli_prefix_affinity_verdict(capsys):
    assert main(["simulate", "--replicas", "64", "--policies", "round_robin", "least_loaded", "prefix_affinity",
                 "--duration", "60", "--warmup", "20"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    verdict = json.loads(last)
    print(verdict)
    assert verdict["replicas"] == 64
    assert verdict["ttft_p99_ratio_vs_round_robin"] <= 0.5
    assert verdict["ttft_p99_ratio_vs_least_loaded"] <= 0.8
    assert verdict["max_over_mean_load"] <= 1.3
