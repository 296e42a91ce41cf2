"""ray.gcsFaultTolerance: the RayService's GCS keeps its state in an external Redis (KubeRay's
gcsFaultToleranceOptions), and the pods that must outlive a head restart, the Ray workers and the
front doors, wait for the GCS as long as the value says; so does the front door process itself
(ray.gcs_reconnect_timeout_s). tests/faults (head_restart) shows what this buys on a real cluster."""

from __future__ import annotations

import yaml

from cluster.config import load_config
from tests.helm.helm_chart import one, render, render_error, validate_object

RECONNECT_ENV = "RAY_gcs_rpc_server_reconnect_timeout_s"
ON = {"ray.gcsFaultTolerance.enabled": "true", "ray.gcsFaultTolerance.redisAddress": "redis-ha.db:6379",
      "ray.gcsFaultTolerance.passwordSecret": "redis-pw", "ray.gcsFaultTolerance.reconnectTimeoutS": "300"}


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def _pods(objects: list[dict]) -> dict[str, dict]:
    """The Ray head's, the first worker group's and the front door's container."""
    cluster = one(objects, "RayService")["spec"]["rayClusterConfig"]
    return {"head": cluster["headGroupSpec"]["template"]["spec"]["containers"][0],
            "worker": cluster["workerGroupSpecs"][0]["template"]["spec"]["containers"][0],
            "frontdoor": one(objects, "Deployment", "-frontdoor")["spec"]["template"]["spec"]["containers"][0]}


def _frontdoor_config(objects: list[dict], tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(one(objects, "ConfigMap", "-frontdoor")["data"]["config.yaml"])
    return load_config(path, env={})


def test_off_by_default_nothing_of_it_renders(tmp_path):
    objects = render()
    assert "gcsFaultToleranceOptions" not in one(objects, "RayService")["spec"]["rayClusterConfig"]
    assert not [name for name, container in _pods(objects).items() if RECONNECT_ENV in _env(container)]
    assert _frontdoor_config(objects, tmp_path).ray.gcs_reconnect_timeout_s == 60.0  # Ray's own default


def test_on_the_rayservice_uses_the_redis_and_workers_and_front_doors_wait_for_a_restarting_head(tmp_path):
    objects = render(**ON)
    options = one(objects, "RayService")["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"]
    assert options == {"redisAddress": "redis-ha.db:6379",
                       "redisPassword": {"valueFrom": {"secretKeyRef": {"name": "redis-pw", "key": "password"}}}}
    assert "externalStorageNamespace" not in options  # KubeRay's default, the cluster's UID: one per upgrade
    pods = _pods(objects)
    assert _env(pods["worker"])[RECONNECT_ENV]["value"] == "300"
    assert _env(pods["frontdoor"])[RECONNECT_ENV]["value"] == "300"
    assert RECONNECT_ENV not in _env(pods["head"])  # the head restarts as a whole; KubeRay leaves it unset too
    assert "RAY_AUTH_TOKEN" in _env(pods["frontdoor"])
    assert _frontdoor_config(objects, tmp_path).ray.gcs_reconnect_timeout_s == 300.0
    for obj in objects:
        validate_object(obj)  # the RayService against KubeRay's CRD


def test_a_redis_without_a_password_renders_no_password():
    objects = render(**{k: v for k, v in ON.items() if k != "ray.gcsFaultTolerance.passwordSecret"})
    options = one(objects, "RayService")["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"]
    assert options == {"redisAddress": "redis-ha.db:6379"}


def test_on_without_a_redis_address_is_refused_naming_the_value():
    assert "ray.gcsFaultTolerance.redisAddress is required" in render_error(**{"ray.gcsFaultTolerance.enabled": "true"})
    assert "redisAddress" in render_error(**{**ON, "ray.gcsFaultTolerance.redisAddress": "http://redis"})
