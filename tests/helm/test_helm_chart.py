"""The Helm chart with the real helm binary: lint, the render matrix, every rendered object valid
against Kubernetes and CRD schemas, values.schema.json refusals, and per-template behaviour
("renders X when Y", "does not render X when Z") in the spirit of helm-unittest."""

from __future__ import annotations

import json

import pytest
import yaml

from tests.helm.helm_chart import (CHART, CRD_DIR, PRESETS, helm, is_crd_kind, kinds, matrix, one, render,
                                   render_error, validate_object, values_args)

CORE_DEFAULT_KINDS = {"RayService", "ConfigMap", "Deployment", "Service"}
OPTIONAL_KINDS = {"ServiceMonitor", "PodMonitor", "PrometheusRule", "HorizontalPodAutoscaler", "ScaledObject",
                  "PodDisruptionBudget", "NetworkPolicy", "Ingress"}


@pytest.mark.parametrize("preset", list(PRESETS))
def test_helm_lint_strict_passes(preset):
    result = helm("lint", "--strict", str(CHART), *values_args(preset), check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 chart(s) failed" in result.stdout


_validated: set[str] = set()


@pytest.mark.parametrize("preset,toggles", matrix(), ids=lambda v: "+".join(v) if isinstance(v, tuple) else v)
def test_every_rendered_object_validates(preset, toggles):
    objects = render(preset, toggles)
    assert CORE_DEFAULT_KINDS <= kinds(objects)
    # Core kinds first: without ../shared/k8s/crds the CRD kinds skip, after the core kinds passed.
    for obj in sorted(objects, key=is_crd_kind):
        key = json.dumps(obj, sort_keys=True)
        if key not in _validated:  # the matrix renders many identical objects; validate each once
            validate_object(obj)
            _validated.add(key)


def test_keda_scaled_object_validates_and_queries_our_metric():
    objects = render(**{"frontdoor.autoscaling.enabled": "true", "frontdoor.autoscaling.kind": "keda"})
    scaled = one(objects, "ScaledObject")
    assert "HorizontalPodAutoscaler" not in kinds(objects)
    validate_object(scaled)
    assert scaled["spec"]["scaleTargetRef"]["name"] == one(objects, "Deployment")["metadata"]["name"]
    assert "gptoss_frontdoor_requests_in_flight" in scaled["spec"]["triggers"][0]["metadata"]["query"]


def test_validation_refuses_a_broken_object():
    """The validators are live: a wrong type in a core kind and an unknown field in a CRD kind fail."""
    objects = render("defaults", ("monitoring",))
    deployment = one(objects, "Deployment")
    deployment["spec"]["replicas"] = "two"
    with pytest.raises(AssertionError, match="replicas"):
        validate_object(deployment)
    if CRD_DIR.is_dir():
        rule = one(objects, "PrometheusRule")
        rule["spec"]["groups"][0]["rules"][0]["expresion"] = "up"
        with pytest.raises(AssertionError, match="expresion"):
            validate_object(rule)


def test_defaults_render_only_the_core_objects():
    """Optional objects are off by default: they need operators (prometheus-operator, KEDA) not every cluster has."""
    objects = render()
    # + the generated API keys and Ray token, and the NetworkPolicies around Ray
    assert kinds(objects) == CORE_DEFAULT_KINDS | {"Secret", "NetworkPolicy"}
    assert not any(is_crd_kind(o) for o in objects if o["kind"] != "RayService")


@pytest.mark.parametrize("sets,expected", [
    ({"metrics.serviceMonitor.enabled": "true"}, {"ServiceMonitor"}),
    ({"metrics.podMonitor.enabled": "true"}, {"PodMonitor"}),
    ({"metrics.prometheusRule.enabled": "true"}, {"PrometheusRule"}),
    ({"frontdoor.autoscaling.enabled": "true"}, {"HorizontalPodAutoscaler"}),
    ({"frontdoor.podDisruptionBudget.enabled": "true"}, {"PodDisruptionBudget"}),
    ({"frontdoor.networkPolicy.enabled": "true"}, {"NetworkPolicy"}),
    ({"frontdoor.ingress.enabled": "true"}, {"Ingress"}),
    ({"frontdoor.responses.redis.bundled.enabled": "true"}, set()),  # core kinds only: a Deployment, a Service
], ids=lambda v: ",".join(v) if isinstance(v, set) else None)
def test_each_optional_object_renders_only_when_enabled(sets, expected):
    # (the Ray NetworkPolicies are on by default: off here, so only the toggled objects count)
    assert (kinds(render(**{"ray.networkPolicy.enabled": "false", **sets})) & OPTIONAL_KINDS) == expected


def test_grafana_dashboard_configmap_should_not_render_when_disabled_and_holds_the_file_when_enabled():
    assert not [o for o in render() if o["metadata"]["name"].endswith("-dashboard")]
    cm = one(render(**{"metrics.grafanaDashboard.enabled": "true"}), "ConfigMap", "-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"]["gptoss-cluster.json"]) == json.loads((CHART / "files/grafana-dashboard.json").read_text())


def test_prometheus_rule_renders_the_alert_rules_file():
    rule = one(render("defaults", ("monitoring",)), "PrometheusRule")
    assert rule["spec"] == yaml.safe_load((CHART / "files/prometheus-rules.yaml").read_text())


def test_gpu_worker_group_gets_gpus_tolerations_shm_and_weights():
    ray = one(render("gpt-oss-120b"), "RayService")["spec"]["rayClusterConfig"]
    group = ray["workerGroupSpecs"][0]
    pod = group["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["shm"]["emptyDir"]["medium"] == "Memory"
    assert volumes["model-weights"]["persistentVolumeClaim"]["claimName"] == "gpt-oss-120b"
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts["shm"]["mountPath"] == "/dev/shm" and mounts["model-weights"]["mountPath"] == "/models"
    assert group["minReplicas"] == 1 and group["maxReplicas"] == 8
    assert ray["enableInTreeAutoscaling"] is True
    head = ray["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"  # no replica on the CPU head
    assert "nvidia.com/gpu" not in json.dumps(head)


def test_ep4_overlay_gives_each_worker_pod_four_gpus():
    group = one(render("gpt-oss-120b-ep4"), "RayService")["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    assert group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 4


def test_tiny_cpu_preset_needs_no_gpu_and_builds_its_weights_in_the_cluster():
    objects = render("tiny-cpu")
    text = json.dumps(objects)
    assert "nvidia.com/gpu" not in text
    pod = one(objects, "RayService")["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]
    init = pod["initContainers"][0]
    assert "gptoss-cluster checkpoint make --preset \"gpt-oss-tiny\"" in init["args"][0]
    assert "mv -T" in init["args"][0] and "/models/gpt-oss-tiny" in init["args"][0]
    assert {v["name"]: v for v in pod["volumes"]}["model-weights"]["emptyDir"]
    assert all(c["image"].endswith("-cpu") for c in pod["containers"])


def test_download_init_should_not_render_when_weights_are_already_on_the_volume():
    pod = one(render(), "RayService")["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]
    assert "initContainers" not in pod


def test_hub_download_reads_the_token_from_an_existing_secret():
    pod = one(render(**{"model.download.enabled": "true", "model.download.tokenSecret": "hf"}),
              "RayService")["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]
    init = pod["initContainers"][0]
    assert "hf download \"openai/gpt-oss-20b\"" in init["args"][0]
    assert init["env"][0]["valueFrom"]["secretKeyRef"] == {"name": "hf", "key": "HF_TOKEN"}


def test_hostpath_weights_volume():
    pod = one(render(**{"model.volume.type": "hostPath", "model.volume.hostPath": "/data/w"}),
              "RayService")["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]
    assert {v["name"]: v for v in pod["volumes"]}["model-weights"]["hostPath"] == {
        "path": "/data/w", "type": "DirectoryOrCreate"}


def test_frontdoor_service_is_grpc_on_50051_and_metrics_service_selects_the_same_pods():
    objects = render()
    grpc_svc = one(objects, "Service", "-frontdoor")
    assert grpc_svc["spec"]["ports"] == [
        {"name": "grpc", "port": 50051, "targetPort": "grpc", "protocol": "TCP", "appProtocol": "grpc"},
        {"name": "http", "port": 8088, "targetPort": "http", "protocol": "TCP", "appProtocol": "http"}]
    metrics_svc = one(objects, "Service", "-metrics")
    assert metrics_svc["spec"]["ports"][0]["port"] == 9464
    deployment = one(objects, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    for svc in (grpc_svc, metrics_svc):
        assert svc["spec"]["selector"].items() <= pod_labels.items()
    assert deployment["spec"]["replicas"] == 2


def test_frontdoor_joins_the_rayservice_head_and_runs_the_frontdoor_command():
    objects = render()
    args = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"][0]
    assert f"--address={one(objects, 'RayService')['metadata']['name']}-head-svc:6379" in args
    assert "--num-cpus=0 --num-gpus=0" in args and "exec gptoss-cluster frontdoor --config" in args


def test_frontdoor_replicas_left_to_the_autoscaler_when_it_is_on():
    objects = render(**{"frontdoor.autoscaling.enabled": "true"})
    assert "replicas" not in one(objects, "Deployment")["spec"]
    hpa = one(objects, "HorizontalPodAutoscaler")
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 8)


def test_tls_and_api_keys_mount_existing_secrets_where_the_config_points():
    objects = render("defaults", ("tls",))
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["tls"]["secret"]["secretName"] == "gptoss-tls"
    assert volumes["api-keys"]["secret"]["secretName"] == "gptoss-api-keys"
    mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    config = yaml.safe_load(one(objects, "ConfigMap", "-frontdoor")["data"]["config.yaml"])
    tls = config["frontdoor"]["tls"]
    assert tls == {"cert_file": f"{mounts['tls']}/tls.crt", "key_file": f"{mounts['tls']}/tls.key",
                   "client_ca_file": f"{mounts['tls']}/ca.crt"}
    assert config["frontdoor"]["auth"]["api_keys_file"] == mounts["api-keys"]
    # A grpc probe cannot speak TLS; the readiness probe falls back to TCP.
    assert "tcpSocket" in pod["containers"][0]["readinessProbe"]


def test_tls_should_not_render_secret_mounts_when_off():
    pod = one(render(), "Deployment")["spec"]["template"]["spec"]
    assert {v["name"] for v in pod["volumes"]} == {"config", "shm", "api-keys"}
    assert pod["containers"][0]["readinessProbe"]["grpc"] == {"port": 50051}
    config = yaml.safe_load(one(render(), "ConfigMap", "-frontdoor")["data"]["config.yaml"])
    assert "tls" not in config["frontdoor"]


def test_ingress_speaks_grpc_to_the_backend():
    ingress = one(render(**{"frontdoor.ingress.enabled": "true"}), "Ingress", "-frontdoor")
    assert ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/backend-protocol"] == "GRPC"
    ingress = one(render("defaults", ("tls",), **{"frontdoor.ingress.enabled": "true"}), "Ingress", "-frontdoor")
    assert ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/backend-protocol"] == "GRPCS"


def test_http_api_port_service_and_ingress_path_with_sse_unbuffered():
    objects = render(**{"frontdoor.ingress.enabled": "true", "frontdoor.networkPolicy.enabled": "true"})
    container = one(objects, "Deployment", "-frontdoor")["spec"]["template"]["spec"]["containers"][0]
    assert {"name": "http", "containerPort": 8088, "protocol": "TCP"} in container["ports"]
    config = yaml.safe_load(one(objects, "ConfigMap", "-frontdoor")["data"]["config.yaml"])
    assert config["frontdoor"]["http_port"] == 8088 and config["frontdoor"]["responses"]["kind"] == "memory"
    ingress = one(objects, "Ingress", "-frontdoor-http")
    annotations = ingress["metadata"]["annotations"]
    assert annotations["nginx.ingress.kubernetes.io/backend-protocol"] == "HTTP"
    assert annotations["nginx.ingress.kubernetes.io/proxy-buffering"] == "off"
    path = ingress["spec"]["rules"][0]["http"]["paths"][0]
    assert path["path"] == "/v1" and path["backend"]["service"]["port"]["name"] == "http"
    policy_ports = [p["port"] for rule in one(objects, "NetworkPolicy", "-frontdoor")["spec"]["ingress"] for p in rule.get("ports", [])]
    assert 8088 in policy_ports
    off = render(**{"frontdoor.http.enabled": "false", "frontdoor.ingress.enabled": "true"})
    config = yaml.safe_load(one(off, "ConfigMap", "-frontdoor")["data"]["config.yaml"])
    assert config["frontdoor"]["http_port"] == -1
    assert [o["metadata"]["name"][-len("-frontdoor"):] for o in off if o["kind"] == "Ingress"] == ["-frontdoor"]


def test_response_store_bundled_redis_or_an_external_url_from_a_secret():
    objects = render(**{"frontdoor.responses.redis.bundled.enabled": "true"})
    redis = one(objects, "Deployment", "-redis")
    args = redis["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--maxmemory" in args and "volatile-lru" in args
    service = one(objects, "Service", "-redis")
    config = yaml.safe_load(one(objects, "ConfigMap", "-frontdoor")["data"]["config.yaml"])
    assert config["frontdoor"]["responses"]["kind"] == "redis"
    assert config["frontdoor"]["responses"]["redis_url"] == f"redis://{service['metadata']['name']}:6379/0"
    objects = render(**{"frontdoor.responses.store": "redis", "frontdoor.responses.redis.existingSecret": "redis-auth"})
    assert not [o for o in objects if o["metadata"]["name"].endswith("-redis")]
    config = yaml.safe_load(one(objects, "ConfigMap", "-frontdoor")["data"]["config.yaml"])
    assert "redis_url" not in config["frontdoor"]["responses"]  # the URL holds a password: env from the Secret
    env = one(objects, "Deployment", "-frontdoor")["spec"]["template"]["spec"]["containers"][0]["env"]
    assert {"name": "GPTOSS_FRONTDOOR_RESPONSES_REDIS_URL",
            "valueFrom": {"secretKeyRef": {"name": "redis-auth", "key": "redis-url"}}} in env
    assert "RAY_AUTH_TOKEN" in {e["name"] for e in env}  # one env list: the Ray token is not lost beside it


def test_names_are_truncated_to_63_characters():
    objects = render(fullnameOverride="x" * 80)
    assert all(len(o["metadata"]["name"]) <= 63 + len("-frontdoor") for o in objects)
    assert one(objects, "RayService")["metadata"]["name"] == "x" * 63


# --- values.schema.json refusals: each message names the value -------------------------------

@pytest.mark.parametrize("sets,names", [
    ({"parallel.epSize": "3"}, ["/parallel/epSize", "1, 2, 4, 8, 16, 32, 64, 128"]),
    ({"parallel.epSize": "256"}, ["/parallel/epSize"]),
    ({"parallel.placementStrategy": "PACKED"}, ["/parallel/placementStrategy"]),
    ({"engine.vllm.distributedExecutorBackend": "slurm"}, ["/engine/vllm/distributedExecutorBackend"]),
    ({"engine.vllm.gpuMemoryUtilization": "1.5"}, ["/engine/vllm/gpuMemoryUtilization"]),
    ({"serving.autoscaling.targetKvUse": "2"}, ["/serving/autoscaling/targetKvUse"]),
    ({"serving.replicas": "-1"}, ["/serving/replicas", "-1"]),
    ({"frontdoor.replicas": "-2"}, ["/frontdoor/replicas", "-2"]),
    ({"ray.workerGroups[0].replicas": "-1", "ray.workerGroups[0].name": "gpu", "ray.workerGroups[0].minReplicas": "0",
      "ray.workerGroups[0].maxReplicas": "1", "ray.workerGroups[0].gpus": "1",
      "ray.workerGroups[0].resources.requests.cpu": "1"}, ["/ray/workerGroups/0/replicas", "-1"]),
    ({"engine.kind": "tensorrt"}, ["/engine/kind", "'torch', 'vllm', 'echo'"]),
    ({"model.path": "null"}, ["/model", "'path'"]),
    ({"model.path": ""}, ["/model/path"]),
    ({"model.path": "relative/dir"}, ["/model/path", "relative/dir"]),
    ({"model.volume.type": "pvc", "model.volume.claimName": ""}, ["/model/volume/claimName"]),
    ({"serving.router.policy": "random"}, ["/serving/router/policy", "prefix_affinity"]),
    ({"frontdoor.autoscaling.kind": "vpa"}, ["/frontdoor/autoscaling/kind"]),
    ({"ray.workerGroups[0].resources.limits.nvidia\\.com/gpu": "2", "ray.workerGroups[0].name": "gpu",
      "ray.workerGroups[0].replicas": "1", "ray.workerGroups[0].minReplicas": "1",
      "ray.workerGroups[0].maxReplicas": "1", "ray.workerGroups[0].gpus": "1"},
     ["/ray/workerGroups/0/resources/limits"]),
    ({"engine.kidn": "torch"}, ["kidn"]),
], ids=lambda v: ",".join(v) if isinstance(v, list) else None)
def test_schema_refuses_bad_values_naming_them(sets, names):
    err = render_error(**sets)
    assert "values don't meet the specifications of the schema" in err
    for name in names:
        assert name in err, err


@pytest.mark.parametrize("key,hint", [
    ("replicaCount", "serving.replicas"), ("modelPath", "model.path"), ("epSize", "parallel.epSize"),
    ("frontdoor.tlsSecret", "frontdoor.tls.existingSecret"), ("engine.epSize", "parallel.epSize"),
    ("engine.maxActiveRequests", "engine.maxNumSeqs"), ("router.policy", "serving.router"),
    ("serving.autoscaling.targetOngoingRequests", "serving.autoscaling.targetOngoingPerReplica"),
])
def test_removed_values_fail_with_a_migration_hint(key, hint):
    err = render_error(**{key: "1"})
    removed = key.split(".")[0] if key.startswith("router.") else key
    assert f'value "{removed}" was removed: use {hint}' in err, err


@pytest.mark.parametrize("preset,sets,message", [
    ("gpt-oss-120b", {"engine.vllm.tensorParallelSize": "2"},
     "serving.numGpus (1) must equal engine.vllm.tensorParallelSize x dataParallelSize (2)"),
    ("gpt-oss-120b", {"engine.vllm.tensorParallelSize": "2", "serving.numGpus": "2"},
     "a vllm replica needs 2 GPUs on one node"),
    ("gpt-oss-120b-ep4", {"parallel.epSize": "8"}, "parallel.epSize 8 x serving.numGpus 1 needs 8 GPUs in one pod"),
])
def test_gpu_layouts_that_cannot_be_placed_fail_the_render(preset, sets, message):
    err = render_error(preset, **sets)
    assert message in err, err


def test_every_value_is_documented_with_a_helm_docs_comment():
    """Each key of values.yaml has a `# --` comment right above it, or sits under one that has
    (the keys of a documented map or list, such as resources or workerGroups)."""
    import re

    lines = (CHART / "values.yaml").read_text().splitlines()
    stack: list[tuple[int, bool]] = []  # (indent, documented) of the enclosing keys
    undocumented = []
    for i, line in enumerate(lines):
        m = re.match(r"^(\s*)(- )?([A-Za-z][\w.]*):", line)
        if not m:
            continue
        indent = len(m.group(1)) + (2 if m.group(2) else 0)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        j, documented = i - 1, False
        while j >= 0 and lines[j].lstrip().startswith("#"):
            documented |= lines[j].lstrip().startswith("# --")
            j -= 1
        covered = documented or any(d for _, d in stack)
        nxt = next((l for l in lines[i + 1:] if l.strip() and not l.lstrip().startswith("#")), "")
        is_map = line.rstrip().endswith(":") and len(nxt) - len(nxt.lstrip()) > indent
        if not covered and not is_map:
            undocumented.append(m.group(3))
        stack.append((indent, covered))
    assert not undocumented, f"values without a `# --` comment: {undocumented}"
