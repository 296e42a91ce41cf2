"""model_info_for: the one ModelInfo a replica reports, for each engine kind and parallel layout."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from cluster.config import load_config
from cluster.engine.request import ModelLimits
from cluster.model.config import GptOssConfig
from cluster.serving.model_info import model_info_for

# Only what model_info_for reads of an engine: its limits and whether it reports logprobs.
ENGINE = SimpleNamespace(limits=ModelLimits(vocab_size=201088, context_length=4096), supports_logprobs=True)


@pytest.mark.parametrize("overrides,layout", [
    ({"engine.kind": "torch"}, (1, 1, 0.0)),
    ({"engine.kind": "torch", "parallel.ep_size": 4, "serving.num_gpus": 1.0}, (4, 4, 4.0)),
    ({"engine.kind": "vllm", "engine.vllm.tensor_parallel_size": 2, "serving.num_gpus": 1.0}, (1, 2, 2.0)),
    ({"engine.kind": "vllm", "engine.vllm.tensor_parallel_size": 2, "engine.vllm.data_parallel_size": 2,
      "engine.vllm.enable_expert_parallel": True, "serving.num_gpus": 1.0}, (4, 2, 4.0)),
    ({"engine.kind": "echo"}, (1, 1, 0.0)),
])
def test_layout_and_defaults_come_from_the_config(tmp_path, overrides, layout):
    config = load_config(env={}, overrides={"engine.default_max_tokens": 77, "model.path": str(tmp_path),
                                            "model.preset": "", **overrides})
    if config.engine.kind == "echo":
        info = model_info_for(config, ENGINE)
    else:
        info = model_info_for(config, ENGINE, tmp_path, GptOssConfig.from_preset("tiny"))
    assert (info.expert_parallel_size, info.tensor_parallel_size, info.gpus_per_replica) == layout
    assert info.default_max_tokens == 77 and info.engine == config.engine.kind
    assert info.num_experts == (0 if config.engine.kind == "echo" else 8)
