"""An echo-engine Serve app (on the session's Ray) behind a front door with API keys from a key
file, per-tenant settings from a tenants file and a usage log: what a secured deployment runs,
without a model (the echo engine is a test engine, see cluster/engine/echo_engine.py)."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
from prometheus_client import CollectorRegistry

KEYS = {"acme": "acme-key-0123456789abcdef", "globex": "globex-key-0123456789abcd",
        "initech": "initech-key-0123456789abc", "ops": "ops-key-0123456789abcdefg"}


def bearer(tenant: str) -> tuple:
    return (("authorization", f"Bearer {KEYS[tenant]}"),)


class SecureApp:
    def __init__(self, serving_config, tmp: Path, name: str, tenants_yaml: str, **overrides) -> None:
        from ray import serve

        from cluster.config import from_dict, to_dict
        from cluster.metrics import FrontdoorMetrics
        from cluster.serving.builder import build_app
        from gptoss.v1 import admin_pb2_grpc, inference_pb2_grpc
        from tests.conftest import BackgroundFrontdoor

        (tmp / "keys").write_text("".join(f"{t}:{k}\n" for t, k in KEYS.items()))
        (tmp / "tenants.yaml").write_text(tenants_yaml)
        self.usage_path = tmp / "usage.jsonl"
        data = to_dict(serving_config)
        settings = {"engine.kind": "echo", "serving.app_name": name,
                    "frontdoor.auth.api_keys_file": str(tmp / "keys"), "frontdoor.auth.admin_tenants": "ops",
                    "frontdoor.limits.tenants_file": str(tmp / "tenants.yaml"),
                    "frontdoor.usage_log": str(self.usage_path), **overrides}
        for path, value in settings.items():
            *parents, leaf = path.split(".")
            section = data
            for part in parents:
                section = section[part]
            section[leaf] = value
        self.config = from_dict(data)
        self.name = name
        self.handle = serve.run(build_app(self.config), name=name, route_prefix=None)
        self.registry = CollectorRegistry()
        self.door = BackgroundFrontdoor(self.handle, self.config.frontdoor, FrontdoorMetrics(self.registry))
        self.channel = grpc.insecure_channel(self.door.target)
        self.stub = inference_pb2_grpc.InferenceStub(self.channel)
        self.admin = admin_pb2_grpc.AdminStub(self.channel)

    def tokens_counter(self, tenant: str, kind: str) -> float:
        return self.registry.get_sample_value("gptoss_tenant_tokens_total", {"tenant": tenant, "type": kind}) or 0.0

    def usage_records(self) -> list[dict]:
        return [json.loads(line) for line in self.usage_path.read_text().splitlines()] \
            if self.usage_path.exists() else []

    def close(self) -> None:
        from ray import serve

        self.channel.close()
        self.door.close()
        serve.delete(self.name)
