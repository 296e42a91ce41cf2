"""stop() is bounded: however a step of closing behaves (a channel to a replica that is gone, a
router waiting on a dead node), stop() returns within the grace period plus a few seconds, the
steps after a stuck one still run, and the stuck one is logged by name. On SIGTERM the same path
runs in `gptoss-cluster serve`: a step without a bound is a pod that only SIGKILL ends.

The first tests use a real grpc.aio server, HTTP API and metrics server over a scripted replica
(no Ray; a test double only for the replica). The last kills a real Serve replica mid-stream."""

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
    overran = [r for r in caplog.records if getattr(r, "shutdown_step", None)]
    assert [(r.levelno, r.shutdown_step) for r in overran] == [(logging.WARNING, "replica_channels")]
    assert "replica_channels" in overran[0].getMessage()


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
    (failed,) = [r for r in caplog.records if getattr(r, "shutdown_step", None)]
    assert failed.shutdown_step == "response_store" and "redis went away" in failed.getMessage()


def test_a_clean_stop_logs_no_step(caplog):
    async def body():
        server = await _started_server()
        return await _stop_within(server, GRACE_S + STEPS * CLOSE_STEP_S + 3)

    with caplog.at_level(logging.WARNING, logger=server_module.__name__):
        assert asyncio.run(body()) < GRACE_S + CLOSE_STEP_S
    assert not [r for r in caplog.records if getattr(r, "shutdown_step", None)]
