"""`bench engine --structured-only`: the structured-output overhead bench, on both workloads, run
short on the real engine (the trained gpt-oss-tiny rebuilt from its artifact as `serve` does; the
random tiny preset), and its statistics on known ratios."""

from __future__ import annotations

import json

import pytest

from cluster.bench.schemas import SCHEMAS
from cluster.bench.structured_overhead import measure, median_with_spread, trained_requests


def test_the_overhead_is_the_median_ratio_with_an_interval_and_quartiles_around_it():
    ratios = [1.0 + k / 100 for k in range(101)]  # +0% .. +100%, median +50%
    spread = median_with_spread(list(reversed(ratios)))
    assert spread["overhead"] == 0.5
    low, high = spread["ci95"]
    assert 0.39 <= low < 0.5 < high <= 0.61  # 50 -+ 0.98 sqrt(101) ranks
    assert spread["quartiles"] == [0.25, 0.75]
    assert median_with_spread([1.2])["ci95"] == [0.2, 0.2]


def test_the_trained_workload_is_the_curriculum_asks_with_the_constraint_each_kind_of_user_sends():
    requests = trained_requests(64)
    kinds = {r.kind for r in requests}
    assert kinds == {"strict_tools", "regex", "json_schema"}
    for r in requests:
        if r.kind == "strict_tools":
            assert r.constraint.strict_tools and not r.constraint.response_format.constrains
        else:
            assert r.constraint.response_format.type == ("regex" if r.kind == "regex" else "json_schema")
    assert len({tuple(r.prompt) for r in requests}) > 50  # different asks, not one repeated


@pytest.fixture(scope="module")
def random_model(tiny_model):
    return tiny_model


def test_random_weights_half_constrained_batch_stays_whole_and_most_rows_need_a_mask(random_model):
    result = measure(random_model, "random", in_flight=4, blocks=4, block_steps=2, warmup_blocks=1, compile_rounds=1)
    assert result["pairs"] == 4 and result["constrained"] == 2
    # 2 constrained sequences, one row each per step, 8 measured steps: nothing ended (max_tokens 1024).
    assert result["constrained_rows"] == 2 * 4 * 2 and result["requests_finished"] == [0, 0]
    assert result["masked_fraction"] > 0.5  # a random model's tokens inside a JSON value are mostly refused
    low, high = result["overhead_ci95"]
    assert low <= result["overhead"] <= high and result["unconstrained_step_ms"] > 0
    assert result["schemas_compiled"] == len(SCHEMAS) and 0 < result["compile_ms_p50"] <= result["compile_ms_p99"]


@pytest.fixture(scope="module")
def trained_model(cache_dir):
    from cluster.model.checkpoint import load_model
    from cluster.serving.model_store import ensure_preset_checkpoint

    return load_model(ensure_preset_checkpoint("gpt-oss-tiny", cache_dir))


def test_trained_model_requests_end_and_are_replaced_and_few_rows_need_a_mask(trained_model):
    result = measure(trained_model, "trained", in_flight=4, blocks=30, block_steps=4, warmup_blocks=1,
                     compile_rounds=1)
    unconstrained_done, constrained_done = result["requests_finished"]
    assert unconstrained_done > 0 and constrained_done > 0  # turns ended and the slots were refilled
    assert result["constrained_rows"] == 2 * 30 * 4
    # A model that knows harmony and the tool-call format mostly draws what the grammar allows.
    assert result["masked_fraction"] < 0.25, result["masked_fraction_by_kind"]


def test_the_cli_prints_the_section_and_its_json(capsys):
    from cluster.cli import main

    assert main(["bench", "engine", "--structured-only", "--structured-workload", "random", "--in-flight", "2",
                 "--structured-blocks", "2", "--structured-block-steps", "1"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert any("constrained rows that needed a mask" in line for line in out)
    result = json.loads(out[-1])
    assert result["workload"] == "random" and result["pairs"] == 2 and result["in_flight"] == 2
