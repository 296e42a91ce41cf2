"""The front door's start in a command's process, the same for `serve` and `frontdoor`."""

from __future__ import annotations

import asyncio
import os
import signal

# Serve's request router in a front door process records Ray's own router metrics from a task every
# RAY_SERVE_METRICS_EXPORT_INTERVAL_MS (Serve's default 100 ms), each record through Ray's
# OpenTelemetry recorder on the front door's event loop: ~20% of that loop's busy time at 32 streams
# with the vLLM engine (py-spy; docs/performance.md, "The front door as the engine core's client").
# Ray exports metrics every few seconds anyway: once a second loses nothing.
SERVE_ROUTER_METRICS_INTERVAL_MS = "1000"


def set_serve_process_defaults() -> None:
    """Serve settings of a process that runs a front door, unless the operator set them; first thing
    in the command, before anything imports ray.serve (which reads them once)."""
    os.environ.setdefault("RAY_SERVE_METRICS_EXPORT_INTERVAL_MS", SERVE_ROUTER_METRICS_INTERVAL_MS)


async def start_frontdoor(handle, frontdoor_config):
    """Start a front door on `handle` and freeze the start-up heap; returns (server, stop), where
    `stop` is an event SIGTERM and SIGINT set: the command's cue to drain and exit."""
    from cluster.frontdoor.server import FrontdoorServer, freeze_startup_heap

    server = FrontdoorServer(handle, frontdoor_config)
    await server.start()
    freeze_startup_heap()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return server, stop
