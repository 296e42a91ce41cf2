"""The front door's start in a command's process, the same for `serve` and `frontdoor`."""

from __future__ import annotations

import asyncio
import signal


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
