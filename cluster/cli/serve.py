"""`gptoss-cluster serve`: Ray (local or joined), the model replicas, and the gRPC front door."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import threading

from cluster.cli import frontdoor_flags
from cluster.cli.frontdoor_process import set_serve_process_defaults, start_frontdoor
from cluster.config import ConfigError

log = logging.getLogger("cluster.cli.serve")

FLAG_PATHS = {**frontdoor_flags.FLAG_PATHS, "model": "model.path", "preset": "model.preset",
              "replicas": "serving.replicas", "ep_size": "parallel.ep_size"}
# After the drain, closing the front door and leaving a local Ray takes 2-3 s. Ray's driver can hang
# in its disconnect when a signal to the whole process group ends the GCS meanwhile (it then waits
# out a 60 s reconnection timeout and kills the process: seen in 2 of 3 full test runs on one box),
# so past this bound, with that Ray going down, serve finishes the stop itself.
STUCK_STOP_S = 8.0


def register(subparsers) -> None:
    p = subparsers.add_parser("serve", help="serve a gpt-oss model over gRPC and HTTP",
                              description="Start (or join) Ray, deploy the model replicas and serve gptoss.v1 "
                                          "over gRPC. With no model, gpt-oss-tiny (a small model trained to speak harmony) is "
                                          "rebuilt once into the cache from the weights in the package.")
    frontdoor_flags.add_flags(p, address_help="join this Ray cluster instead of starting one")
    model = p.add_mutually_exclusive_group()
    model.add_argument("--model", metavar="DIR", help="checkpoint directory (HF layout)")
    model.add_argument("--preset", help="build and serve a preset checkpoint (default: gpt-oss-tiny, trained; other presets random)")
    p.add_argument("--replicas", type=int, help="model replicas (default 1)")
    p.add_argument("--ep-size", type=int, help="expert-parallel ranks per replica (default 1)")
    p.set_defaults(func=run)


async def _serve(runtime, config) -> None:
    server, stop = await start_frontdoor(runtime.handle, config.frontdoor)
    metrics = f"http://{config.frontdoor.host}:{server.metrics_port}/metrics" if server.metrics_port else "off"
    http = server.http_url if server.http_port is not None else "off"
    print(f"gptoss-cluster: serving {server.info.model_name} | gRPC {server.grpc_target} | HTTP {http} | "
          f"metrics {metrics}", flush=True)
    print(f"gptoss-cluster: {runtime.ray_notice}", flush=True)
    await stop.wait()
    print("gptoss-cluster: shutting down", flush=True)
    watchdog = threading.Timer(config.frontdoor.grace_period_s + STUCK_STOP_S, _end_a_stuck_stop, (runtime,))
    watchdog.daemon = True
    watchdog.start()
    await server.stop()


def _end_a_stuck_stop(runtime) -> None:
    """The drain is over and the stop is stuck: if the local Ray is going down, end it and exit."""
    if not runtime.local_ray_going_down():
        return  # a graceful replica stop (serve.delete) may take longer; Ray's own timeouts bound it
    log.warning("the local Ray's disconnect did not end within %.0f s of the drain; exiting without it",
                STUCK_STOP_S)
    runtime.kill_local_ray()
    _say_stopped()
    os._exit(0)


def _say_stopped() -> None:
    """The last line of every stop, the normal one and one cut short (tests wait for it)."""
    print("gptoss-cluster: stopped", flush=True)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def run(args: argparse.Namespace) -> int:
    from cluster import logs

    set_serve_process_defaults()
    from cluster.cli.preflight import PreflightError, check_checkpoint, check_ports, port_problem

    config = frontdoor_flags.config_from_flags(args, "serve", FLAG_PATHS,
                                               {"model.preset": ""} if args.model else None)
    if config is None:
        return 2
    logs.configure(config.log_level)
    try:
        check_ports(config, FLAG_PATHS)
        check_checkpoint(config, FLAG_PATHS)
    except PreflightError as err:
        print(f"gptoss-cluster serve: {err}", file=sys.stderr)
        return 1

    from cluster.frontdoor.ports import PortUnavailable
    from cluster.serving.engine_cores import EngineCoreKeeper
    from cluster.serving.runtime import DeployFailed, PlacementError, start_serving

    runtime = None
    code = 0
    # Until the server's loop handles it, SIGTERM interrupts start-up like Ctrl-C, so the app and
    # placement groups created so far are removed (start_serving cleans up on any exception).
    signal.signal(signal.SIGTERM, _interrupt)
    keeper = None
    try:
        runtime = start_serving(config)
        if config.serving.keep_off_engine_cores:
            keeper = EngineCoreKeeper().start()
        asyncio.run(_serve(runtime, config))
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM before the server was up
        pass
    except PortUnavailable as err:  # taken since the check above
        print(f"gptoss-cluster serve: {port_problem(err, FLAG_PATHS)}", file=sys.stderr)
        code = 1
    except DeployFailed as err:
        print(f"gptoss-cluster serve: the model replicas failed to start: {err}", file=sys.stderr)
        code = 1
    except PlacementError as err:
        print(f"gptoss-cluster serve: {err}", file=sys.stderr)
        code = 1
    except (OSError, ConfigError) as err:  # e.g. an unreadable TLS file, no API keys on a public host
        print(f"gptoss-cluster serve: {err}", file=sys.stderr)
        code = 1
    finally:
        if keeper is not None:
            keeper.stop()
        if runtime is not None:
            runtime.stop()
    _say_stopped()
    return code
