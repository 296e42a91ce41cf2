"""Secure defaults of the chart: API keys required (a generated Secret), per-tenant settings
as a tenants file the front door loads, unauthenticated serving only when asked for and loud."""

from __future__ import annotations

import base64

import pytest
import yaml

from cluster.config import load_config
from cluster.frontdoor.tenants import Tenants
from tests.helm.helm_chart import CHART, PRESETS, helm, one, render, serve_config_text, values_args


def _frontdoor_config(objects) -> dict:
    return yaml.safe_load(one(objects, "ConfigMap", "-frontdoor")["data"]["config.yaml"])["frontdoor"]


def _volumes(objects) -> dict:
    return {v["name"]: v for v in one(objects, "Deployment")["spec"]["template"]["spec"]["volumes"]}


@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_preset_requires_api_keys_from_a_generated_secret(preset):
    objects = render(preset)
    auth = _frontdoor_config(objects)["auth"]
    assert auth["allow_unauthenticated"] is False
    assert auth["api_keys_file"] == "/etc/gptoss/api-keys"
    assert "admin" in auth["admin_tenants"].split(",")
    secret = one(objects, "Secret", "-api-keys")
    assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    keys = {tenant: base64.b64decode(v).decode() for tenant, v in secret["data"].items()}
    assert set(keys) == {"default", "admin"} and all(len(k) == 40 for k in keys.values())
    assert keys["default"] != keys["admin"]
    assert _volumes(objects)["api-keys"]["secret"]["secretName"] == secret["metadata"]["name"]


def test_usage_records_go_to_stdout_by_default():
    assert _frontdoor_config(render())["usage_log"] == "stdout"


def test_an_existing_secret_replaces_the_generated_one():
    objects = render(**{"frontdoor.auth.existingSecret": "our-keys", "frontdoor.auth.adminTenants": "ops"})
    assert not [o for o in objects if o["metadata"]["name"].endswith("-api-keys")]
    assert _volumes(objects)["api-keys"]["secret"]["secretName"] == "our-keys"
    assert _frontdoor_config(objects)["auth"]["admin_tenants"] == "ops"  # no generated `admin` tenant


def _notes(**sets) -> str:
    args = ["install", "gptoss", str(CHART), "--namespace", "llm", "--dry-run=client", *values_args("defaults", sets)]
    out = helm(*args).stdout
    return out[out.index("NOTES:"):]


def test_unauthenticated_only_when_set_and_loud():
    notes = _notes()
    assert "WARNING" not in notes and "get secret gptoss-gptoss-cluster-api-keys" in notes
    assert "base64 -d" in notes and 'authorization: Bearer $KEY' in notes
    objects = render(**{"frontdoor.auth.allowUnauthenticated": "true"})
    assert not [o for o in objects if o["metadata"]["name"].endswith("-api-keys")]
    assert "api-keys" not in _volumes(objects)
    auth = _frontdoor_config(objects)["auth"]
    assert auth["allow_unauthenticated"] is True and "api_keys_file" not in auth
    assert "WARNING: auth is OFF" in _notes(**{"frontdoor.auth.allowUnauthenticated": "true"})


def test_tenant_overrides_render_to_a_tenants_file_the_front_door_loads(tmp_path):
    objects = render(**{"frontdoor.limits.tokensPerMin": "6000", "frontdoor.limits.maxConcurrentStreams": "16",
                        "frontdoor.tenants.acme.tokensPerMin": "600", "frontdoor.tenants.acme.maxOutputTokens": "64",
                        "frontdoor.tenants.ops.role": "admin"})
    configmap = one(objects, "ConfigMap", "-frontdoor")["data"]
    (tmp_path / "tenants.yaml").write_text(configmap["tenants.yaml"])
    (tmp_path / "config.yaml").write_text(configmap["config.yaml"])
    config = load_config(tmp_path / "config.yaml", env={},
                         overrides={"frontdoor.limits.tenants_file": str(tmp_path / "tenants.yaml")})
    assert _frontdoor_config(objects)["limits"]["tenants_file"] == "/etc/gptoss/config/tenants.yaml"
    tenants = Tenants.from_config(config.frontdoor.limits, ["admin"])
    acme = tenants.policy("acme")
    assert (acme.tokens_per_min, acme.max_output_tokens, acme.max_concurrent_streams) == (600, 64, 16)
    assert tenants.policy("someone").tokens_per_min == 6000
    assert tenants.admins == {"ops", "admin"}


def test_schema_refuses_an_unknown_tenant_setting():
    result = helm("template", "gptoss", str(CHART), "--set", "frontdoor.tenants.acme.tokensPerMinute=5", check=False)
    assert result.returncode != 0 and "tokensPerMinute" in result.stderr


# --- the Ray control plane ---------------------------------------------------------------------

RELEASE_PEER = {"podSelector": {"matchExpressions": [
    {"key": "app.kubernetes.io/instance", "operator": "In", "values": ["gptoss"]},
    {"key": "app.kubernetes.io/name", "operator": "In", "values": ["gptoss-cluster"]},
    {"key": "app.kubernetes.io/component", "operator": "In", "values": ["ray-head", "ray-worker", "frontdoor"]}]}}


def _ray_containers(objects) -> list[dict]:
    cluster = one(objects, "RayService")["spec"]["rayClusterConfig"]
    pods = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    return [c for pod in pods for c in pod["spec"]["containers"]]


@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_preset_turns_ray_token_auth_on_everywhere(preset):
    objects = render(preset)
    cluster = one(objects, "RayService")["spec"]["rayClusterConfig"]
    secret = one(objects, "Secret", "-ray-auth")
    assert cluster["authOptions"] == {"mode": "token", "secretName": secret["metadata"]["name"]}
    assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert len(base64.b64decode(secret["data"]["auth_token"])) == 48
    frontdoor = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    for container in _ray_containers(objects) + [frontdoor]:  # head, workers, and the front door's `ray start`
        env = {e["name"]: e for e in container["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": secret["metadata"]["name"],
                                                                      "key": "auth_token"}


def test_an_existing_ray_token_secret_is_used_as_is():
    objects = render(**{"ray.auth.existingSecret": "our-ray-token"})
    assert not [o for o in objects if o["metadata"]["name"].endswith("-ray-auth")]
    assert one(objects, "RayService")["spec"]["rayClusterConfig"]["authOptions"]["secretName"] == "our-ray-token"


@pytest.mark.parametrize("preset", list(PRESETS))
def test_network_policies_admit_only_the_release_and_the_operator(preset):
    objects = render(preset)
    head, worker = one(objects, "NetworkPolicy", "-head"), one(objects, "NetworkPolicy", "-workers")
    for policy, component in ((head, "ray-head"), (worker, "ray-worker")):
        spec = policy["spec"]
        assert spec["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "gptoss-cluster",
                                                      "app.kubernetes.io/instance": "gptoss",
                                                      "app.kubernetes.io/component": component}
        assert spec["policyTypes"] == ["Ingress"]
        rules = spec["ingress"]
        # Every port (Ray picks most at random): only from this release's Ray pods and front doors.
        assert rules[0] == {"from": [RELEASE_PEER]}
        # Ray's metrics for Prometheus (metricsFrom empty: any peer, metrics only).
        assert rules[1] == {"ports": [{"port": 8080, "protocol": "TCP"}]}
        ported = {p["port"] for rule in rules for p in rule.get("ports", [])}
        assert not ported & {6379, 10001, 8000, 52365}  # GCS, client, Serve, agent: release only
    assert head["spec"]["ingress"][2] == {"ports": [{"port": 8265, "protocol": "TCP"}], "from": [{
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kuberay-system"}},
        "podSelector": {"matchLabels": {"app.kubernetes.io/name": "kuberay-operator"}}}]}
    assert len(head["spec"]["ingress"]) == 3 and len(worker["spec"]["ingress"]) == 2
    # The pods they select are ours: the RayService's head and worker templates carry those labels.
    cluster = one(objects, "RayService")["spec"]["rayClusterConfig"]
    assert head["spec"]["podSelector"]["matchLabels"].items() <= \
        cluster["headGroupSpec"]["template"]["metadata"]["labels"].items()
    for group in cluster["workerGroupSpecs"]:
        assert worker["spec"]["podSelector"]["matchLabels"].items() <= group["template"]["metadata"]["labels"].items()


def test_ray_client_port_only_when_asked_for():
    head = one(render(), "RayService")["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
    assert 10001 not in {p["containerPort"] for p in head["containers"][0]["ports"]}
    peer = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "data-science"}}}
    objects = render(**{"ray.head.clientPort.enabled": "true",
                        "ray.head.clientPort.from[0].namespaceSelector.matchLabels.kubernetes\\.io/metadata\\.name":
                        "data-science"})
    head = one(objects, "RayService")["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
    assert 10001 in {p["containerPort"] for p in head["containers"][0]["ports"]}
    assert {"ports": [{"port": 10001, "protocol": "TCP"}], "from": [peer]} in \
        one(objects, "NetworkPolicy", "-head")["spec"]["ingress"]


@pytest.mark.parametrize("preset", list(PRESETS))
def test_no_ingress_ever_routes_to_the_dashboard(preset):
    objects = render(preset, ("tls",), **{"frontdoor.ingress.enabled": "true"})
    ingresses = [o for o in objects if o["kind"] == "Ingress"]
    assert ingresses
    frontdoor_service = one(objects, "Service", "-frontdoor")["metadata"]["name"]
    for ingress in ingresses:
        for rule in ingress["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                backend = path["backend"]["service"]
                assert backend["name"] == frontdoor_service and backend["port"] in ({"name": "grpc"}, {"name": "http"})
        assert "8265" not in yaml.safe_dump(ingress) and "head-svc" not in yaml.safe_dump(ingress)


def _serving(objects) -> dict:
    return yaml.safe_load(serve_config_text(objects))["applications"][0]["args"]["serving"]


@pytest.mark.parametrize("preset", list(PRESETS))
def test_direct_streams_use_tls_in_every_preset(preset):
    serving = _serving(render(preset))
    assert serving["direct_stream_tls"] is True and "direct_stream_cert_file" not in serving


def test_direct_stream_certificate_from_a_secret():
    objects = render(**{"serving.directStreamTls.existingSecret": "replica-tls",
                        "serving.directStreamTls.serverName": "replicas.llm.svc"})
    serving = _serving(objects)
    assert serving["direct_stream_cert_file"] == "/etc/gptoss/direct-stream-tls/tls.crt"
    assert serving["direct_stream_ca_file"] == "/etc/gptoss/direct-stream-tls/ca.crt"
    assert serving["direct_stream_server_name"] == "replicas.llm.svc"
    worker = one(objects, "RayService")["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]
    assert {"name": "direct-stream-tls", "secret": {"secretName": "replica-tls"}} in worker["volumes"]
    assert {"name": "direct-stream-tls", "mountPath": "/etc/gptoss/direct-stream-tls", "readOnly": True} \
        in worker["containers"][0]["volumeMounts"]
