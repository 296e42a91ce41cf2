"""Tenant settings (defaults, per-tenant overrides, roles), the limits they set, and API keys
rotated on disk without a restart. No Ray: these are the API-agnostic parts an HTTP front door
shares with the gRPC one."""

from __future__ import annotations

import os

import pytest

from cluster.config import ConfigError, load_config
from cluster.frontdoor.auth import ReloadingApiKeys
from cluster.frontdoor.errors import AuthenticationError, FieldError, RateLimitedError, status_for
from cluster.frontdoor.limits import TenantLimits
from cluster.frontdoor.tenants import Tenants
from tests.waiting import wait_until

TENANTS_YAML = """
tenants:
  acme: {tokens_per_min: 600, token_burst: 100, max_concurrent_streams: 2, max_output_tokens: 64}
  ops: {role: admin}
"""


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _tenants(tmp_path, **limits) -> Tenants:
    path = tmp_path / "tenants.yaml"
    path.write_text(TENANTS_YAML)
    config = load_config(env={}, overrides={"frontdoor.limits.tenants_file": str(path),
                                            **{f"frontdoor.limits.{k}": v for k, v in limits.items()}})
    return Tenants.from_config(config.frontdoor.limits, ["root"])


def test_overrides_fall_back_to_the_defaults(tmp_path):
    tenants = _tenants(tmp_path, requests_per_s=5, max_context_tokens=4096, tokens_per_min=6000)
    acme, other = tenants.policy("acme"), tenants.policy("anyone-else")
    assert (acme.tokens_per_min, acme.max_concurrent_streams, acme.max_output_tokens) == (600, 2, 64)
    assert (acme.requests_per_s, acme.max_context_tokens) == (5, 4096)  # not overridden: the defaults
    assert (other.tokens_per_min, other.max_concurrent_streams, other.role) == (6000, 0, "tenant")
    assert tenants.admins == {"ops", "root"} and tenants.names == {"acme", "ops", "root"}


@pytest.mark.parametrize("text,message", [
    ("tenants: {acme: {tokens_per_minute: 5}}", "tenants.acme.tokens_per_minute is not a tenant setting"),
    ("tenants: {acme: {max_concurrent_streams: -1}}", "tenants.acme.max_concurrent_streams must be a number >= 0"),
    ("tenants: {acme: {max_output_tokens: 2.5}}", "tenants.acme.max_output_tokens must be a number >= 0 (whole)"),
    ("tenants: {acme: {role: root}}", "tenants.acme.role must be one of tenant, admin"),
    ("tenants: [acme]", "`tenants` must map tenant names"),
])
def test_a_bad_tenants_file_names_the_setting(tmp_path, text, message):
    path = tmp_path / "tenants.yaml"
    path.write_text(text)
    config = load_config(env={}, overrides={"frontdoor.limits.tenants_file": str(path)})
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Tenants.from_config(config.frontdoor.limits)


def test_tokens_per_s_and_per_min_are_one_budget():
    with pytest.raises(ConfigError, match="frontdoor.limits.tokens_per_min"):
        load_config(env={}, overrides={"frontdoor.limits.tokens_per_s": 10, "frontdoor.limits.tokens_per_min": 600})


def test_token_budget_refusal_names_the_limit_and_when_to_retry(tmp_path):
    clock = Clock()
    limits = TenantLimits(_tenants(tmp_path), clock)
    limits.admit("acme")
    limits.charge_tokens("acme", 130)  # burst 100: 30 tokens of debt at 10 tokens/s
    with pytest.raises(RateLimitedError) as info:
        limits.admit("acme")
    status = status_for(info.value)
    assert status.code.name == "RESOURCE_EXHAUSTED" and status.quota_subject == "tenant:acme/tokens"
    assert "600 tokens per minute" in status.message
    assert status.retry_after_s == pytest.approx(3.1)
    limits.admit("globex")  # another tenant's budget is its own (unlimited by default)
    clock.now += 3.2
    limits.admit("acme")


def test_concurrent_streams_per_tenant(tmp_path):
    limits = TenantLimits(_tenants(tmp_path))
    limits.open_stream("acme")
    limits.open_stream("acme")
    with pytest.raises(RateLimitedError) as info:
        limits.open_stream("acme")
    assert status_for(info.value).quota_subject == "tenant:acme/concurrent_streams"
    for _ in range(5):
        limits.open_stream("globex")
    limits.close_stream("acme")
    limits.open_stream("acme")


def test_per_request_limits(tmp_path):
    limits = TenantLimits(_tenants(tmp_path, max_context_tokens=100))
    assert limits.fit_request("acme", 10, None, prompt_field="messages") == 64  # unset: capped
    assert limits.fit_request("acme", 10, 20, prompt_field="messages") == 20
    assert limits.fit_request("globex", 10, 5000, prompt_field="messages") == 5000
    with pytest.raises(FieldError) as info:
        limits.fit_request("acme", 10, 65, prompt_field="messages")
    assert info.value.field == "sampling.max_tokens" and "at most 64" in str(info.value)
    with pytest.raises(FieldError) as info:
        limits.fit_request("globex", 101, 5, prompt_field="prompt_token_ids")
    assert info.value.field == "prompt_token_ids" and "at most 100" in str(info.value)


def _bearer(key: str) -> dict:
    return {"authorization": f"Bearer {key}"}


def _accepts(keys: ReloadingApiKeys, key: str) -> bool:
    try:
        return keys.authenticate(_bearer(key)).name == "acme"
    except AuthenticationError:
        return False


@pytest.mark.parametrize("layout", ["file", "secret_dir"])
def test_keys_rotate_without_a_restart(tmp_path, layout):
    """A key file edited in place, or a Secret volume whose ..data link Kubernetes swaps."""
    old, new = "acme-old-key-0123456789", "acme-new-key-0123456789"
    if layout == "file":
        keys_path = tmp_path / "keys"
        keys_path.write_text(f"acme:{old}\n")
    else:
        keys_path = tmp_path / "secret"
        keys_path.mkdir()
        (tmp_path / "v1").mkdir()
        (tmp_path / "v1" / "acme").write_text(old)
        os.symlink(tmp_path / "v1", keys_path / "..data")
        os.symlink("..data/acme", keys_path / "acme")
    config = load_config(env={}, overrides={"frontdoor.auth.api_keys_file": str(keys_path),
                                            "frontdoor.auth.reload_interval_s": 0.05}).frontdoor.auth
    keys = ReloadingApiKeys(config, env={})
    assert keys.authenticate(_bearer(old)).name == "acme"
    if layout == "file":
        keys_path.write_text(f"acme:{new}\nglobex:globex-key-0123456789\n")
    else:
        (tmp_path / "v2").mkdir()
        (tmp_path / "v2" / "acme").write_text(new)
        os.symlink(tmp_path / "v2", keys_path / "..tmp")
        os.replace(keys_path / "..tmp", keys_path / "..data")
    wait_until(lambda: _accepts(keys, new), timeout=10)  # the next check after reload_interval_s reads it
    with pytest.raises(AuthenticationError):
        keys.authenticate(_bearer(old))
    assert keys.reloads == 1
    # A broken edit keeps the keys in force.
    if layout == "file":
        keys_path.write_text("acme:short\n")
        assert not keys.refresh(force=True)  # read now, refused: the keys in force stay
        assert keys.authenticate(_bearer(new)).name == "acme"
