"""What `serve` and `frontdoor` check before starting or joining Ray, so that a port in use or a
wrong checkpoint path costs a second and one line on the terminal instead of a cluster start
and a traceback."""

from __future__ import annotations

from pathlib import Path

from cluster.config import ClusterConfig
from cluster.frontdoor.ports import PortUnavailable, check_free


class PreflightError(Exception):
    """One line for the terminal: what is wrong and which flag or setting changes it."""


def flag_for(setting: str, flag_paths: dict[str, str]) -> str:
    """The command-line flag that sets a config path ("frontdoor.grpc_port" -> "--grpc-port"), or the path."""
    for flag, path in flag_paths.items():
        if path == setting:
            return "--" + flag.replace("_", "-")
    return setting


def port_problem(err: PortUnavailable, flag_paths: dict[str, str]) -> str:
    return f"{err}; choose another port with {flag_for(err.setting, flag_paths)}"


def check_ports(config: ClusterConfig, flag_paths: dict[str, str]) -> None:
    """Raise PreflightError when the gRPC, HTTP or metrics port is already taken on frontdoor.host."""
    door = config.frontdoor
    try:
        check_free(door.host, door.grpc_port, "frontdoor.grpc_port")
        check_free(door.host, door.metrics_port, "frontdoor.metrics_port")
        check_free(door.host, door.http_port, "frontdoor.http_port")
    except PortUnavailable as err:
        raise PreflightError(port_problem(err, flag_paths)) from None


def check_checkpoint(config: ClusterConfig, flag_paths: dict[str, str]) -> None:
    """Raise PreflightError when model.path is not a loadable gpt-oss checkpoint (config.json and
    every tensor's shape, from headers only). Only where the replicas will read it: a local Ray."""
    if not config.model.path or config.ray.address or config.engine.kind == "echo":
        return
    from cluster.model.checkpoint import CheckpointError, verify_checkpoint

    try:
        verify_checkpoint(Path(config.model.path).expanduser())
    except CheckpointError as err:
        raise PreflightError(f"checkpoint {config.model.path} ({flag_for('model.path', flag_paths)}) cannot be "
                             f"served: {err}") from None
