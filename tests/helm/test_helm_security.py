"""Secure defaults of the chart: API keys required (a generated Secret), per-tenant settings
as a tenants file the front door loads, unauthenticated serving only when asked for and loud."""

from __future__ import annotations

import base64

import pytest
import yaml

from cluster.config import load_config
from cluster.frontdoor.tenants import Tenants
from tests.helm.helm_chart import CHART, PRESETS, helm, one, render, values_args


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
    assert not [o for o in objects if o["kind"] == "Secret"]
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
    assert not [o for o in objects if o["kind"] == "Secret"] and "api-keys" not in _volumes(objects)
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
