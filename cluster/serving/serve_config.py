"""Serve config files (KubeRay's serveConfigV2, `serve deploy`) that run this project's application.

A Serve config lists applications, each with an `import_path` and `args`. Ours names
`cluster.serving.builder:app_builder` and carries a whole ClusterConfig in `args`, so a cluster
deployed by the Helm chart runs exactly the configuration the embedded path runs, validated by
the same code. `load_serve_config` reads such a file and returns the ClusterConfig of each of our
applications, failing with a message that names the application and the field.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any, Mapping

import yaml

from cluster.config import ClusterConfig, ConfigError, from_dict
from cluster.serving.builder import IMPORT_PATH


def resolve_import_path(import_path: str) -> Any:
    """The object `module:attr` (or `module.attr`) names, as Serve resolves it."""
    module_name, sep, attr = import_path.partition(":")
    if not sep:
        module_name, _, attr = import_path.rpartition(".")
    if not module_name or not attr:
        raise ConfigError(f"serve config: import_path {import_path!r} must be 'module:attribute'")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"serve config: import_path {import_path!r} cannot be imported: {err}") from None


def load_serve_config(source: str | os.PathLike | Mapping[str, Any]) -> dict[str, ClusterConfig]:
    """Application name -> ClusterConfig for every application of ours in a Serve config.

    `source` is a file path, YAML text (what a RayService's serveConfigV2 holds) or a mapping.
    An application of ours must name our builder, and its `serving.app_name` must equal its
    Serve name (the front door finds the application by that name).
    """
    if isinstance(source, Mapping):
        data = source
    else:
        text = Path(source).read_text() if isinstance(source, os.PathLike) else str(source)
        data = yaml.safe_load(text) or {}
    applications = data.get("applications") if isinstance(data, Mapping) else None
    if not isinstance(applications, list) or not applications:
        raise ConfigError("serve config: applications must be a non-empty list")
    configs: dict[str, ClusterConfig] = {}
    for index, app in enumerate(applications):
        name = app.get("name", "default")
        import_path = app.get("import_path", "")
        resolve_import_path(import_path)
        if import_path != IMPORT_PATH:
            continue  # someone else's application; Serve checks it
        try:
            config = from_dict(app.get("args") or {})
        except ConfigError as err:
            raise ConfigError(f"serve config: applications[{index}] ({name}): {err}") from None
        if config.serving.app_name != name:
            raise ConfigError(f"serve config: applications[{index}] ({name}): config: serving.app_name must equal "
                              f"the application name {name!r}, got {config.serving.app_name!r}")
        configs[name] = config
    if not configs:
        raise ConfigError(f"serve config: no application names {IMPORT_PATH}")
    return configs
