"""Echo-engine Serve apps in the session's Ray cluster, each behind its own front door."""

from __future__ import annotations

import asyncio
import threading

import pytest


class EchoFrontdoor:
    """A FrontdoorServer on its own event loop in a thread, so tests (and client processes) use plain gRPC."""

    def __init__(self, handle, config, metrics) -> None:
        from cluster.frontdoor.server import FrontdoorServer

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="echo-frontdoor", daemon=True)
        self.thread.start()
        self.server = FrontdoorServer(handle, config, metrics)
        self._call(self.server.start())

    def _call(self, coro, timeout: float = 120.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    @property
    def target(self) -> str:
        return self.server.grpc_target

    def close(self) -> None:
        self._call(self.server.stop(0.5))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def _echo_frontdoor(serving_config, app_name: str, **overrides):
    from prometheus_client import CollectorRegistry
    from ray import serve

    from cluster.config import from_dict, to_dict
    from cluster.metrics import FrontdoorMetrics
    from cluster.serving.builder import build_app

    data = to_dict(serving_config)
    for path, value in {"engine.kind": "echo", "serving.app_name": app_name, **overrides}.items():
        section, key = path.split(".")
        data[section][key] = value
    config = from_dict(data)
    handle = serve.run(build_app(config), name=app_name, route_prefix=None)
    return EchoFrontdoor(handle, config.frontdoor, FrontdoorMetrics(CollectorRegistry())), app_name


@pytest.fixture(scope="session")
def echo_frontdoor(ray_serving, serving_config):
    """A front door over an echo replica streaming 2000 tokens/s per stream."""
    from ray import serve

    door, app = _echo_frontdoor(serving_config, "bench-echo", **{
        "engine.echo_tokens_per_s": 2000.0, "engine.chunk_interval_ms": 5.0,
        "serving.max_ongoing_requests": 128, "engine.max_waiting_requests": 256})
    yield door
    door.close()
    serve.delete(app)


@pytest.fixture(scope="session")
def slow_echo_frontdoor(ray_serving, serving_config):
    """A deliberately slow replica: one request at a time (Serve queues the rest), 40 tokens/s."""
    from ray import serve

    door, app = _echo_frontdoor(serving_config, "bench-slow-echo", **{
        "engine.echo_tokens_per_s": 40.0, "serving.max_ongoing_requests": 1, "serving.max_queued_requests": -1})
    yield door
    door.close()
    serve.delete(app)
