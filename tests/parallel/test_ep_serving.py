"""ep_size 2 through Ray Serve and gRPC: parity with the ep 1 app, per-rank memory from the workers,
expert metrics, and a killed worker -> UNAVAILABLE fast, then the replica comes back."""

from __future__ import annotations

import copy
import os
import signal
import time

import grpc
import pytest
from prometheus_client import CollectorRegistry

from gptoss.v1 import inference_pb2 as pb
from gptoss.v1 import inference_pb2_grpc

PROMPT = [200006, 1428, 200008, 13225, 11, 2375, 0, 200007, 200006, 173781]
APP = "gptoss-ep2"


def generate(stub, prompt, max_tokens, timeout=120):
    request = pb.GenerateRequest(prompt_token_ids=prompt,
                                 sampling=pb.SamplingParams(max_tokens=max_tokens, ignore_stop=True))
    tokens = []
    for response in stub.Generate(request, timeout=timeout):
        if response.HasField("chunk"):
            tokens.extend(response.chunk.token_ids)
    return tokens


@pytest.fixture(scope="module")
def ep_app(ray_serving, serving_config):
    from ray import serve

    from cluster.metrics import FrontdoorMetrics
    from cluster.serving.builder import build_app
    from tests.conftest import BackgroundFrontdoor

    config = copy.deepcopy(serving_config)
    config.serving.app_name = APP
    config.parallel.ep_size = 2
    config.parallel.collective_timeout_s = 5.0
    config.serving.graceful_shutdown_timeout_s = 1.0
    config.validate()
    handle = serve.run(build_app(config), name=APP, route_prefix=None)
    door = BackgroundFrontdoor(handle, config.frontdoor, FrontdoorMetrics(CollectorRegistry()))
    channel = grpc.insecure_channel(door.target)
    yield handle, inference_pb2_grpc.InferenceStub(channel)
    channel.close()
    door.close()
    serve.delete(APP)


def test_ep2_serving_matches_ep1_through_grpc(ep_app, stub):
    handle, ep_stub = ep_app
    expected = generate(stub, PROMPT, 24)  # the session's ep 1 app
    assert generate(ep_stub, PROMPT, 24) == expected
    reports = handle.expert_memory.remote().result(timeout_s=30)
    assert [r["rank"] for r in reports] == [0, 1]
    assert reports[0]["expert_bytes"] == reports[1]["expert_bytes"] > 0
    assert all(r["kv_heads"] == 1 and r["q_heads"] == 2 for r in reports)  # tiny: 4 q / 2 kv heads
    stats = handle.expert_stats.remote().result(timeout_s=30)
    assert stats["ep_size"] == 2 and sum(map(sum, stats["tokens_per_expert_total"])) > 0
    text = handle.expert_metrics_text.remote().result(timeout_s=30)
    assert 'gptoss_expert_tokens_total{expert="0",layer="0"}' in text
    assert "gptoss_expert_imbalance_ratio" in text


def test_killed_worker_fails_requests_fast_and_the_replica_comes_back(ep_app, stub):
    handle, ep_stub = ep_app
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
