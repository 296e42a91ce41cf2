"""engine.kind vllm without vLLM: config -> AsyncEngineArgs keywords, GPU reservation, the deploy presets.

The GPU layouts are checked as Serve options only: no GPU runs them in CI."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster.config import ConfigError, load_config
from cluster.engine.vllm_engine import engine_args_for, _invalid
from cluster.serving.builder import vllm_placement

PRESETS = Path(__file__).resolve().parents[2] / "deploy" / "vllm"


def config(**overrides):
    return load_config(env={}, overrides={"engine.kind": "vllm", **overrides})


def test_engine_args_map_our_config_one_to_one():
    c = config(**{"engine.vllm.tensor_parallel_size": 4, "engine.vllm.enable_expert_parallel": True,
                  "engine.vllm.gpu_memory_utilization": 0.95, "engine.vllm.max_num_batched_tokens": 1024,
                  "engine.vllm.max_model_len": 8192, "engine.vllm.async_scheduling": True,
                  "engine.max_num_seqs": 48, "engine.enable_prefix_caching": False})
    args = engine_args_for(c, "/m", "bfloat16")
    assert args["model"] == "/m" and args["dtype"] == "bfloat16" and args["skip_tokenizer_init"]
    assert (args["tensor_parallel_size"], args["data_parallel_size"], args["enable_expert_parallel"]) == (4, 1, True)
    assert (args["gpu_memory_utilization"], args["max_num_batched_tokens"], args["max_model_len"]) == (0.95, 1024, 8192)
    assert args["async_scheduling"] and args["max_num_seqs"] == 48 and not args["enable_prefix_caching"]
    assert "distributed_executor_backend" not in args  # vLLM's choice unless set


def test_zero_means_vllms_default():
    args = engine_args_for(config(), "/m")
    assert "max_model_len" not in args and "max_num_batched_tokens" not in args and "async_scheduling" not in args


def test_cpu_replica_reserves_nothing_extra():
    assert vllm_placement(config()) == {}


def test_multiprocessing_backend_reserves_the_world_on_the_actor():
    c = config(**{"serving.num_gpus": 1, "engine.vllm.tensor_parallel_size": 2, "engine.vllm.data_parallel_size": 2})
    assert vllm_placement(c) == {"ray_actor_options": {"num_cpus": 0.0, "num_gpus": 4.0}}


def test_ray_backend_reserves_one_bundle_per_gpu_and_no_gpu_on_the_actor():
    c = config(**{"serving.num_gpus": 1, "serving.num_cpus": 2, "engine.vllm.tensor_parallel_size": 8,
                  "engine.vllm.distributed_executor_backend": "ray"})
    options = vllm_placement(c)
    assert options["ray_actor_options"] == {"num_cpus": 2.0, "num_gpus": 0}
    bundles = options["placement_group_bundles"]
    assert bundles[0] == {"GPU": 1.0, "CPU": 2.0} and bundles[1:] == [{"GPU": 1.0}] * 7
    assert sum(b["GPU"] for b in bundles) == 8 and options["placement_group_strategy"] == "STRICT_PACK"


@pytest.mark.parametrize("field, value", [("engine.vllm.tensor_parallel_size", 0),
                                          ("engine.vllm.gpu_memory_utilization", 1.2),
                                          ("engine.vllm.distributed_executor_backend", "slurm")])
def test_bad_vllm_settings_name_the_field(field, value):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        config(**{field: value})


@pytest.mark.parametrize("name, world, ep", [("gpt-oss-120b-1xh100.yaml", 1, False),
                                             ("gpt-oss-120b-4xh100-ep.yaml", 4, True),
                                             ("gpt-oss-120b-8xh100-ep.yaml", 8, True)])
def test_gpu_presets_load_and_reserve_their_gpus(name, world, ep):
    c = load_config(PRESETS / name, env={})
    v = c.engine.vllm
    assert c.engine.kind == "vllm" and v.tensor_parallel_size * v.data_parallel_size == world
    assert v.enable_expert_parallel == ep
    options = vllm_placement(c)
    reserved = options["ray_actor_options"]["num_gpus"] + sum(
        b.get("GPU", 0) for b in options.get("placement_group_bundles", []))
    assert reserved == world
    if name.endswith("1xh100.yaml"):  # vLLM's recipe for TP1 on H100
        assert (v.gpu_memory_utilization, v.max_num_batched_tokens) == (0.95, 1024)


def test_vllm_field_names_map_to_ours():
    assert _invalid(ValueError("temperature must be non-negative")).field == "sampling.temperature"
