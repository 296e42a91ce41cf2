"""The flags `serve` and `frontdoor` share, defined once: the configuration file, where the front
door listens, Ray's address and the log level. Each maps to a config path; a flag left unset keeps
what the YAML file or GPTOSS_* environment variables say."""

from __future__ import annotations

import argparse
import sys

from cluster.config import ClusterConfig, ConfigError, load_config

# Flag -> config path.
FLAG_PATHS = {
    "grpc_port": "frontdoor.grpc_port",
    "http_port": "frontdoor.http_port",
    "metrics_port": "frontdoor.metrics_port",
    "host": "frontdoor.host",
    "address": "ray.address",
    "log_level": "log_level",
}


def add_flags(p: argparse.ArgumentParser, *, address_help: str) -> None:
    """The shared flags on `p`; `address_help` says what --address does for this command."""
    p.add_argument("--config", metavar="FILE", help="YAML configuration (see cluster/config.py)")
    p.add_argument("--grpc-port", type=int, help="gRPC port (default 50051; 0 picks a free one)")
    p.add_argument("--http-port", type=int, help="OpenAI-compatible HTTP API port (default 8088; 0 picks a free one; "
                                                  "-1 disables)")
    p.add_argument("--metrics-port", type=int, help="Prometheus /metrics port (default 9464; -1 disables)")
    p.add_argument("--host", help="interface to listen on (default 127.0.0.1)")
    p.add_argument("--address", metavar="RAY_ADDRESS", help=address_help)
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"), help="default warning")


def config_from_flags(args: argparse.Namespace, command: str, flag_paths: dict[str, str],
                      overrides: dict[str, object] | None = None) -> ClusterConfig | None:
    """The configuration the command line asks for (the file, then the flags in `flag_paths`, then
    `overrides` by config path), or None after printing why it is invalid."""
    values = {path: getattr(args, flag) for flag, path in flag_paths.items()} | (overrides or {})
    try:
        return load_config(args.config, overrides=values)
    except (ConfigError, OSError) as err:
        print(f"gptoss-cluster {command}: {err}", file=sys.stderr)
        return None
