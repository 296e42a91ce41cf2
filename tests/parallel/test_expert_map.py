"""Placement maps, the planner and the bytes-per-rank layout (pure functions, no Ray)."""

from __future__ import annotations

import json
import random

import pytest

from cluster.cli import main
from cluster.model.config import GptOssConfig
from cluster.parallel.expert_map import (ExpertPlacement, contiguous, head_split, imbalance, layout_bytes,
                                         plan_placement, read_stats, round_robin)


def test_contiguous_and_round_robin_cover_every_expert_once():
    assert contiguous(8, 2).slots == ((0, 1, 2, 3), (4, 5, 6, 7))
    assert contiguous(10, 4).slots == ((0, 1, 2), (3, 4, 5), (6, 7), (8, 9))
    assert round_robin(8, 3).slots == ((0, 3, 6), (1, 4, 7), (2, 5))
    for p in (contiguous(128, 8), round_robin(128, 8)):
        assert sorted(e for s in p.slots for e in s) == list(range(128))
        assert {len(s) for s in p.slots} == {16}


def test_invalid_placements_are_refused():
    with pytest.raises(ValueError, match="no rank"):
        ExpertPlacement(4, ((0, 1), (2,)))
    with pytest.raises(ValueError, match="twice"):
        ExpertPlacement(2, ((0, 0), (1,)))
    with pytest.raises(ValueError, match="each rank needs one"):
        contiguous(2, 4)


def test_rank_loads_split_hot_expert_among_copies():
    p = ExpertPlacement(4, ((0, 1), (0, 2, 3)))
    assert p.copies(0) == [0, 1]
    assert p.rank_loads([10, 1, 1, 1]) == [6.0, 7.0]
    assert imbalance([6.0, 7.0]) == pytest.approx(7 / 6.5)


def test_planner_lowers_imbalance_on_skewed_loads():
    rng = random.Random(7)
    for trial in range(20):
        E, N = rng.choice([(8, 2), (16, 4), (32, 4), (128, 8)])
        loads = [rng.paretovariate(1.1) * 100 for _ in range(E)]
        base = contiguous(E, N).imbalance(loads)
        planned = plan_placement(loads, N, 0)
        with_copies = plan_placement(loads, N, N)
        assert planned.imbalance(loads) <= base + 1e-9
        assert with_copies.imbalance(loads) <= planned.imbalance(loads) + 1e-9
        # memory stays balanced: slots per rank differ by at most one
        sizes = [len(s) for s in with_copies.slots]
        assert max(sizes) - min(sizes) <= 1 and with_copies.num_slots == E + N


def test_hot_expert_gets_the_redundant_copy():
    loads = [100.0, 1, 1, 1, 1, 1, 1, 1]
    p = plan_placement(loads, 2, redundant=1)
    assert p.copies(0) == [0, 1]
    assert p.imbalance(loads) < 1.05 < contiguous(8, 2).imbalance(loads)


def test_head_split_divides_query_and_kv_heads():
    assert head_split(64, 8, 4, 1) == (range(16, 32), range(2, 4))
    assert head_split(64, 8, 8, 7) == (range(56, 64), range(7, 8))
    assert head_split(4, 2, 4, 3) == (range(3, 4), range(1, 2))  # fewer kv heads than ranks: shared
    with pytest.raises(ValueError):
        head_split(6, 2, 4, 0)


@pytest.mark.parametrize("preset,ranks", [("gpt-oss-120b", 4), ("gpt-oss-120b", 8), ("gpt-oss-20b", 1),
                                          ("gpt-oss-20b", 2)])
def test_presets_fit_80gb_with_room_for_kv(preset, ranks):
    config = GptOssConfig.from_preset(preset)
    per_rank = layout_bytes(config, ranks)
    one = layout_bytes(config, 1)[0]
    # experts and attention divide by the rank count (contiguous split of E experts is even here)
    assert sum(r.experts for r in per_rank) == one.experts
    assert all(r.experts == one.experts // ranks for r in per_rank)
    assert sum(r.attention for r in per_rank) == pytest.approx(one.attention, rel=0.01)
    assert per_rank[0].kv_bytes_per_token * ranks == one.kv_bytes_per_token
    # one rank of 20b at ep 1 is the whole checkpoint: the shape arithmetic matches checkpoint_bytes
    if ranks == 1:
        assert abs(one.total - config.checkpoint_bytes()) / config.checkpoint_bytes() < 0.001
    for r in per_rank:
        free = 80e9 - r.total
        assert free > 0.5 * 80e9 and free // r.kv_bytes_per_token > 100_000


def test_cli_layout_and_plan(tmp_path, capsys):
    assert main(["experts", "layout", "--preset", "gpt-oss-120b", "--ranks", "8"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["fits"] and len(result["per_rank_bytes"]) == 8 and result["max_rank_bytes"] < 11e9

    stats = tmp_path / "stats.json"
    skew = [[1000, 900, 10, 10, 10, 10, 10, 10], [10, 10, 10, 10, 10, 10, 500, 500]]
    stats.write_text(json.dumps({"tokens_per_expert": skew}))
    assert main(["experts", "plan", "--stats", str(stats), "--ranks", "2", "--redundant", "2"]) == 0
    out = capsys.readouterr().out
    result = json.loads(out.strip().splitlines()[-1])
    assert "max/mean" in out
    assert result["imbalance_before"] == pytest.approx(max(contiguous(8, 2).imbalance(l) for l in skew))
    assert result["imbalance_after"] < 1.1 < result["imbalance_before"]
    assert read_stats(str(stats)) == [[float(x) for x in layer] for layer in skew]
