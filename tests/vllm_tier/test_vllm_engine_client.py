"""The front door as a client of the replica's vLLM engine core (serving.frontdoor_engine_client;
cluster/engine/vllm_shared.py, cluster/serving/engine_clients.py), with real vLLM: the session's
vLLM app and its front door, which runs in this process, on the replica's node.

The other tests of this tier (tokens equal to the torch engine's, cancellation aborting inside vLLM,
load signals, structured output, migration after an engine core dies) run through the same client:
the tier's front door fixture waits until it is attached."""

from __future__ import annotations

import pytest
from prometheus_client import REGISTRY

from tests.prompts import random_prompts
from tests.vllm_tier.conftest import VLLM_APP
from tests.vllm_tier.test_vllm_serving import generate, wait_until

pytestmark = pytest.mark.slow


def streams(path: str) -> float:
    return REGISTRY.get_sample_value("gptoss_router_streams_total", {
        "application": VLLM_APP, "deployment": "ModelReplica", "path": path}) or 0.0


def test_streams_go_to_the_engine_core_and_the_replica_counts_them(vllm_stub, vllm_serving):
    """Requests the replica's process never sees still count in its stats (routing, autoscaling,
    metrics): the front door's client reports them to the replica."""
    before = wait_until(lambda s: s.active_requests == 0, vllm_serving, 10, "idle")
    through_client, direct = streams("engine_client"), streams("direct")
    prompts = random_prompts([12, 30, 7, 21], seed=61)
    outputs = [generate(vllm_stub, p, max_tokens=40, ignore_stop=True) for p in prompts]
    assert all(len(tokens) == 40 and complete.usage.completion_tokens == 40 for tokens, complete in outputs)
    assert streams("engine_client") - through_client == 4 and streams("direct") == direct
    after = wait_until(lambda s: s.requests_total - before.requests_total == 4 and s.active_requests == 0,
                       vllm_serving, 5, "the replica's stats counting the front door's requests")
    assert after.finished_total - before.finished_total == 4
    assert after.tokens_generated_total - before.tokens_generated_total == 4 * 40


def test_the_same_tokens_as_through_the_replica(vllm_stub, vllm_serving, vllm_config):
    """The engine client and the replica's own client (through the Serve handle) stream the same greedy
    tokens and finish for the same prompt."""
    from cluster.engine.request import GenerateRequest, SamplingParams

    (prompt,) = random_prompts([25], seed=62)
    via_client, complete = generate(vllm_stub, prompt, max_tokens=32, ignore_stop=True)
    request = GenerateRequest(tuple(prompt), SamplingParams(max_tokens=32, ignore_stop=True))
    via_replica = [t for chunk in vllm_serving.options(stream=True).generate.remote(request) for t in chunk.token_ids]
    assert via_client == via_replica and complete.usage.completion_tokens == 32


def test_a_second_front_door_on_the_node_streams_through_the_replica(vllm_serving, vllm_config):
    """The slot is taken once: another front door process here uses the direct stream, and works."""
    import grpc
    from prometheus_client import CollectorRegistry

    from cluster.metrics import FrontdoorMetrics
    from gptoss.v1 import inference_pb2_grpc
    from tests.conftest import BackgroundFrontdoor

    door = BackgroundFrontdoor(vllm_serving, vllm_config.frontdoor, FrontdoorMetrics(CollectorRegistry()))
    try:
        with grpc.insecure_channel(door.target) as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)
            through_client = streams("engine_client")
            through_replica = streams("direct") + streams("serve_handle")
            (prompt,) = random_prompts([16], seed=63)
            tokens, _ = generate(stub, prompt, max_tokens=8, ignore_stop=True)
            assert len(tokens) == 8
            assert streams("engine_client") == through_client
            assert streams("direct") + streams("serve_handle") == through_replica + 1
    finally:
        door.close()
    wait_until(lambda s: s.active_requests == 0, vllm_serving, 5, "idle")
