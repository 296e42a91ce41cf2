"""Overload through the whole stack: a replica whose engine queue holds 2 requests (2 more
running) gets 10x the queue at once; the excess is refused promptly with RESOURCE_EXHAUSTED and
a RetryInfo hint, and the accepted requests complete with the right tokens."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
import torch

from cluster.model.generate import greedy
from gptoss.v1 import inference_pb2 as pb
from tests.frontdoor.status_details import details, retry_delay_s
from tests.waiting import wait_until

pytestmark = pytest.mark.slow

QUEUE = 2
FLOOD = 10 * QUEUE * 2  # 10x what the engine holds (running + waiting)


@pytest.fixture(scope="module")
def small_queue_stub(ray_serving, serving_config):
    from prometheus_client import CollectorRegistry
    from ray import serve

    from cluster.config import from_dict, to_dict
    from cluster.metrics import FrontdoorMetrics
    from cluster.serving.builder import build_app
    from gptoss.v1 import inference_pb2_grpc
    from tests.conftest import BackgroundFrontdoor

    data = to_dict(serving_config)
    data["serving"].update(app_name="small-queue", max_ongoing_requests=4 * FLOOD)
    data["engine"].update(max_num_seqs=2, max_waiting_requests=QUEUE, max_num_batched_tokens=64)
    config = from_dict(data)
    handle = serve.run(build_app(config), name=config.serving.app_name, route_prefix=None)
    door = BackgroundFrontdoor(handle, config.frontdoor, FrontdoorMetrics(CollectorRegistry()))
    channel = grpc.insecure_channel(door.target)
    yield inference_pb2_grpc.InferenceStub(channel), handle, door
    channel.close()
    door.close()
    serve.delete(config.serving.app_name)


def dispatched_streams(app_name: str) -> float:
    """Generate streams this process's front-door routers have sent to a replica of `app_name`."""
    from cluster.metrics import router_metrics

    return sum(s.value for m in router_metrics().streams_total.collect() for s in m.samples
               if s.name.endswith("_total") and s.labels["application"] == app_name
               and s.labels["path"] in ("direct", "engine_client", "serve_handle"))


def test_ten_times_the_queue_gets_prompt_resource_exhausted_and_the_rest_complete(small_queue_stub, tiny_model):
    stub, handle, _ = small_queue_stub
    g = torch.Generator().manual_seed(21)
    prompts = [torch.randint(0, 100_000, (8 + i % 11,), generator=g).tolist() for i in range(FLOOD)]
    results: list = [None] * FLOOD
    gate = threading.Barrier(FLOOD)

    def run(i):
        request = pb.GenerateRequest(prompt_token_ids=prompts[i],
                                     sampling=pb.SamplingParams(max_tokens=40, ignore_stop=True))
        gate.wait()
        started = time.monotonic()
        try:
            tokens = [t for r in stub.Generate(request, timeout=120) if r.HasField("chunk") for t in r.chunk.token_ids]
            results[i] = ("ok", tokens, time.monotonic() - started)
        except grpc.RpcError as err:
            results[i] = ("error", err, time.monotonic() - started)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(FLOOD)]
    dispatched_before = dispatched_streams("small-queue")
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)

    dispatched = dispatched_streams("small-queue") - dispatched_before
    refused = [(i, r) for i, r in enumerate(results) if r[0] == "error"]
    accepted = [(i, r) for i, r in enumerate(results) if r[0] == "ok"]
    assert len(refused) + len(accepted) == FLOOD
    # The engine holds 4 at a time; a few more may slip in as early ones finish during the flood.
    assert len(refused) >= FLOOD * 3 // 4, f"only {len(refused)} of {FLOOD} refused"
    # The waiting queue always takes QUEUE; the step loop moves up to 2 more into the batch only if
    # it runs between arrivals, which a burst from 40 threads may not give it time to do.
    assert len(accepted) >= QUEUE, len(accepted)
    slowest_accepted = max(r[2] for _, r in accepted)
    assert dispatched == len(accepted), "the front door sent a refused request to the replica"
    for _, (_, err, elapsed) in refused:
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err
        info = details(err)
        assert info["ErrorInfo"].reason == "MODEL_OVERLOADED"
        assert 0 < retry_delay_s(err) <= 30
        assert elapsed < slowest_accepted  # refused at once, not after waiting its turn
    for i, (_, tokens, _) in accepted:
        assert tokens == greedy(tiny_model, prompts[i], 40), f"accepted request {i} differs"
    after = handle.stats.remote().result(timeout_s=30)
    deadline = time.monotonic() + 5
    while after.active_requests and time.monotonic() < deadline:
        time.sleep(0.05)
        after = handle.stats.remote().result(timeout_s=30)
    assert after.kv_blocks_used == 0 and after.finished_total == len(accepted)
    print(f"{len(refused)} refused (max {max(r[2] for _, r in refused) * 1000:.0f} ms), {len(accepted)} accepted "
          f"(slowest {slowest_accepted:.2f} s)")


def drain(stream, errors: list) -> None:
    """Read a stream to its end (or until it is cancelled); an error other than the cancel goes to `errors`."""
    try:
        for _ in stream:
            pass
    except grpc.RpcError as err:
        if err.code() != grpc.StatusCode.CANCELLED:
            errors.append(err.code().name)


async def _requests_held(door) -> int | None:
    """The requests the replicas hold by their last load reports, as `door`'s router sees them
    (run on the front door's loop, where its router lives); None before the router exists."""
    from cluster.serving.serve_internals import request_router

    router = request_router(door.server._loop_handle)
    return None if router is None else router.requests_held()[0]


def test_a_second_front_door_refuses_from_the_replicas_load_reports_without_sending(small_queue_stub, serving_config):
    """Another front door (its own router, as a second pod's) has sent nothing to the replica, so
    its own count says the replica is empty; the replica's load report says it holds all it can.
    It refuses at once, RESOURCE_EXHAUSTED with RetryInfo, and sends nothing to the replica; once
    the streams are gone from the reports it takes requests again."""
    from prometheus_client import CollectorRegistry
    from ray import serve

    from cluster.metrics import FrontdoorMetrics
    from gptoss.v1 import inference_pb2_grpc
    from tests.conftest import BackgroundFrontdoor

    stub, handle, door = small_queue_stub
    capacity = 2 + QUEUE  # 2 running, 2 waiting for a minute or more
    # The previous test's flood ends on the replica before its next load report says so; until
    # then this front door would refuse the streams below as overload.
    wait_until(lambda: door.call(_requests_held(door)) in (0, None), timeout=30, interval=0.1,
               message="the replica's load report showing it empty after the flood")
    holding = [stub.Generate(pb.GenerateRequest(prompt_token_ids=[11 + i, 12], sampling=pb.SamplingParams(
        max_tokens=4000, ignore_stop=True)), timeout=300) for i in range(capacity)]
    errors: list[str] = []
    readers = [threading.Thread(target=drain, args=(s, errors), daemon=True) for s in holding]
    for reader in readers:
        reader.start()
    deadline = time.monotonic() + 30
    while handle.stats.remote().result(timeout_s=30).active_requests < capacity:
        assert time.monotonic() < deadline, f"the replica never held the 4 streams; ended: {errors}"
        time.sleep(0.1)
    other = BackgroundFrontdoor(serve.get_app_handle("small-queue"), serving_config.frontdoor,
                                FrontdoorMetrics(CollectorRegistry()))
    channel = grpc.insecure_channel(other.target)
    try:
        other_stub = inference_pb2_grpc.InferenceStub(channel)
        request = pb.GenerateRequest(prompt_token_ids=[5, 6, 7], sampling=pb.SamplingParams(max_tokens=4))
        wait_until(lambda: (other.call(_requests_held(other)) or 0) >= capacity, timeout=30, interval=0.1,
                   message="the replica's load report showing it full, as the second front door's router sees it")
        before = dispatched_streams("small-queue")
        with pytest.raises(grpc.RpcError) as refused:
            list(other_stub.Generate(request, timeout=30))
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused.value
        assert details(refused.value)["ErrorInfo"].reason == "MODEL_OVERLOADED" and retry_delay_s(refused.value) > 0
        assert dispatched_streams("small-queue") == before, "the refused request was sent to the replica"
        for stream in holding:
            stream.cancel()
        deadline = time.monotonic() + 30
        while True:  # the next reports show the room again
            try:
                assert len([t for r in other_stub.Generate(request, timeout=30) for t in r.chunk.token_ids]) == 4
                break
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and time.monotonic() < deadline, err
                time.sleep(0.2)
        for reader in readers:
            reader.join(10)
    finally:
        for stream in holding:
            stream.cancel()
        channel.close()
        other.close()
