"""The Serve settings the application sets for its replicas (read by Serve in the replica's
process): user code on the replica's main loop unless turned off, gc frozen after start-up, no
per-call access log unless log_level is debug, and the autoscaling push interval kept beside them."""

from __future__ import annotations

from cluster.config import load_config
from cluster.serving.builder import build_app


def _deployment(**overrides):
    return build_app(load_config(env={}, overrides=overrides))._bound_deployment


def test_defaults_run_user_code_on_the_main_loop_without_access_log():
    d = _deployment()
    env = d.ray_actor_options["runtime_env"]["env_vars"]
    assert env == {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0", "RAY_SERVE_FREEZE_GC_ON_STARTUP": "1"}
    assert d.logging_config["enable_access_log"] is False


def test_user_code_thread_and_access_log_can_come_back():
    d = _deployment(**{"serving.user_code_on_main_loop": False, "log_level": "debug"})
    assert "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD" not in d.ray_actor_options["runtime_env"]["env_vars"]
    assert d.logging_config["enable_access_log"] is True


def test_autoscaling_push_interval_joins_the_other_settings():
    d = _deployment(**{"serving.autoscaling.enabled": True, "serving.autoscaling.metrics_interval_s": 0.5})
    env = d.ray_actor_options["runtime_env"]["env_vars"]
    assert env["RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S"] == "0.5"
    assert env["RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD"] == "0"


def test_replica_logs_follow_log_level_info_without_the_access_log():
    """log_level info shows Serve's info lines about the replicas (start-up, health), not one line per call."""
    assert _deployment().logging_config["log_level"] == "WARNING"
    d = _deployment(log_level="info")
    assert d.logging_config["log_level"] == "INFO" and d.logging_config["enable_access_log"] is False
