"""Render the Helm chart with the real helm binary and validate what it renders.

Core kinds validate against the Kubernetes OpenAPI schemas of PyPI `kubernetes-validate`
(strict: unknown fields are errors); CRD-backed kinds against the openAPIV3Schema of the upstream
CRDs in ../shared/k8s/crds (see SOURCES.md there).
"""

from __future__ import annotations

import functools
import itertools
import subprocess
from typing import Any

import yaml

from tests.tooling import REPO_ROOT, require_helm

CHART = REPO_ROOT / "helm" / "gptoss-cluster"
CRD_DIR = REPO_ROOT.parent / "shared" / "k8s" / "crds"
# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest schemas known.
KUBE_VERSIONS = ("1.27", "1.37")

# Preset name -> values files (overlays in order), relative to the chart.
PRESETS: dict[str, tuple[str, ...]] = {
    "defaults": (),
    "gpt-oss-120b": ("values-gpt-oss-120b.yaml",),
    "gpt-oss-120b-ep4": ("values-gpt-oss-120b.yaml", "values-gpt-oss-120b-ep4.yaml"),
    "gpt-oss-20b": ("values-gpt-oss-20b.yaml",),
    "tiny-cpu": ("values-tiny-cpu.yaml",),
}

# Toggles of the render matrix: name -> --set values turning it on.
TOGGLES: dict[str, dict[str, str]] = {
    "monitoring": {"metrics.serviceMonitor.enabled": "true", "metrics.podMonitor.enabled": "true",
                   "metrics.prometheusRule.enabled": "true", "metrics.grafanaDashboard.enabled": "true"},
    "autoscaling": {"serving.autoscaling.enabled": "true", "frontdoor.autoscaling.enabled": "true"},
    "tls": {"frontdoor.tls.existingSecret": "gptoss-tls", "frontdoor.tls.clientCa": "true",
            "frontdoor.auth.existingSecret": "gptoss-api-keys"},
}


def matrix() -> list[tuple[str, tuple[str, ...]]]:
    """(preset, toggles on) for every preset and every on/off combination of TOGGLES."""
    combos = [tuple(t for t, on in zip(TOGGLES, bits) if on)
              for bits in itertools.product((False, True), repeat=len(TOGGLES))]
    return [(preset, combo) for preset in PRESETS for combo in combos]


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([require_helm(), *args], capture_output=True, text=True, check=check, timeout=60)


def values_args(preset: str = "defaults", sets: dict[str, str] | None = None) -> list[str]:
    args: list[str] = []
    for f in PRESETS[preset]:
        args += ["-f", str(CHART / f)]
    for key, value in (sets or {}).items():
        args += ["--set", f"{key}={value}"]
    return args


@functools.lru_cache(maxsize=None)
def _render(preset: str, sets: tuple[tuple[str, str], ...]) -> tuple[dict, ...]:
    out = helm("template", "gptoss", str(CHART), "--namespace", "llm", *values_args(preset, dict(sets))).stdout
    return tuple(doc for doc in yaml.safe_load_all(out) if doc)


def render(preset: str = "defaults", toggles: tuple[str, ...] = (), **sets: str) -> list[dict]:
    """The objects `helm template` renders (fresh copies, safe to modify)."""
    merged: dict[str, str] = {}
    for t in toggles:
        merged.update(TOGGLES[t])
    merged.update(sets)
    import copy
    return copy.deepcopy(list(_render(preset, tuple(sorted(merged.items())))))


def render_error(preset: str = "defaults", **sets: str) -> str:
    """helm template's error output for values that must be refused (fails if they render)."""
    result = helm("template", "gptoss", str(CHART), *values_args(preset, sets), check=False)
    assert result.returncode != 0, f"helm rendered values it should refuse: {sets}"
    return result.stderr


def one(objects: list[dict], kind: str, suffix: str = "") -> dict:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"].endswith(suffix)]
    assert len(found) == 1, f"expected one {kind} *{suffix}, found {[o['metadata']['name'] for o in found]}"
    return found[0]


def kinds(objects: list[dict]) -> set[str]:
    return {o["kind"] for o in objects}


# --- validation ------------------------------------------------------------------------------

CRD_FILES = {
    ("ray.io", "RayService"): "ray.io_rayservices.yaml",
    ("monitoring.coreos.com", "ServiceMonitor"): "monitoring.coreos.com_servicemonitors.yaml",
    ("monitoring.coreos.com", "PodMonitor"): "monitoring.coreos.com_podmonitors.yaml",
    ("monitoring.coreos.com", "PrometheusRule"): "monitoring.coreos.com_prometheusrules.yaml",
    ("keda.sh", "ScaledObject"): "keda.sh_scaledobjects.yaml",
}


@functools.lru_cache(maxsize=None)
def crd_validator(group: str, version: str, kind: str):
    import jsonschema

    crd = yaml.safe_load((CRD_DIR / CRD_FILES[(group, kind)]).read_text())
    for v in crd["spec"]["versions"]:
        if v["name"] == version:
            schema = v["schema"]["openAPIV3Schema"]
            return jsonschema.Draft7Validator(_openapi_to_jsonschema(schema))
    raise AssertionError(f"{CRD_FILES[(group, kind)]} has no version {version}")


def _openapi_to_jsonschema(node: Any) -> Any:
    """The OpenAPI v3 extensions Kubernetes uses, as plain JSON schema: int-or-string fields
    (x-kubernetes-int-or-string) accept both; nullable fields accept null. An object with declared
    properties refuses others unless it preserves unknown fields: the API server would silently
    prune a misspelled field, so here it is an error."""
    if isinstance(node, dict):
        node = {k: _openapi_to_jsonschema(v) for k, v in node.items()}
        if ("properties" in node and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")):
            node["additionalProperties"] = False
        if node.get("x-kubernetes-int-or-string"):
            node.pop("type", None)
            node["anyOf"] = [{"type": "integer"}, {"type": "string"}]
        if node.get("nullable") and "type" in node:
            node["type"] = [node["type"], "null"]
        return node
    if isinstance(node, list):
        return [_openapi_to_jsonschema(v) for v in node]
    return node


def is_crd_kind(obj: dict) -> bool:
    group = obj["apiVersion"].split("/")[0] if "/" in obj["apiVersion"] else ""
    return (group, obj["kind"]) in CRD_FILES


def validate_object(obj: dict) -> None:
    """Raise AssertionError naming the object and the failing path when it does not validate."""
    name = f"{obj['kind']}/{obj['metadata']['name']}"
    if is_crd_kind(obj):
        if not CRD_DIR.is_dir():
            import pytest

            pytest.skip(f"{CRD_DIR} (upstream CRDs, see SOURCES.md there) is absent: cannot validate {name}")
        group, version = obj["apiVersion"].split("/")
        errors = sorted(crd_validator(group, version, obj["kind"]).iter_errors(obj), key=lambda e: list(e.path))
        assert not errors, f"{name}: " + "; ".join(f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors[:5])
        return
    import kubernetes_validate

    for kube in KUBE_VERSIONS:
        try:
            kubernetes_validate.validate(obj, kube, strict=True)
        except kubernetes_validate.ValidationError as err:
            raise AssertionError(f"{name} (Kubernetes {kube}): {err}") from None


def serve_config_text(objects: list[dict]) -> str:
    return one(objects, "RayService")["spec"]["serveConfigV2"]


def read_path(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = obj[int(part)] if isinstance(obj, list) else obj[part]
    return obj

