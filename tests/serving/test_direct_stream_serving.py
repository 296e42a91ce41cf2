"""The front door's direct streams through real Ray Serve, a real front door and gRPC, with the echo
test engine (the model is beside the point here): requests go straight to the replica Serve's
router chose once the channel is up; a replica that publishes none is served through the handle;
a full replica's refusal is routed again through the handle and the request completes; and a
replica replaced by a redeploy finishes the direct stream it had accepted. Every test runs with
each kind of direct stream (serving.replica_stream)."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
from prometheus_client import REGISTRY

from gptoss.v1 import inference_pb2 as pb
from gptoss.v1 import inference_pb2_grpc

pytestmark = pytest.mark.slow


@pytest.fixture(params=["per_request", "multiplexed", "socket"])
def kind(request) -> str:
    return request.param


class EchoApp:
    """An echo-engine app with its own front door; `streams(path)` reads gptoss_router_streams_total."""

    def __init__(self, serving_config, name: str, kind: str, **overrides) -> None:
        from prometheus_client import CollectorRegistry
        from ray import serve

        from cluster.metrics import FrontdoorMetrics
        from cluster.serving.builder import build_app
        from tests.conftest import BackgroundFrontdoor

        self.name = f"{name}-{kind}"
        self.kind = kind
        self.config = self.configured(serving_config, **overrides)
        self.handle = serve.run(build_app(self.config), name=self.name, route_prefix=None)
        self.door = BackgroundFrontdoor(self.handle, self.config.frontdoor, FrontdoorMetrics(CollectorRegistry()))
        self.channel = grpc.insecure_channel(self.door.target)
        self.stub = inference_pb2_grpc.InferenceStub(self.channel)

    def configured(self, serving_config, **overrides):
        from cluster.config import from_dict, to_dict

        data = to_dict(serving_config)
        for path, value in {"engine.kind": "echo", "serving.app_name": self.name, "serving.replica_stream": self.kind,
                            **overrides}.items():
            section, key = path.split(".")
            data[section][key] = value
        return from_dict(data)

    def redeploy(self, serving_config, **overrides) -> None:
        from ray import serve

        from cluster.serving.builder import build_app

        serve.run(build_app(self.configured(serving_config, **overrides)), name=self.name, route_prefix=None)

    def streams(self, path: str) -> float:
        return REGISTRY.get_sample_value("gptoss_router_streams_total", {
            "application": self.name, "deployment": "ModelReplica", "path": path}) or 0.0

    def generate(self, n: int, prompt=(11, 12, 13), timeout: float = 30.0) -> list:
        return list(self.stub.Generate(pb.GenerateRequest(prompt_token_ids=list(prompt),
                                                          sampling=pb.SamplingParams(max_tokens=n)), timeout=timeout))

    def until_direct(self) -> None:
        """Requests until one went direct (the first ones wait for the channel to connect)."""
        before = self.streams("direct")
        deadline = time.monotonic() + 30
        while self.streams("direct") == before:
            assert time.monotonic() < deadline, "no request went direct within 30 s"
            self.generate(2)
            time.sleep(0.05)

    def multiplexed_connections(self) -> int:
        return len(self.door.server._inference._replicas._multiplexed._connections)

    def close(self) -> None:
        from ray import serve

        self.channel.close()
        self.door.close()
        serve.delete(self.name)


def tokens(responses) -> list[int]:
    return [t for r in responses if r.HasField("chunk") for t in r.chunk.token_ids]


def test_requests_go_direct_once_the_channel_is_up_and_carry_the_same_tokens(ray_serving, serving_config, kind):
    app = EchoApp(serving_config, "direct-on", kind, **{"engine.echo_tokens_per_s": 0.0})
    try:
        app.until_direct()
        direct, handle = app.streams("direct"), app.streams("serve_handle")
        for n in (1, 7, 40):
            responses = app.generate(n, prompt=(21, 22, 23))
            assert tokens(responses) == [(21, 22, 23)[i % 3] for i in range(n)]
            assert responses[-1].complete.finish_reason == pb.FINISH_REASON_LENGTH
            assert responses[-1].complete.usage.completion_tokens == n
        assert app.streams("direct") == direct + 3 and app.streams("serve_handle") == handle
        assert app.multiplexed_connections() == (kind != "per_request")
        if kind == "socket":
            connection, = app.door.server._inference._replicas._multiplexed._connections.values()
            assert type(connection.call).__name__ == "FramedCall"  # the replica's own socket, not a gRPC call
            assert connection.call.connected and connection.messages >= 3
        # A bad request is refused by the front door and never opens a stream.
        with pytest.raises(grpc.RpcError) as refused:
            app.generate(10**9)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "max_tokens" in refused.value.details()
        assert app.streams("direct") == direct + 3
    finally:
        app.close()


def test_forty_cancelled_direct_streams_all_stop_in_the_replica(ray_serving, serving_config, kind):
    app = EchoApp(serving_config, "direct-cancel", kind, **{"engine.echo_tokens_per_s": 200.0})
    try:
        app.until_direct()
        before, direct = app.handle.stats.remote().result(), app.streams("direct")
        for i in range(40):
            call = app.stub.Generate(pb.GenerateRequest(prompt_token_ids=[61 + i],
                                                        sampling=pb.SamplingParams(max_tokens=2000)), timeout=30)
            next(call)
            call.cancel()
        assert app.streams("direct") == direct + 40
        deadline = time.monotonic() + 10
        while True:
            stats = app.handle.stats.remote().result()
            if stats.cancelled_total == before.cancelled_total + 40 and stats.active_requests == 0:
                break
            assert time.monotonic() < deadline, f"not every cancelled stream stopped: {stats}"
            time.sleep(0.05)
        assert stats.finished_total == before.finished_total  # none ran on to its 2000 tokens
    finally:
        app.close()


def test_a_replica_without_a_direct_stream_is_served_through_the_handle(ray_serving, serving_config, kind):
    app = EchoApp(serving_config, "direct-off", kind, **{"engine.echo_tokens_per_s": 0.0,
                                                         "serving.direct_stream": False})
    try:
        for _ in range(5):
            assert len(tokens(app.generate(5))) == 5
            time.sleep(0.05)
        assert app.streams("serve_handle") == 5 and app.streams("direct") == 0
    finally:
        app.close()


def test_a_full_replica_refuses_and_the_handle_serves_the_request_when_it_frees(ray_serving, serving_config, kind):
    # One request at a time per replica; the test's own handle (another router, as another front
    # door would be) fills the replica, so the front door's router does not know it is full.
    app = EchoApp(serving_config, "direct-full", kind, **{"engine.echo_tokens_per_s": 40.0,
                                                    "serving.max_ongoing_requests": 1,
                                                    "serving.max_queued_requests": -1})
    try:
        app.until_direct()
        from cluster.engine.request import GenerateRequest, SamplingParams

        occupying = app.handle.options(stream=True).generate.remote(
            GenerateRequest(prompt_token_ids=(31,), sampling=SamplingParams(max_tokens=20)))
        first = next(iter(occupying))  # the replica is busy for the next ~0.5 s
        assert first.token_ids == (31,)
        refused = app.streams("serve_handle_after_refusal")
        started = time.monotonic()
        responses = app.generate(4, prompt=(41,))
        assert tokens(responses) == [41] * 4 and responses[-1].complete.finish_reason == pb.FINISH_REASON_LENGTH
        assert app.streams("serve_handle_after_refusal") == refused + 1
        rest = [c for chunk in occupying for c in chunk.token_ids]
        assert len(rest) == 19
        assert time.monotonic() - started > 0.2  # it waited for the replica rather than being failed
    finally:
        app.close()


def test_a_redeployed_replica_finishes_the_direct_stream_it_accepted(ray_serving, serving_config, kind):
    from ray import serve

    app = EchoApp(serving_config, "direct-redeploy", kind, **{"engine.echo_tokens_per_s": 25.0,
                                                        "serving.graceful_shutdown_timeout_s": 30.0})
    try:
        app.until_direct()
        old_replica, _ = app.handle.load_report.remote().result()
        direct = app.streams("direct")
        stream = app.stub.Generate(pb.GenerateRequest(prompt_token_ids=[51, 52],
                                                      sampling=pb.SamplingParams(max_tokens=250)), timeout=60)
        received = [next(stream)]  # 10 s of tokens at 25 tokens/s, from the replica about to be replaced
        assert app.streams("direct") == direct + 1
        rest: list = []
        reader = threading.Thread(target=lambda: rest.extend(stream))
        reader.start()
        redeploy = threading.Thread(target=app.redeploy, args=(serving_config,), kwargs={
            "engine.echo_tokens_per_s": 0.0, "serving.graceful_shutdown_timeout_s": 30.0})
        redeploy.start()
        # Serve starts the new replica, then stops the old one: it must be stopping mid-stream.
        # Other requests keep coming meanwhile (the front door sees the replica set change).
        stopping_mid_stream = False
        while reader.is_alive():
            states = serve.status().applications[app.name].deployments["ModelReplica"].replica_states
            stopping_mid_stream |= states.get("STOPPING", 0) > 0 and reader.is_alive()
            assert len(tokens(app.generate(2, prompt=(71,)))) == 2
            time.sleep(0.1)
        redeploy.join(120)
        assert stopping_mid_stream, "the old replica did not start stopping while the stream ran"
        received += rest
        assert tokens(received) == [(51, 52)[i % 2] for i in range(250)]
        assert received[-1].complete.finish_reason == pb.FINISH_REASON_LENGTH
        # The new replica serves (unpaced: 200 tokens at once), and the old one is gone.
        assert len(tokens(app.generate(200))) == 200
        deadline = time.monotonic() + 60
        while app.handle.load_report.remote().result()[0] == old_replica:
            assert time.monotonic() < deadline, "the old replica still answers"
            time.sleep(0.5)
        app.until_direct()
    finally:
        app.close()
