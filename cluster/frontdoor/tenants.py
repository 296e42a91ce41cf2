"""Tenants: the settings each one runs under (role and limits), with defaults for every tenant
and per-tenant overrides from a YAML file. Independent of any API: the gRPC front door and an HTTP
one ask `Tenants.policy(name)` the same way.

The overrides file (frontdoor.limits.tenants_file):

    tenants:
      acme:   {tokens_per_min: 60000, max_concurrent_streams: 8}
      ops:    {role: admin}

Every key of a tenant's entry is optional and falls back to frontdoor.limits (the defaults).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from cluster.config import ConfigError, LimitsConfig

ROLES = ("tenant", "admin")


@dataclass(frozen=True)
class TenantPolicy:
    """What one tenant may do. 0 turns a limit off; a burst of 0 is one period of its rate."""

    role: str = "tenant"
    requests_per_s: float = 0.0
    request_burst: float = 0.0
    tokens_per_min: float = 0.0  # prompt + generated tokens, charged as they are used
    token_burst: float = 0.0
    max_concurrent_streams: int = 0
    max_context_tokens: int = 0  # prompt tokens of one request
    max_output_tokens: int = 0  # generated tokens of one request (also caps an unset max_tokens)

    @property
    def admin(self) -> bool:
        return self.role == "admin"


def default_policy(limits: LimitsConfig) -> TenantPolicy:
    token_burst = limits.token_burst
    if limits.tokens_per_s > 0 and token_burst == 0:
        token_burst = max(1.0, limits.tokens_per_s)  # tokens_per_s keeps its one-second burst
    return TenantPolicy(requests_per_s=limits.requests_per_s, request_burst=limits.request_burst,
                        tokens_per_min=limits.tokens_per_min or limits.tokens_per_s * 60.0, token_burst=token_burst,
                        max_concurrent_streams=limits.max_concurrent_streams,
                        max_context_tokens=limits.max_context_tokens, max_output_tokens=limits.max_output_tokens)


_FIELDS = {f.name: f.type for f in dataclasses.fields(TenantPolicy)}


def _override(base: TenantPolicy, name: str, entry: Any, source: str) -> TenantPolicy:
    where = f"config: {source}: tenants.{name}"
    if not isinstance(entry, Mapping):
        raise ConfigError(f"{where} must be a mapping of settings")
    changes: dict[str, Any] = {}
    for key, value in entry.items():
        if key not in _FIELDS:
            raise ConfigError(f"{where}.{key} is not a tenant setting (one of {', '.join(_FIELDS)})")
        if key == "role":
            if value not in ROLES:
                raise ConfigError(f"{where}.role must be one of {', '.join(ROLES)}, got {value!r}")
            changes[key] = value
            continue
        kind = int if _FIELDS[key] in (int, "int") else float
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 \
                or (kind is int and float(value) != int(value)):
            raise ConfigError(f"{where}.{key} must be a number >= 0{' (whole)' if kind is int else ''}, got {value!r}")
        changes[key] = kind(value)
    return dataclasses.replace(base, **changes)


class Tenants:
    """The policy of every tenant: the configured overrides, else the defaults."""

    def __init__(self, defaults: TenantPolicy, overrides: Mapping[str, TenantPolicy] | None = None,
                 admin_tenants: Iterable[str] = ()) -> None:
        self.defaults = defaults
        self._policies = dict(overrides or {})
        for name in admin_tenants:
            self._policies[name] = dataclasses.replace(self._policies.get(name, defaults), role="admin")

    @classmethod
    def from_config(cls, limits: LimitsConfig, admin_tenants: Iterable[str] = ()) -> "Tenants":
        defaults = default_policy(limits)
        overrides: dict[str, TenantPolicy] = {}
        if limits.tenants_file:
            path = Path(limits.tenants_file).expanduser()
            if not path.is_file():
                raise ConfigError(f"config: frontdoor.limits.tenants_file: {path} does not exist")
            data = yaml.safe_load(path.read_text()) or {}
            table = data.get("tenants", {}) if isinstance(data, Mapping) else None
            if not isinstance(table, Mapping):
                raise ConfigError(f"config: {path}: `tenants` must map tenant names to their settings")
            overrides = {str(name): _override(defaults, str(name), entry, str(path)) for name, entry in table.items()}
        return cls(defaults, overrides, admin_tenants)

    def policy(self, tenant: str) -> TenantPolicy:
        return self._policies.get(tenant, self.defaults)

    @property
    def names(self) -> set[str]:
        """Tenants named in the configuration (overrides and admins)."""
        return set(self._policies)

    @property
    def admins(self) -> set[str]:
        return {name for name, policy in self._policies.items() if policy.admin}
