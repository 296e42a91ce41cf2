"""Every ClusterConfig key (cluster/config.py) can be set through the Helm chart: the helper
gptoss-cluster.clusterConfig renders it into the configuration the front doors and the Serve
application load, or it is listed in LEFT_OUT with the reason a Helm deployment has no use for it.
A key added to the config without either fails here."""

from __future__ import annotations

import pytest
import yaml

from cluster.config import FIELDS, load_config
from tests.helm.helm_chart import one, render

LEFT_OUT = {
    "engine.echo_tokens_per_s": "engine.kind echo is a test engine for measuring the serving path; the chart deploys "
                                "models (the kind itself is mapped, with echo's default rate)",
    "engine.vllm.cpu_kv_cache_space_gib": "vllm-cpu only; the chart's vllm presets run vLLM on GPUs",
    "engine.vllm.cpu_omp_threads_bind": "vllm-cpu only; the chart's vllm presets run vLLM on GPUs",
    "serving.keep_off_engine_cores": "read only by `gptoss-cluster serve`, over the processes below it; under KubeRay "
                                     "the replicas run in worker pods no `serve` starts, and the chart's vllm presets "
                                     "run vLLM on GPUs",
    "serving.frontdoor_engine_client": "the chart's front doors run in pods of their own, which share neither host name "
                                       "nor /tmp (the engine core's IPC sockets) with a replica's pod: they take the "
                                       "direct stream whatever the key says",
    "serving.placement_timeout_s": "read only by `gptoss-cluster serve` while it waits for its replicas to be placed; "
                                   "under KubeRay the RayService's status reports a replica that cannot be placed",
    "frontdoor.auth.api_keys_env": "the chart mounts the API keys from a Secret as frontdoor.auth.api_keys_file; an "
                                   "environment variable of keys would put them in the pod spec",
    "ray.num_cpus": "sizes a local Ray the process starts itself; the chart's pods join KubeRay's cluster (ray.address)",
    "ray.temp_dir": "the directory of a local Ray the process starts itself; the chart's pods join KubeRay's cluster",
}

# Values that make the helper render the keys it writes only when they are needed: the direct
# stream's and the front door's certificate files, the tenants file, a Redis URL, the GCS reconnect
# timeout of GCS fault tolerance.
CONDITIONAL_VALUES = {
    "serving.directStreamTls.existingSecret": "gptoss-direct-tls",
    "frontdoor.tls.existingSecret": "gptoss-tls", "frontdoor.tls.clientCa": "true",
    "frontdoor.tenants.acme.maxConcurrentStreams": "2",
    "frontdoor.responses.store": "redis", "frontdoor.responses.redis.url": "redis://redis:6379/0",
    "ray.gcsFaultTolerance.enabled": "true", "ray.gcsFaultTolerance.redisAddress": "redis-ha:6379",
}


def key_paths(data: dict, prefix: str = "") -> set[str]:
    paths: set[str] = set()
    for key, value in data.items():
        if isinstance(value, dict) and f"{prefix}{key}" not in FIELDS:
            paths |= key_paths(value, f"{prefix}{key}.")
        else:
            paths.add(f"{prefix}{key}")
    return paths


def frontdoor_config_file(**sets: str) -> dict:
    """The config file the chart gives the front doors: the Serve application's args plus ray.address
    (tests/helm/test_helm_serve_config.py checks the two agree)."""
    return yaml.safe_load(one(render("defaults", **sets), "ConfigMap", "-frontdoor")["data"]["config.yaml"])


def test_every_config_key_is_rendered_by_the_chart_or_left_out_with_a_reason():
    rendered = key_paths(frontdoor_config_file(**CONDITIONAL_VALUES))
    assert rendered <= set(FIELDS), f"the chart renders keys the config does not have: {sorted(rendered - set(FIELDS))}"
    missing = set(FIELDS) - rendered - set(LEFT_OUT)
    assert not missing, f"map these in helm/gptoss-cluster/templates/_helpers.tpl or list them in LEFT_OUT: {sorted(missing)}"
    assert not set(LEFT_OUT) & rendered, f"mapped now, take them out of LEFT_OUT: {sorted(set(LEFT_OUT) & rendered)}"
    assert set(LEFT_OUT) <= set(FIELDS), f"LEFT_OUT names keys the config no longer has: {sorted(set(LEFT_OUT) - set(FIELDS))}"


@pytest.mark.parametrize("value, key, expected", [
    ("engine.vllm.structuredOutputs=true", "engine.vllm.structured_outputs", True),
    ("serving.router.prefixBlocksPerReplica=1024", "serving.router.prefix_blocks_per_replica", 1024),
    ("serving.router.blockSize=32", "serving.router.block_size", 32),
    ("serving.router.statsPeriodS=2", "serving.router.stats_period_s", 2.0),
    ("frontdoor.replicaWaitS=12", "frontdoor.replica_wait_s", 12.0),
    ("frontdoor.migrationAttempts=0", "frontdoor.migration_attempts", 0),
    ("frontdoor.responses.maxEntries=50", "frontdoor.responses.max_entries", 50),
    ("parallel.statsWindowSteps=64", "parallel.stats_window_steps", 64),
    ("parallel.bundleCpus=2", "parallel.bundle_cpus", 2.0),
    ("parallel.collectiveTimeoutS=30", "parallel.collective_timeout_s", 30.0),
])
def test_a_helm_value_reaches_the_loaded_config(value, key, expected, tmp_path):
    name, setting = value.split("=")
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(frontdoor_config_file(**{name: setting})))
    config = load_config(path, env={})
    got = config
    for part in key.split("."):
        got = getattr(got, part)
    assert got == expected
