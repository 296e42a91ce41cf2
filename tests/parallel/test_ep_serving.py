"""ep_size 2 through Ray Serve and gRPC: parity with the ep 1 app, per-rank memory from the workers,
expert metrics, and a killed worker -> UNAVAILABLE fast, then the replica comes back."""

from __future__ import annotations

import os
import signal
import time

import grpc
import pytest
from ep_apps import EpApp, generate

from gptoss.v1 import inference_pb2 as pb

PROMPT = [200006, 1428, 200008, 13225, 11, 2375, 0, 200007, 200006, 173781]
APP = "gptoss-ep2"


@pytest.fixture(scope="module")
def ep_app(ray_serving, serving_config):
    app = EpApp(serving_config, APP, ep_size=2)
    yield app.handle, app.stub, app
    app.close()


def test_ep2_serving_matches_ep1_through_grpc(ep_app, stub):
    handle, ep_stub, app = ep_app
    expected = generate(stub, PROMPT, 24)  # the session's ep 1 app
    assert generate(ep_stub, PROMPT, 24) == expected
    reports = handle.expert_memory.remote().result(timeout_s=30)
    assert [r["rank"] for r in reports] == [0, 1]
    assert reports[0]["expert_bytes"] == reports[1]["expert_bytes"] > 0
    assert all(r["kv_heads"] == 1 and r["q_heads"] == 2 for r in reports)  # tiny: 4 q / 2 kv heads
    stats = handle.expert_stats.remote().result(timeout_s=30)
    assert stats["ep_size"] == 2 and sum(map(sum, stats["tokens_per_expert_total"])) > 0

    # The front door relays the replica's expert routing counts on its /metrics (its poller runs
    # every 0.5 s, so a report may predate the end of the request: wait for the final count). The
    # app has computed one request: 10 prompt + 23 fed-back tokens, each routed to top-4 experts
    # in every layer.
    expected_per_layer = 4 * (len(PROMPT) + 23)
    assert [sum(row) for row in stats["tokens_per_expert_total"]] == [expected_per_layer] * 4
    deadline = time.monotonic() + 30
    while True:
        samples = app.scrape()
        tokens: dict[str, float] = {}
        for (name, labels), value in samples.items():
            if name == "gptoss_expert_tokens_total":
                layer = dict(labels)["layer"]
                tokens[layer] = tokens.get(layer, 0.0) + value
        if tokens == {layer: expected_per_layer for layer in "0123"} or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert tokens == {layer: expected_per_layer for layer in "0123"}
    replicas = {dict(labels)["replica"] for name, labels in samples if name == "gptoss_expert_imbalance_ratio"}
    assert len(replicas) == 1  # the ep 2 app's one replica
    ratios = [v for (name, _), v in samples.items() if name == "gptoss_expert_imbalance_ratio"]
    assert len(ratios) == 4 and all(r >= 1.0 for r in ratios)



def test_ep2_model_info_reports_the_layout(ep_app, serving_config):
    _, ep_stub, _ = ep_app
    info = ep_stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30)
    # Each of the 2 ranks holds half the experts and half the attention heads; no GPU on this box.
    assert (info.parallel.expert_parallel_size, info.parallel.tensor_parallel_size) == (2, 2)
    assert info.parallel.gpus_per_replica == 0.0
    assert info.default_max_tokens == serving_config.engine.default_max_tokens
    assert (info.engine, info.num_experts) == ("torch", 8)

def test_killed_worker_fails_requests_fast_and_the_replica_comes_back(ep_app, stub):
    handle, ep_stub, _ = ep_app
    expected = generate(stub, PROMPT, 16)
    pid = handle.expert_worker_pids.remote().result(timeout_s=30)[0]
    request = pb.GenerateRequest(prompt_token_ids=PROMPT, sampling=pb.SamplingParams(max_tokens=3000, ignore_stop=True))
    call = ep_stub.Generate(request, timeout=120)
    next(call)  # streaming
    os.kill(pid, signal.SIGKILL)
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        for _ in call:
            pass
    failed_after = time.monotonic() - t0
    print(f"\nworker killed: stream ended with {err.value.code().name} after {failed_after:.2f} s")
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert failed_after < 15
    deadline = time.monotonic() + 120
    while True:  # Serve replaces the replica (and its group) after the failed health check
        try:
            tokens = generate(ep_stub, PROMPT, 16, timeout=30)
            break
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.UNAVAILABLE, e
            assert time.monotonic() < deadline, "the replica did not come back"
            time.sleep(1)
    print(f"replica back {time.monotonic() - t0:.1f} s after the kill")
    assert tokens == expected
    assert handle.expert_worker_pids.remote().result(timeout_s=30)[0] != pid
