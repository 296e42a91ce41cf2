"""ep_size 4 through Ray Serve and gRPC (4 CPU bundles, gloo), against the session's ep 1 app:
identical greedy tokens and top log probabilities within 1e-5 (the logits as gRPC exposes them:
log-softmax in float32). The rebalancer runs every 0.5 s from the first requests on, so the first
comparison already spans placement changes between steps; the second runs after a confirmed
rebalancing that placed redundant expert copies."""

from __future__ import annotations

import time

import pytest
from conftest import prompts_of
from ep_apps import EpApp, generate, wait_for

pytestmark = pytest.mark.slow

APP = "gptoss-ep4"
NEW_TOKENS = 6
TOP = 5  # alternatives per position compared


@pytest.fixture(scope="module")
def ep4_app(ray_serving, serving_config):
    # With the per-expert token series off (the ep 2 test scrapes them with it on).
    app = EpApp(serving_config, APP, ep_size=4, redundant_experts=2, rebalance_interval_s=0.5, expert_token_series=False)
    yield app
    app.close()


def assert_same_as_ep1(ep4_stub, stub, prompts) -> None:
    for prompt in prompts:
        tokens, top = generate(stub, prompt, NEW_TOKENS, logprobs=TOP)
        got_tokens, got_top = generate(ep4_stub, prompt, NEW_TOKENS, logprobs=TOP)
        assert got_tokens == tokens
        assert len(got_top) == len(top) == NEW_TOKENS
        for position, (a, b) in enumerate(zip(got_top, top)):
            assert [t for t, _ in a] == [t for t, _ in b], f"position {position}"
            assert max(abs(x - y) for (_, x), (_, y) in zip(a, b)) <= 1e-5, f"position {position}: {a} vs {b}"


def test_ep4_matches_ep1_through_grpc_before_and_after_a_rebalancing(ep4_app, stub):
    handle = ep4_app.handle
    vocab = handle.model_info.remote().result(timeout_s=30).vocab_size
    prompts = prompts_of([4, 9], vocab, seed=5)
    assert_same_as_ep1(ep4_app.stub, stub, prompts)
    reports = handle.expert_memory.remote().result(timeout_s=30)
    assert [r["rank"] for r in reports] == [0, 1, 2, 3]

    def rebalanced():
        # The rebalancer plans before a step once its interval has passed: give it steps to plan at.
        stats = handle.expert_stats.remote().result(timeout_s=30)
        if stats["rebalances"]:
            return stats
        time.sleep(0.6)
        generate(ep4_app.stub, prompts[0], 3)
        return None

    stats = wait_for(rebalanced, 60, "a rebalancing", interval_s=0)
    first = stats["rebalances"][0]
    print(f"\nep 4 rebalanced while serving: max/mean {first['imbalance_before']:.3f} -> "
          f"{first['imbalance_after']:.3f} ({first['layers_changed']} layers)")
    assert first["imbalance_after"] < first["imbalance_before"]
    copies = [sum(e in slots for slots in p["slots"]) for p in stats["placements"] for e in range(p["num_experts"])]
    assert max(copies) > 1, "redundant expert copies in use"
    assert_same_as_ep1(ep4_app.stub, stub, prompts)

    replica_id, _ = handle.load_report.remote().result(timeout_s=30)
    applied = len(handle.expert_stats.remote().result(timeout_s=30)["rebalances"])
    key = ("gptoss_expert_rebalances_total", frozenset({"replica": replica_id}.items()))
    wait_for(lambda: ep4_app.scrape().get(key) == applied, 15, f"the front door's rebalance count ({applied})")
    scraped = ep4_app.scrape()
    mine = [name for name, labels in scraped if dict(labels).get("replica") == replica_id]
    assert "gptoss_expert_imbalance_ratio" in mine and "gptoss_expert_tokens_total" not in mine
