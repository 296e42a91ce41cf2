"""`gptoss-cluster frontdoor`: a gRPC front door for a Serve application that is already running.

`serve` starts Ray, deploys the application and runs a front door in one process. In Kubernetes
the RayService deploys the application (serveConfigV2) and the front door runs apart, as its own
horizontally scaled Deployment whose pods join the Ray cluster (`ray start --address=...`) and
then run this command with `--address auto`. It waits for the application named
`serving.app_name` to exist, serves until SIGTERM, drains, and exits; if the Ray cluster goes away
(e.g. a RayService upgrade replaced it), it exits non-zero so Kubernetes restarts it on the new one.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time

from cluster.config import ConfigError, load_config

log = logging.getLogger("cluster.cli.frontdoor")

FLAG_PATHS = {
    "address": "ray.address",
    "app_name": "serving.app_name",
    "grpc_port": "frontdoor.grpc_port",
    "metrics_port": "frontdoor.metrics_port",
    "host": "frontdoor.host",
    "log_level": "log_level",
}


def register(subparsers) -> None:
    p = subparsers.add_parser("frontdoor", help="serve gptoss.v1 for an already deployed Serve application",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--config", metavar="FILE", help="YAML configuration (see cluster/config.py)")
    p.add_argument("--address", metavar="RAY_ADDRESS", help="Ray cluster to join (default: ray.address; 'auto')")
    p.add_argument("--app-name", help="Serve application to forward to (default: serving.app_name)")
    p.add_argument("--grpc-port", type=int, help="gRPC port (default 50051)")
    p.add_argument("--metrics-port", type=int, help="Prometheus /metrics port (default 9464; -1 disables)")
    p.add_argument("--host", help="interface to listen on (default 127.0.0.1)")
    p.add_argument("--wait-s", type=float, default=600.0, help="how long to wait for the application (default 600)")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"), help="default warning")
    p.set_defaults(func=run)


def wait_for_app(app_name: str, wait_s: float):
    """The application's ingress handle, once Serve knows the application (RayServeException until then)."""
    from ray import serve
    from ray.serve.exceptions import RayServeException

    deadline = time.monotonic() + wait_s
    while True:
        try:
            return serve.get_app_handle(app_name)
        except RayServeException as err:
            if time.monotonic() > deadline:
                raise TimeoutError(f"Serve application {app_name!r} did not appear within {wait_s:.0f} s: {err}")
            log.warning("waiting for Serve application %r", app_name)
            time.sleep(5)


async def watch_ray(stop: asyncio.Event, period_s: float = 10.0, misses: int = 3) -> None:
    """Set `stop` once the Ray cluster has not answered `misses` checks in a row (it went away)."""
    import ray

    missed = 0
    while not stop.is_set():
        await asyncio.sleep(period_s)
        try:
            await asyncio.wait_for(asyncio.to_thread(ray.cluster_resources), period_s)
            missed = 0
        except Exception:  # noqa: BLE001 - any failure to reach the GCS counts as a miss
            missed += 1
            log.warning("Ray cluster did not answer (%d/%d)", missed, misses)
            if missed >= misses:
                stop.lost_ray = True  # type: ignore[attr-defined]
                stop.set()


async def _run(handle, config) -> None:
    import signal

    from cluster.frontdoor.server import FrontdoorServer, freeze_startup_heap

    server = FrontdoorServer(handle, config.frontdoor)
    await server.start()
    freeze_startup_heap()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    http = server.http_url if server.http_port is not None else "off"
    print(f"gptoss-cluster frontdoor: {server.info.model_name} | gRPC {server.grpc_target} | HTTP {http} | "
          f"app {config.serving.app_name}", flush=True)
    watchdog = asyncio.create_task(watch_ray(stop))
    await stop.wait()
    watchdog.cancel()
    await server.stop()
    if getattr(stop, "lost_ray", False):
        raise ConnectionError("lost the Ray cluster; exiting so the pod restarts and rejoins")


def run(args: argparse.Namespace) -> int:
    from cluster import logs

    overrides = {path: getattr(args, flag) for flag, path in FLAG_PATHS.items()}
    try:
        config = load_config(args.config, overrides=overrides)
    except (ConfigError, OSError) as err:
        print(f"gptoss-cluster frontdoor: {err}", file=sys.stderr)
        return 2
    if not config.ray.address:
        print("gptoss-cluster frontdoor: needs a Ray cluster to join (--address or ray.address)", file=sys.stderr)
        return 2
    logs.configure(config.log_level)
    from cluster.cli.preflight import PreflightError, check_ports, port_problem
    from cluster.frontdoor.ports import PortUnavailable

    try:
        check_ports(config, FLAG_PATHS)
    except PreflightError as err:
        print(f"gptoss-cluster frontdoor: {err}", file=sys.stderr)
        return 1

    import ray

    from cluster.serving.runtime import start_ray

    start_ray(config)
    try:
        asyncio.run(_run(wait_for_app(config.serving.app_name, args.wait_s), config))
    except PortUnavailable as err:  # taken since the check above
        print(f"gptoss-cluster frontdoor: {port_problem(err, FLAG_PATHS)}", file=sys.stderr)
        return 1
    except (OSError, TimeoutError, ConfigError) as err:  # ConnectionError is an OSError
        print(f"gptoss-cluster frontdoor: {err}", file=sys.stderr)
        return 1
    finally:
        ray.shutdown()
    return 0
