"""Session-wide fixtures for the serving tier: one tiny checkpoint, one Ray cluster with the
Serve app, one gRPC front door. Each is built lazily, the first time a test asks for it, so the
model and harmony tiers never start Ray."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import threading
from pathlib import Path

import pytest

import cluster  # noqa: F401  before any test module imports grpc: it switches gRPC's fork handlers off

REPO_ROOT = Path(__file__).resolve().parent.parent

# Ray workers import `cluster` too; make the checkout importable for them when it is not installed.
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """A private checkpoint cache for the session (never the user's ~/.cache)."""
    return tmp_path_factory.mktemp("gptoss-cache")


@pytest.fixture(scope="session")
def tiny_checkpoint(cache_dir) -> Path:
    """The tiny preset checkpoint (real vocabulary), built once, exactly as `serve` builds it."""
    from cluster.serving.model_store import ensure_preset_checkpoint

    return ensure_preset_checkpoint("tiny", cache_dir)


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint):
    from cluster.model.checkpoint import load_model

    return load_model(tiny_checkpoint)


@pytest.fixture(scope="session")
def serving_config(tiny_checkpoint, cache_dir):
    from cluster.config import load_config

    return load_config(env={}, overrides={
        "model.path": str(tiny_checkpoint), "model.preset": "", "model.name": "gpt-oss-tiny-test",
        "cache_dir": str(cache_dir), "ray.num_cpus": 2,
        "frontdoor.grpc_port": 0, "frontdoor.metrics_port": 0, "frontdoor.http_port": 0, "frontdoor.grace_period_s": 1.0,
        "frontdoor.load_poll_interval_s": 0.5,
    })


@pytest.fixture(scope="session")
def ray_serving(serving_config):
    """Ray + Serve + the ModelReplica app, started once; torn down at the end of the session."""
    from cluster.serving.runtime import start_serving

    runtime = start_serving(serving_config)
    yield runtime
    runtime.stop()
    assert_no_router_restarts_ray()


def assert_no_router_restarts_ray(wait_s: float = 2.5) -> None:
    """After the session's stop, no Serve handle's router is left pushing autoscaling metrics (every
    metrics_interval_s: the tests' apps use 2 s or less). Such a push makes Ray start a whole new
    local instance in this process, as handles that tests made from several threads at once did."""
    import time

    import ray

    time.sleep(wait_s)
    restarted = ray.is_initialized()
    if restarted:
        ray.shutdown()
    assert not restarted, ("a Serve handle's router outlived ServingRuntime.stop() and its metrics push made Ray start "
                           "a new local instance: make each handle's router in one thread before sharing the handle")


class BackgroundFrontdoor:
    """A FrontdoorServer running on its own event loop in a thread, so tests use plain gRPC."""

    def __init__(self, handle, config, metrics, **server_kwargs) -> None:
        from cluster.frontdoor.server import FrontdoorServer

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="frontdoor", daemon=True)
        self.thread.start()
        self.server = FrontdoorServer(handle, config, metrics, **server_kwargs)
        self.call(self.server.start())

    def call(self, coro, timeout: float = 120.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    @property
    def target(self) -> str:
        return self.server.grpc_target

    def close(self) -> None:
        self.call(self.server.stop(0.5))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="session")
def frontdoor(ray_serving, serving_config):
    """The front door over the session's Serve app, with its own metrics registry."""
    from prometheus_client import CollectorRegistry

    from cluster.metrics import FrontdoorMetrics

    door = BackgroundFrontdoor(ray_serving.handle, serving_config.frontdoor, FrontdoorMetrics(CollectorRegistry()))
    yield door
    door.close()


@pytest.fixture(scope="session")
def grpc_channel(frontdoor):
    import grpc

    channel = grpc.insecure_channel(frontdoor.target)
    yield channel
    channel.close()


@pytest.fixture(scope="session")
def stub(grpc_channel):
    from gptoss.v1 import inference_pb2_grpc

    return inference_pb2_grpc.InferenceStub(grpc_channel)


@pytest.fixture
def short_tmp():
    """A short temp dir (Ray's unix socket paths must stay under ~107 characters)."""
    path = tempfile.mkdtemp(prefix="gt")
    yield Path(path)
    shutil.rmtree(path, ignore_errors=True)
