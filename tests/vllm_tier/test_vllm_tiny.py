"""gpt-oss-tiny on the vLLM engine: the same real harmony conversations as the torch engine's
end-to-end tests (tests/tiny/conversations.py), through gRPC -> front door -> Serve -> VllmEngine ->
vLLM's AsyncLLM. vLLM's CPU build has no MXFP4 MoE kernel, so this app loads the trained weights
rebuilt with bf16 experts (the same values the MXFP4 blocks hold)."""

from __future__ import annotations

import pytest

from tests.parallel.ep_apps import EpApp
from tests.tiny.conversations import EVERY_CONVERSATION
from tests.vllm_tier.conftest import require_vllm

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def vllm_tiny_stub(ray_serving, serving_config, tmp_path_factory):
    from cluster.config import from_dict, to_dict
    from cluster.model.trained import build_trained_checkpoint

    require_vllm()
    path = build_trained_checkpoint("gpt-oss-tiny", tmp_path_factory.mktemp("gpt-oss-tiny-bf16"), mxfp4=False)
    data = to_dict(serving_config)
    data["model"].update(path=str(path), preset="", name="gpt-oss-tiny")
    data["engine"]["kind"] = "vllm"
    data["engine"]["vllm"].update(enforce_eager=True, cpu_kv_cache_space_gib=1)
    app = EpApp(from_dict(data), "gptoss-vllm-tiny")
    yield app.stub
    app.close()


@EVERY_CONVERSATION
def test_a_real_conversation_on_vllm(vllm_tiny_stub, check):
    check(vllm_tiny_stub)
