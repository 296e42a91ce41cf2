"""`gptoss-cluster frontdoor`: a gRPC front door for a Serve application that is already running.

`serve` starts Ray, deploys the application and runs a front door in one process. In Kubernetes
the RayService deploys the application (serveConfigV2) and the front door runs apart, as its own
horizontally scaled Deployment whose pods join the Ray cluster (`ray start --address=...`) and
then run this command with `--address auto`. It waits for the application named
`serving.app_name` to exist, serves until SIGTERM, drains, and exits; if the Ray cluster goes away
(e.g. a RayService upgrade replaced it: its GCS has not answered for ray.gcs_reconnect_timeout_s),
it exits non-zero so Kubernetes restarts it on the new one. A head that restarts within that time
(GCS fault tolerance) does not interrupt it.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time

from cluster.cli import frontdoor_flags
from cluster.cli.frontdoor_process import set_serve_process_defaults, start_frontdoor
from cluster.config import ConfigError

log = logging.getLogger("cluster.cli.frontdoor")

FLAG_PATHS = {**frontdoor_flags.FLAG_PATHS, "app_name": "serving.app_name"}


def register(subparsers) -> None:
    p = subparsers.add_parser("frontdoor", help="serve gptoss.v1 for an already deployed Serve application",
                              description=__doc__.split("\n\n")[0])
    frontdoor_flags.add_flags(p, address_help="Ray cluster to join (default: ray.address; 'auto')")
    p.add_argument("--app-name", help="Serve application to forward to (default: serving.app_name)")
    p.add_argument("--wait-s", type=float, default=600.0, help="how long to wait for the application (default 600)")
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


async def watch_ray(stop: asyncio.Event, lost_after_s: float, period_s: float = 10.0) -> None:
    """Set `stop` once the Ray cluster's GCS has not answered for `lost_after_s` (it went away).

    A GCS that is restarting (a head restart with GCS fault tolerance) does not answer for a while
    and then answers again; meanwhile the replicas keep streaming and the router keeps routing, so
    the front door keeps serving. One check runs at a time: while the GCS is down a check can wait
    on Ray's own reconnection, and piling up more would only fill the default executor."""
    import ray

    loop = asyncio.get_running_loop()
    answered = loop.time()
    check: asyncio.Future | None = None
    while not stop.is_set():
        if check is None:
            check = asyncio.ensure_future(asyncio.to_thread(ray.cluster_resources))
        await asyncio.wait({check}, timeout=period_s)
        ok = check.done() and check.exception() is None  # any failure to reach the GCS is no answer
        if ok:
            answered = loop.time()
        if check.done():
            check = None
        silent_s = loop.time() - answered
        if silent_s >= lost_after_s:
            stop.lost_ray = True  # type: ignore[attr-defined]
            stop.set()
            if check is not None:
                check.cancel()  # the thread itself ends with Ray's own timeout
            return
        if not ok:
            log.warning("the Ray cluster has not answered for %.0f s (the front door gives up after %.0f s, "
                        "ray.gcs_reconnect_timeout_s)", silent_s, lost_after_s)
        if check is None:
            await asyncio.sleep(period_s)


async def _run(handle, config) -> None:
    server, stop = await start_frontdoor(handle, config.frontdoor)
    http = server.http_url if server.http_port is not None else "off"
    print(f"gptoss-cluster frontdoor: {server.info.model_name} | gRPC {server.grpc_target} | HTTP {http} | "
          f"app {config.serving.app_name}", flush=True)
    watchdog = asyncio.create_task(watch_ray(stop, config.ray.gcs_reconnect_timeout_s))
    await stop.wait()
    watchdog.cancel()
    await server.stop()
    if getattr(stop, "lost_ray", False):
        raise ConnectionError("lost the Ray cluster; exiting so the pod restarts and rejoins")


def run(args: argparse.Namespace) -> int:
    from cluster import logs

    set_serve_process_defaults()

    config = frontdoor_flags.config_from_flags(args, "frontdoor", FLAG_PATHS)
    if config is None:
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
