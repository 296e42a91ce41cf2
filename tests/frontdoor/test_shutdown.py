"""stop() is bounded: however a step of closing behaves (a channel to a replica that is gone, a
router waiting on a dead node), stop() returns within the grace period plus a few seconds, the
steps after a stuck one still run, and the stuck one is logged by name. On SIGTERM the same path
runs in `gptoss-cluster serve`: a step without a bound is a pod that only SIGKILL ends.

The first tests use a real grpc.aio server, HTTP API and metrics server over a scripted replica
(no Ray; a test double only for the replica). Then the load poller's stop, with the poll's answer
arriving in the same loop turn as the cancel (the unbounded await found: 3.11's wait_for dropped
that cancel). The last kills a real Serve replica mid-stream and stops the front door."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time

import grpc
import pytest
from prometheus_client import CollectorRegistry

from cluster.config import FrontdoorConfig
from cluster.frontdoor import server as server_module
from cluster.frontdoor.server import CLOSE_STEP_S, FrontdoorServer
from cluster.metrics import FrontdoorMetrics
from gptoss.v1 import inference_pb2 as pb
from gptoss.v1 import inference_pb2_grpc as pb_grpc
from tests.frontdoor.test_servicer import ScriptedHandle, ScriptedResponse, chunked

GRACE_S = 0.2
STEPS = 7  # the steps of FrontdoorServer._close that each get CLOSE_STEP_S


def _listening(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(1.0)
        return probe.connect_ex(("127.0.0.1", port)) == 0


async def _started_server() -> FrontdoorServer:
    handle = ScriptedHandle(lambda request: ScriptedResponse(chunked(list(range(100, 400)), 1), delay_s=0.02))
    server = FrontdoorServer(handle, FrontdoorConfig(grpc_port=0, metrics_port=0, http_port=0, load_poll_interval_s=0),
                             FrontdoorMetrics(CollectorRegistry()), bind_to_loop=False)
    await server.start()
    return server


async def _stop_within(server: FrontdoorServer, bound_s: float) -> float:
    started = time.monotonic()
    try:
        await asyncio.wait_for(server.stop(GRACE_S), bound_s)
    except TimeoutError:
        pytest.fail(f"stop() did not return within {bound_s:g} s")
    return time.monotonic() - started


def test_a_step_that_never_returns_is_logged_and_the_later_steps_still_run(caplog):
    """The replica channels' close never returns (as an await on a replica that is gone would):
    stop() still returns, after the gRPC server stopped and with the metrics server closed after it."""
    forever = asyncio.Event()

    async def body():
        server = await _started_server()
        metrics_port, grpc_target = server.metrics_port, server.grpc_target
        assert _listening(metrics_port)
        closes = []

        async def close_never_returns():
            closes.append(time.monotonic())
            await forever.wait()

        server._inference.close = close_never_returns
        async with grpc.aio.insecure_channel(grpc_target) as channel:  # a stream in flight when it stops
            stream = pb_grpc.InferenceStub(channel).Generate(pb.GenerateRequest(
                prompt_token_ids=[1, 2, 3], sampling=pb.SamplingParams(max_tokens=300, ignore_stop=True)), timeout=30)
            await stream.read()
            took_s = await _stop_within(server, GRACE_S + STEPS * CLOSE_STEP_S + 3)
            with pytest.raises(grpc.aio.AioRpcError):  # the server cancelled it at stop
                while await stream.read() is not grpc.aio.EOF:
                    pass
        return took_s, closes, metrics_port

    with caplog.at_level(logging.WARNING, logger=server_module.__name__):
        took_s, closes, metrics_port = asyncio.run(body())
    assert len(closes) == 1
    assert CLOSE_STEP_S <= took_s < GRACE_S + CLOSE_STEP_S + 3  # only the stuck step used its bound
    assert not _listening(metrics_port)  # the step after the stuck one ran
    (stuck,) = [r for r in caplog.records if getattr(r, "shutdown_step", None) == "replica_channels"]
    assert stuck.levelno == logging.WARNING and "step=replica_channels did not finish" in stuck.getMessage()


def test_a_failing_step_is_logged_and_the_later_steps_still_run(caplog):
    async def body():
        server = await _started_server()
        metrics_port = server.metrics_port

        async def store_close_fails():
            raise ConnectionError("redis went away")

        server._store.close = store_close_fails
        await _stop_within(server, GRACE_S + STEPS * CLOSE_STEP_S + 3)
        return metrics_port

    with caplog.at_level(logging.WARNING, logger=server_module.__name__):
        metrics_port = asyncio.run(body())
    assert not _listening(metrics_port)
    (failed,) = [r for r in caplog.records if getattr(r, "shutdown_step", None) == "response_store"]
    assert failed.levelno == logging.WARNING and "redis went away" in failed.getMessage()


def test_a_clean_stop_logs_no_step(caplog):
    async def body():
        server = await _started_server()
        return await _stop_within(server, GRACE_S + STEPS * CLOSE_STEP_S + 3)

    with caplog.at_level(logging.WARNING, logger=server_module.__name__):
        assert asyncio.run(body()) < GRACE_S + CLOSE_STEP_S
    assert not [r for r in caplog.records if getattr(r, "shutdown_step", None)]



class Answers:
    """A remote method whose calls return futures the test completes."""

    def __init__(self):
        self.pending: list[asyncio.Future] = []

    def remote(self):
        self.pending.append(asyncio.get_running_loop().create_future())
        return self.pending[-1]


@pytest.mark.parametrize("answered", ["load reports", "replica counts"])
def test_the_load_poller_stops_when_its_poll_completes_as_it_is_cancelled(answered):
    """The replicas' load reports (or the controller's replica counts) arrive in the same turn of
    the event loop as stop()'s cancel: the poller must still stop. 3.11's asyncio.wait_for returns
    the result then and drops the cancel, which left the poller polling and stop() waiting for it
    forever. The replicas and the controller are test doubles here (futures the test completes)."""
    from types import SimpleNamespace

    from cluster.engine.protocol import EngineStats
    from cluster.frontdoor.loads import LoadPoller

    stats = EngineStats(active_requests=0, requests_total=0, finished_total=0, cancelled_total=0, failed_total=0,
                        tokens_generated_total=0)
    details = {"applications": {"app": {"deployments": {"ModelReplica": {
        "target_num_replicas": 1, "replicas": [{"state": "RUNNING"}]}}}}}
    load_report, get_details = Answers(), Answers()
    handle = SimpleNamespace(load_report=load_report, deployment_id=SimpleNamespace(app_name="app", name="ModelReplica"))

    async def body():
        reports = []
        counts = (lambda *counts: None) if answered == "replica counts" else None
        poller = LoadPoller(handle, 1, 0.01, reports.append, on_counts=counts)
        if counts is not None:
            poller._counts._controller = SimpleNamespace(get_serve_instance_details=get_details)
        poller.start()
        if counts is not None:
            while not get_details.pending:
                await asyncio.sleep(0)
            get_details.pending[0].set_result(details)
        else:
            while len(load_report.pending) < 4:  # a poll's probes are out
                await asyncio.sleep(0)
            for i, answer in enumerate(load_report.pending):
                answer.set_result((f"replica-{i}", stats))
        stopping = asyncio.ensure_future(poller.stop())  # its cancel lands as the answer is taken
        done, _ = await asyncio.wait({stopping}, timeout=3)
        return bool(done), len(reports)

    stopped, polls = asyncio.run(asyncio.wait_for(body(), 10))
    assert stopped, "LoadPoller.stop() did not return"
    assert polls <= 1

# ── a real Serve replica killed with streams in flight ──

class Streams:
    """Generate calls read on threads until they end; `tokens[i]` grows as chunks arrive."""

    def __init__(self, stub, n: int, max_tokens: int) -> None:
        self.tokens = [0] * n
        self.threads = [threading.Thread(target=self._read, args=(stub, i, max_tokens), daemon=True) for i in range(n)]
        for thread in self.threads:
            thread.start()

    def _read(self, stub, i: int, max_tokens: int) -> None:
        request = pb.GenerateRequest(prompt_token_ids=[1000 + i, 2000, 3000],
                                     sampling=pb.SamplingParams(max_tokens=max_tokens, ignore_stop=True))
        try:
            for response in stub.Generate(request, timeout=120):
                if response.HasField("chunk"):
                    self.tokens[i] += len(response.chunk.token_ids)
        except grpc.RpcError:
            pass


@pytest.mark.slow
@pytest.mark.parametrize("killed", ["one replica of 2", "every replica"])
def test_stop_returns_soon_after_a_replica_was_killed_mid_stream(ray_serving, serving_config, killed, caplog):
    """2 echo-engine replicas of a Serve app of their own behind a front door (direct streams and
    the Serve handle path both in use), 6 streams in flight; replicas are killed (ray.kill, as a
    crashed process) and the front door is stopped while its streams are being resumed (waiting up
    to replica_wait_s for a replica): stop() returns within its grace plus the close steps' bounds."""
    import ray
    from ray import serve

    from cluster.config import from_dict, to_dict
    from cluster.serving.builder import build_app
    from tests.conftest import BackgroundFrontdoor
    from tests.waiting import wait_until

    name = "gptoss-stop-after-kill-" + ("one" if killed.startswith("one") else "all")
    data = to_dict(serving_config)
    data["engine"].update(kind="echo", echo_tokens_per_s=50.0)
    data["serving"].update(app_name=name, replicas=2, num_cpus=0.0)
    data["frontdoor"].update(replica_wait_s=60.0, grace_period_s=GRACE_S)
    config = from_dict(data)
    handle = serve.run(build_app(config), name=name, route_prefix=None)
    door = BackgroundFrontdoor(handle, config.frontdoor, FrontdoorMetrics(CollectorRegistry()))
    channel = grpc.insecure_channel(door.target)
    try:
        streams = Streams(pb_grpc.InferenceStub(channel), 6, max_tokens=2000)
        wait_until(lambda: all(streams.tokens), timeout=60, message="every stream has tokens")
        replicas = [ray.get_actor(a["name"], namespace=a["namespace"])
                    for a in ray.util.list_named_actors(all_namespaces=True)
                    if a["name"].startswith(f"SERVE_REPLICA::{name}#")]
        assert len(replicas) == 2
        for replica in replicas[:1] if killed.startswith("one") else replicas:
            ray.kill(replica, no_restart=True)
        time.sleep(0.5)  # the streams see their replica gone and start resuming
        bound_s = GRACE_S + STEPS * CLOSE_STEP_S + 5
        started = time.monotonic()
        with caplog.at_level(logging.WARNING, logger=server_module.__name__):
            stopping = asyncio.run_coroutine_threadsafe(door.server.stop(GRACE_S), door.loop)
            try:
                stopping.result(bound_s)
            except TimeoutError:
                pytest.fail(f"stop() did not return within {bound_s:g} s")
        took_s = time.monotonic() - started
        overran = [r.getMessage() for r in caplog.records if getattr(r, "shutdown_step", None)]
        print(f"\nstop() took {took_s:.2f} s; steps that overran or failed: {overran or 'none'}")
        for thread in streams.threads:  # every client call ended with the server
            thread.join(10)
        assert not any(thread.is_alive() for thread in streams.threads)
    finally:
        channel.close()
        door.loop.call_soon_threadsafe(door.loop.stop)
        door.thread.join(10)
        serve.delete(name)
