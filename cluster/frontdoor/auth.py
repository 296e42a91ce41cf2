"""API keys -> tenants: loading them (file, Kubernetes Secret directory, env var) and checking
the `authorization: Bearer <key>` metadata of a call.

`ReloadingApiKeys` re-reads the key file (or mounted Secret directory) when it changes, so keys
are rotated without a restart; a change that does not parse keeps the keys in force and logs why.

Keys are kept only as SHA-256 digests and compared with hmac.compare_digest against every
known key (no early exit), so the time a check takes says nothing about which keys exist.
A wrong key gets the same answer whatever it resembles. Keys never appear in messages or logs:
a problem in a key file names the line, not the key.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

from cluster.config import AuthConfig, ConfigError
from cluster.frontdoor.errors import AuthenticationError

log = logging.getLogger(__name__)

_TENANT = re.compile(r"[A-Za-z0-9._-]{1,64}")
MIN_KEY_LENGTH = 16
BEARER = "bearer "


@dataclass(frozen=True)
class Tenant:
    name: str
    admin: bool = False


class ApiKeys:
    """The key -> tenant table of one front door."""

    def __init__(self, keys: Sequence[tuple[str, str]], admin_tenants: Sequence[str] = ()) -> None:
        admins = set(admin_tenants)
        self._entries: list[tuple[bytes, Tenant]] = []
        seen: set[bytes] = set()
        for tenant, key in keys:
            digest = _digest(key)
            if digest in seen:
                raise ConfigError(f"config: frontdoor.auth: tenant {tenant!r} reuses another entry's API key")
            seen.add(digest)
            self._entries.append((digest, Tenant(tenant, tenant in admins)))

    @property
    def tenants(self) -> list[str]:
        return sorted({tenant.name for _, tenant in self._entries})

    def __len__(self) -> int:
        return len(self._entries)

    def authenticate(self, metadata: Mapping[str, str]) -> Tenant:
        """The tenant whose key the call presents; AuthenticationError otherwise."""
        header = metadata.get("authorization")
        if not header:
            raise AuthenticationError("API_KEY_MISSING", "missing API key: send metadata 'authorization: Bearer <key>'")
        if not header[:len(BEARER)].lower() == BEARER:
            raise AuthenticationError("API_KEY_INVALID", "invalid API key")
        digest = _digest(header[len(BEARER):].strip())
        found: Tenant | None = None
        for known, tenant in self._entries:
            if hmac.compare_digest(known, digest):
                found = tenant
        if found is None:
            raise AuthenticationError("API_KEY_INVALID", "invalid API key")
        return found


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


def parse_key_lines(text: str, source: str) -> list[tuple[str, str]]:
    """"<tenant>:<key>" entries separated by newlines or commas; '#' starts a comment line."""
    entries = []
    for number, line in enumerate(re.split(r"[\n,]", text), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        tenant, sep, key = line.partition(":")
        entries.append(_checked(tenant.strip(), key.strip() if sep else "", f"{source} entry {number}"))
    return entries


def _checked(tenant: str, key: str, where: str) -> tuple[str, str]:
    if not _TENANT.fullmatch(tenant):
        raise ConfigError(f"config: frontdoor.auth: {where}: tenant must be 1-64 of [A-Za-z0-9._-] "
                          "(format <tenant>:<key>)")
    if len(key) < MIN_KEY_LENGTH or any(c.isspace() for c in key):
        raise ConfigError(f"config: frontdoor.auth: {where}: the key of tenant {tenant!r} must be at least "
                          f"{MIN_KEY_LENGTH} characters without spaces")
    return tenant, key


def _from_directory(directory: Path) -> list[tuple[str, str]]:
    """A mounted Secret: each visible file is a tenant, its non-empty lines are that tenant's keys."""
    entries = []
    for path in sorted(directory.iterdir()):
        if path.name.startswith(".") or not path.is_file():  # Kubernetes' ..data links and the like
            continue
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if line.strip():
                entries.append(_checked(path.name, line.strip(), f"{path} line {number}"))
    return entries


def load_api_keys(config: AuthConfig, env: Mapping[str, str] | None = None, admins: Iterable[str] = ()) -> ApiKeys:
    """All keys from config.api_keys_file and the config.api_keys_env variable (either may be absent);
    the tenants of config.admin_tenants and of `admins` have the admin role."""
    env = os.environ if env is None else env
    entries: list[tuple[str, str]] = []
    if config.api_keys_file:
        path = Path(config.api_keys_file).expanduser()
        if path.is_dir():
            entries += _from_directory(path)
        elif path.is_file():
            entries += parse_key_lines(path.read_text(), str(path))
        else:
            raise ConfigError(f"config: frontdoor.auth.api_keys_file: {path} does not exist")
    if config.api_keys_env and env.get(config.api_keys_env):
        entries += parse_key_lines(env[config.api_keys_env], f"${config.api_keys_env}")
    return ApiKeys(entries, [*admin_tenants(config), *admins])


def admin_tenants(config: AuthConfig) -> list[str]:
    return [t.strip() for t in config.admin_tenants.split(",") if t.strip()]


def _file_state(path: Path) -> tuple:
    """What changes when the key file or a mounted Secret changes (Kubernetes swaps the ..data link)."""
    try:
        if path.is_dir():
            return tuple((entry.name, os.readlink(entry) if entry.is_symlink() else None, entry.stat().st_mtime_ns,
                          entry.stat().st_size) for entry in sorted(path.iterdir(), key=lambda e: e.name))
        stat = path.stat()
        return (stat.st_mtime_ns, stat.st_size, stat.st_ino)
    except OSError:
        return ()


class ReloadingApiKeys:
    """An ApiKeys that re-reads config.api_keys_file when it changed, checked at most every
    config.reload_interval_s (on the next authentication after that)."""

    def __init__(self, config: AuthConfig, env: Mapping[str, str] | None = None, admins: Iterable[str] = (),
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._config = config
        self._env = os.environ if env is None else env
        self._admins = tuple(admins)
        self._clock = clock
        self._lock = threading.Lock()
        self._path = Path(config.api_keys_file).expanduser() if config.api_keys_file else None
        self._state = _file_state(self._path) if self._path else ()
        self._keys = load_api_keys(config, self._env, self._admins)
        self._checked_at = clock()
        self.reloads = 0

    @property
    def tenants(self) -> list[str]:
        return self._keys.tenants

    def __len__(self) -> int:
        return len(self._keys)

    def authenticate(self, metadata: Mapping[str, str]) -> Tenant:
        self.refresh()
        return self._keys.authenticate(metadata)

    def refresh(self, *, force: bool = False) -> bool:
        """Re-read the keys if the file changed (and the interval passed); True when they were replaced."""
        interval = self._config.reload_interval_s
        if self._path is None or (not force and (interval <= 0 or self._clock() - self._checked_at < interval)):
            return False
        with self._lock:
            self._checked_at = self._clock()
            state = _file_state(self._path)
            if state == self._state:
                return False
            try:
                keys = load_api_keys(self._config, self._env, self._admins)
            except ConfigError as err:
                log.error("API keys not reloaded, the previous ones stay in force: %s", err)
                return False
            self._state, self._keys = state, keys
            self.reloads += 1
        log.warning("API keys reloaded from %s: %d keys of %d tenants", self._path, len(keys), len(keys.tenants))
        return True
