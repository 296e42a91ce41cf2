from __future__ import annotations

import pytest

from cluster.config import ClusterConfig, ConfigError, env_var_name, from_dict, load_config, to_dict


def test_defaults_fit_the_embedded_path():
    config = load_config(env={})
    assert config.model.path is None and config.model.preset == "gpt-oss-tiny"
    assert (config.frontdoor.host, config.frontdoor.grpc_port, config.frontdoor.metrics_port) == (
        "127.0.0.1", 50051, 9464)
    assert config.serving.replicas == 1 and config.serving.num_cpus == 0.0
    assert config.ray.address is None
    engine = config.engine
    assert engine.kind == "torch" and engine.enable_prefix_caching
    assert (engine.block_size, engine.max_num_seqs, engine.max_num_batched_tokens) == (16, 32, 512)
    # Serve lets enough requests reach a replica for the engine's own queue to fill.
    assert config.serving.max_ongoing_requests >= engine.max_num_seqs + engine.max_waiting_requests


def test_engine_settings_come_from_yaml_and_env(tmp_path):
    path = tmp_path / "cluster.yaml"
    path.write_text("engine:\n  block_size: 32\n  kv_cache_memory_mib: 8\n  enable_prefix_caching: false\n")
    config = load_config(path, env={"GPTOSS_ENGINE_MAX_WAITING_REQUESTS": "5"})
    assert (config.engine.block_size, config.engine.kv_cache_memory_mib) == (32, 8.0)
    assert not config.engine.enable_prefix_caching and config.engine.max_waiting_requests == 5


def test_layers_yaml_then_env_then_flags(tmp_path):
    path = tmp_path / "cluster.yaml"
    path.write_text("serving:\n  replicas: 2\n  num_cpus: 0.5\nfrontdoor:\n  grpc_port: 6000\nlog_level: info\n")
    env = {"GPTOSS_SERVING_REPLICAS": "3", "GPTOSS_CACHE_DIR": "/tmp/x", "GPTOSS_RAY_ADDRESS": "auto"}
    config = load_config(path, env=env, overrides={"serving.replicas": 4, "frontdoor.host": None})
    assert config.serving.replicas == 4  # flag beats env beats YAML
    assert config.serving.num_cpus == 0.5  # YAML beats default
    assert config.frontdoor.grpc_port == 6000
    assert config.frontdoor.host == "127.0.0.1"  # an unset flag keeps the lower layer
    assert config.cache_dir == "/tmp/x" and config.ray.address == "auto"
    assert config.log_level == "info"


def test_env_var_names_follow_the_upper_path():
    assert env_var_name("serving.replicas") == "GPTOSS_SERVING_REPLICAS"
    assert env_var_name("frontdoor.grpc_port") == "GPTOSS_FRONTDOOR_GRPC_PORT"


@pytest.mark.parametrize("overrides, message", [
    ({"serving.replicas": 0}, "config: serving.replicas must be >= 1, got 0"),
    ({"frontdoor.grpc_port": 70000}, "config: frontdoor.grpc_port must be in [0, 65535], got 70000"),
    ({"serving.num_cpus": -1}, "config: serving.num_cpus must be >= 0, got -1.0"),
    ({"log_level": "loud"}, "config: log_level must be one of debug, info, warning, error, got 'loud'"),
    ({"engine.chunk_interval_ms": 5000}, "config: engine.chunk_interval_ms must be in [0, 1000], got 5000.0"),
    ({"engine.max_num_seqs": 0}, "config: engine.max_num_seqs must be >= 1, got 0"),
    ({"engine.max_num_seqs": 64, "engine.max_num_batched_tokens": 32},
     "config: engine.max_num_batched_tokens must be >= engine.max_num_seqs (else running requests could starve), got 32"),
    ({"engine.max_waiting_requests": 0}, "config: engine.max_waiting_requests must be >= 1, got 0"),
    ({"engine.block_size": 0}, "config: engine.block_size must be in [1, 1024], got 0"),
    ({"engine.kv_cache_memory_mib": 0}, "config: engine.kv_cache_memory_mib must be > 0, got 0.0"),
    ({"frontdoor.load_poll_interval_s": -1}, "config: frontdoor.load_poll_interval_s must be >= 0, got -1.0"),
])
def test_invalid_values_fail_naming_the_field(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config(env={}, overrides=overrides)
    assert str(info.value) == message


def test_bad_types_and_unknown_keys_name_their_source(tmp_path):
    with pytest.raises(ConfigError, match=r"config: serving.replicas must be int, got 'two' \(GPTOSS_SERVING_REPLICAS\)"):
        load_config(env={"GPTOSS_SERVING_REPLICAS": "two"})
    path = tmp_path / "c.yaml"
    path.write_text("serving:\n  replica: 2\n")
    with pytest.raises(ConfigError, match="unknown field 'serving.replica'"):
        load_config(path, env={})
    path.write_text("serving:\n  replicas: 1.5\n")
    with pytest.raises(ConfigError, match="serving.replicas must be int"):
        load_config(path, env={})


def test_optional_fields_accept_none_from_env():
    config = load_config(env={"GPTOSS_RAY_NUM_CPUS": "none", "GPTOSS_MODEL_PATH": "/ckpt"})
    assert config.ray.num_cpus is None and config.model.path == "/ckpt"


def test_round_trips_through_a_dict():
    config = load_config(env={}, overrides={"serving.replicas": 2})
    assert from_dict(to_dict(config)) == config
    assert isinstance(from_dict(to_dict(ClusterConfig())), ClusterConfig)


def test_every_bad_value_is_reported_at_once_each_naming_its_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("engine:\n  max_waiting_requests: 0\n  max_num_seqs: 64\n  max_num_batched_tokens: 32\n"
                    "serving:\n  replica: 2\n  autoscaling: {min_replicas: 3, max_replicas: 2}\n"
                    "frontdoor:\n  tls: {key_file: /k.pem}\n")
    env = {"GPTOSS_FRONTDOOR_HTTP_PORT": "web", "GPTOSS_LOG_LEVEL": "loud", "GPTOSS_PARALLEL_EP_SIZE": "2"}
    with pytest.raises(ConfigError) as info:
        load_config(path, env=env, overrides={"engine.kind": "echo"})
    assert sorted(info.value.messages) == sorted([
        "config: engine.max_waiting_requests must be >= 1, got 0",
        "config: engine.max_num_batched_tokens must be >= engine.max_num_seqs (else running requests could starve), got 32",
        f"config: unknown field 'serving.replica' ({path})",
        "config: serving.autoscaling.max_replicas must be >= serving.autoscaling.min_replicas, got 2",
        "config: frontdoor.tls.key_file must be set exactly when frontdoor.tls.cert_file is, got '/k.pem'",
        "config: frontdoor.http_port must be int, got 'web' (GPTOSS_FRONTDOOR_HTTP_PORT)",
        "config: log_level must be one of debug, info, warning, error, got 'loud'",
        "config: parallel.ep_size needs engine.kind torch, got 2",  # a rule across sections, checked too
    ])
    assert str(info.value) == "\n".join(info.value.messages)


def test_a_rule_over_a_bad_value_is_not_reported_twice():
    # engine.max_num_seqs is bad itself; the batched-tokens rule that reads it says nothing more.
    with pytest.raises(ConfigError) as info:
        load_config(env={}, overrides={"engine.max_num_seqs": 0, "engine.max_num_batched_tokens": 16})
    assert info.value.messages == ("config: engine.max_num_seqs must be >= 1, got 0",)


def test_validate_checks_values_assigned_after_loading():
    config = load_config(env={})
    config.engine.max_num_seqs = 1024
    config.frontdoor.grpc_port = -5
    with pytest.raises(ConfigError) as info:
        config.validate()
    assert info.value.messages == (
        "config: engine.max_num_batched_tokens must be >= engine.max_num_seqs (else running requests could starve), got 512",
        "config: frontdoor.grpc_port must be in [0, 65535], got -5")


def test_the_engine_components_take_their_sizes_from_the_one_engine_config():
    """engine.max_waiting_requests has one default, the config's: the core's scheduler refuses the
    request past max_num_seqs + max_waiting_requests with nothing of its own in between."""
    import torch

    from cluster.config import EngineConfig
    from cluster.engine.core import EngineCore
    from cluster.engine.errors import EngineOverloadedError
    from cluster.engine.sequence import SamplingSettings, Sequence
    from cluster.model.config import GptOssConfig
    from cluster.model.transformer import GptOssModel

    torch.manual_seed(0)
    model = GptOssModel(GptOssConfig.from_preset("tiny")).eval()
    engine = ClusterConfig().engine
    assert engine.max_waiting_requests == 64 and isinstance(engine, EngineConfig)
    core = EngineCore(model, EngineConfig(max_num_seqs=2, max_num_batched_tokens=8, max_waiting_requests=3))
    assert core.scheduler.config is core.config
    settings = SamplingSettings(max_tokens=1, stop_token_ids=())
    for i in range(5):
        core.add_request(Sequence(f"r{i}", [1, 2, 3], settings))
    with pytest.raises(EngineOverloadedError):
        core.add_request(Sequence("r5", [1, 2, 3], settings))
