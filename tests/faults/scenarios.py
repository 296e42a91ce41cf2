"""Fault scenarios on a real multi-node Ray cluster on this machine (ray.cluster_utils.Cluster:
one GCS, a raylet per node, each with its own resources), the gptoss cluster run across it
(start_serving with ray.address, as `serve --address` does) and a real gRPC front door.

Each scenario runs in a process of its own (`python -m tests.faults.scenarios NAME`), because a
process holds one Ray connection and the test session may already hold another; it prints one
JSON line: its counts (sent, completed, migrated, failed by status, hung) and its checks.
tests/faults/test_faults.py runs them and prints the table.

Nodes: the head has no CPU for replicas (only Serve's controller, which asks for none); worker
nodes have 1 CPU each and every replica asks for 1 CPU, so each replica has a node of its own
and losing a node loses exactly its replicas.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

from tests.waiting import wait_until

REPLICA_WAIT_S = 3.0


def _cluster(workers: int, temp_dir: str):
    import ray._private.utils
    from ray.cluster_utils import Cluster

    # Cluster() records its address in /tmp/ray for `ray.init("auto")`: not on a shared machine.
    ray._private.utils.write_ray_address = lambda *args, **kwargs: None
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "temp_dir": temp_dir,
                                                            "include_dashboard": False})
    nodes = [cluster.add_node(num_cpus=1) for _ in range(workers)]
    cluster.wait_for_nodes()
    return cluster, nodes


def _config(address: str, cache_dir: str, checkpoint: Path, **overrides):
    from cluster.config import load_config

    return load_config(env={}, overrides={
        "model.path": str(checkpoint), "model.preset": "", "model.name": "gpt-oss-tiny-faults",
        "cache_dir": cache_dir, "ray.address": address, "serving.num_cpus": 1.0,
        "frontdoor.grpc_port": 0, "frontdoor.metrics_port": 0, "frontdoor.grace_period_s": 1.0,
        "frontdoor.replica_wait_s": REPLICA_WAIT_S, "frontdoor.load_poll_interval_s": 0,
        **overrides})


class Door:
    """The front door on its own loop in a thread, with its own metrics registry."""

    def __init__(self, handle, config) -> None:
        from prometheus_client import CollectorRegistry

        from cluster.metrics import FrontdoorMetrics
        from tests.conftest import BackgroundFrontdoor

        self.metrics = FrontdoorMetrics(CollectorRegistry())
        self.door = BackgroundFrontdoor(handle, config.frontdoor, self.metrics)
        import grpc

        from gptoss.v1 import inference_pb2_grpc

        self.channel = grpc.insecure_channel(self.door.target)
        self.server_stopped = False  # a scenario stopped the server itself (a drain)
        self.stub = inference_pb2_grpc.InferenceStub(self.channel)

    def health(self) -> str:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        reply = health_pb2_grpc.HealthStub(self.channel).Check(
            health_pb2.HealthCheckRequest(service="gptoss.v1.Inference"), timeout=5)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    def migrations(self) -> dict[str, float]:
        return {s.labels["outcome"]: s.value for m in self.metrics.migrations_total.collect() for s in m.samples
                if s.name.endswith("_total")}

    def close(self) -> None:
        self.channel.close()
        if not self.server_stopped:
            self.door.close()


class Serving:
    """A Ray cluster on this machine, the gptoss cluster started on it, and a front door."""

    def __init__(self, cluster, nodes, config, runtime, door: Door) -> None:
        self.cluster, self.nodes, self.config, self.runtime, self.door = cluster, nodes, config, runtime, door


@contextlib.contextmanager
def _serving(env: dict, workers: int, **overrides):
    """Serving on `workers` worker nodes (config `overrides` on top of _config's); the door, the
    runtime and the cluster are stopped on the way out, whatever happened."""
    from cluster.serving.runtime import start_serving

    cluster, nodes = _cluster(workers, env["temp_dir"])
    try:
        config = _config(cluster.address, env["cache_dir"], Path(env["checkpoint"]), **overrides)
        runtime = start_serving(config)
        door = Door(runtime.handle, config)
        try:
            yield Serving(cluster, nodes, config, runtime, door)
        finally:
            door.close()
            runtime.stop()
    finally:
        cluster.shutdown()


def _replica_actors(app_name: str) -> list:
    import ray

    return [ray.get_actor(a["name"], namespace=a["namespace"]) for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith(f"SERVE_REPLICA::{app_name}#")]


class Streams:
    """`n` greedy streams of `max_tokens` each, read on threads; records tokens, status, timing."""

    def __init__(self, stub, prompts: list[list[int]], max_tokens: int, timeout_s: float = 120.0) -> None:
        from gptoss.v1 import inference_pb2 as pb

        self.results: list[dict] = [{"tokens": [], "status": None} for _ in prompts]
        self.threads = []
        for i, prompt in enumerate(prompts):
            request = pb.GenerateRequest(prompt_token_ids=prompt,
                                         sampling=pb.SamplingParams(max_tokens=max_tokens, ignore_stop=True))
            thread = threading.Thread(target=self._run, args=(stub, request, timeout_s, self.results[i]), daemon=True)
            thread.start()
            self.threads.append(thread)

    @staticmethod
    def _run(stub, request, timeout_s, result) -> None:
        import grpc

        try:
            for response in stub.Generate(request, timeout=timeout_s):
                if response.HasField("chunk"):
                    result["tokens"].extend(response.chunk.token_ids)
            result["status"] = "OK"
        except grpc.RpcError as err:
            result["status"] = err.code().name
            result["error"] = err

    def wait_tokens(self, n: int, timeout_s: float = 60.0) -> None:
        end = time.monotonic() + timeout_s
        while any(len(r["tokens"]) < n and r["status"] is None for r in self.results) and time.monotonic() < end:
            time.sleep(0.005)

    def join(self, timeout_s: float) -> None:
        end = time.monotonic() + timeout_s
        for thread in self.threads:
            thread.join(max(0.0, end - time.monotonic()))


def _undisturbed(env: dict, streams: "Streams", prompts: list[list[int]], max_tokens: int) -> list[bool]:
    """Per stream: its tokens are exactly the plain greedy run's on the same checkpoint."""
    import torch

    from cluster.model.checkpoint import load_model
    from cluster.model.generate import greedy

    model = load_model(Path(env["checkpoint"]))
    torch.set_num_threads(1)
    return [r["tokens"] == greedy(model, p, max_tokens) for r, p in zip(streams.results, prompts)]


def _counts(results: list[dict], migrated: float) -> dict:
    failed: dict[str, int] = {}
    for r in results:
        if r["status"] not in (None, "OK"):
            failed[r["status"]] = failed.get(r["status"], 0) + 1
    return {"sent": len(results), "completed": sum(r["status"] == "OK" for r in results), "migrated": int(migrated),
            "failed": failed, "hung": sum(r["status"] is None for r in results)}


def _prompts(n: int, seed: int) -> list[list[int]]:
    import random

    rng = random.Random(seed)
    return [[rng.randrange(1000, 100_000) for _ in range(8 + i)] for i in range(n)]


def lose_replica_mid_stream(env: dict, how: str) -> dict:
    """2 replicas on 2 nodes, 4 greedy streams; once each has tokens, one replica's actor is killed
    (how="actor") or its whole node removed (how="node"). Every stream completes with exactly the
    undisturbed greedy tokens."""
    import ray

    with _serving(env, 2, **{"serving.replicas": 2}) as s:
        prompts, max_tokens = _prompts(4, 3), 160
        streams = Streams(s.door.stub, prompts, max_tokens)
        streams.wait_tokens(8)
        started = time.monotonic()
        victim = _replica_actors(s.config.serving.app_name)[0]
        if how == "actor":
            ray.kill(victim, no_restart=True)
        else:  # the replica on the first worker node goes with it (its raylet and workers die)
            s.cluster.remove_node(s.nodes[0], allow_graceful=False)
        streams.join(120)
        recovered_s = time.monotonic() - started
        equal = _undisturbed(env, streams, prompts, max_tokens)
        row = _counts(streams.results, sum(s.door.migrations().values()))
        row.update(scenario=f"lose a replica mid-stream ({how})", recover_s=round(recovered_s, 2),
                   checks={"every stream equals the undisturbed greedy run": all(equal),
                           "0 hung": row["hung"] == 0,
                           "all completed": row["completed"] == row["sent"]},
                   migrations=s.door.migrations())
    return row


def no_replica_routable(env: dict) -> dict:
    """1 replica on the only worker node; the node is removed. Health turns NOT_SERVING, a request
    without a deadline is answered UNAVAILABLE with RetryInfo after frontdoor.replica_wait_s, and
    once a node is back, health is SERVING and requests succeed."""
    import grpc

    from gptoss.v1 import inference_pb2 as pb
    from tests.frontdoor.status_details import details, retry_delay_s

    with _serving(env, 1) as s:
        before = s.door.health()
        s.cluster.remove_node(s.nodes[0], allow_graceful=False)
        lost = time.monotonic()
        while s.door.health() != "NOT_SERVING" and time.monotonic() - lost < 60:
            time.sleep(0.1)
        degraded_after_s = time.monotonic() - lost
        request = pb.GenerateRequest(prompt_token_ids=[1000, 2000, 3000], sampling=pb.SamplingParams(max_tokens=4))
        results = [{"tokens": [], "status": None} for _ in range(4)]
        calls = [threading.Thread(target=Streams._run, args=(s.door.stub, request, None, r), daemon=True)
                 for r in results]
        asked = time.monotonic()
        for call in calls:
            call.start()
        for call in calls:
            call.join(REPLICA_WAIT_S + 20)
        answered_s = time.monotonic() - asked
        errors = [r.get("error") for r in results if r.get("error") is not None]
        with_retry = all(retry_delay_s(e) > 0 and details(e)["ErrorInfo"].reason == "NO_REPLICA" for e in errors)
        row = _counts(results, 0)
        s.cluster.add_node(num_cpus=1)
        back = time.monotonic()
        while s.door.health() != "SERVING" and time.monotonic() - back < 120:
            time.sleep(0.2)
        recovered_s = time.monotonic() - back
        ok_after = list(s.door.stub.Generate(request, timeout=60))[-1].HasField("complete")
        row.update(scenario="no replica routable (node lost)", recover_s=round(recovered_s, 2),
                   checks={"health SERVING before": before == "SERVING",
                           "health NOT_SERVING within 15 s": degraded_after_s < 15,
                           "every request UNAVAILABLE": row["failed"].get("UNAVAILABLE", 0) == len(results),
                           f"answered within replica_wait_s + 5 s ({answered_s:.1f} s)":
                               answered_s < REPLICA_WAIT_S + 5,
                           "RetryInfo + NO_REPLICA on each": bool(errors) and with_retry,
                           "0 hung": row["hung"] == 0,
                           "SERVING and answering once a node is back": ok_after})
    return row


def unplaceable_start(env: dict, sigterm: bool) -> dict:
    """`serve --address` of an expert-parallel app whose bundles no node can hold: serve exits
    non-zero naming what it asked for and what the cluster has (or, on SIGTERM during the wait,
    exits), and leaves no Serve app and no placement group behind."""
    import signal
    import subprocess

    import ray
    from ray import serve

    os.environ["RAY_SERVE_SLOW_STARTUP_WARNING_S"] = "1"  # the controller reports unplaced replicas sooner
    os.environ["RAY_SERVE_SLOW_STARTUP_WARNING_PERIOD_S"] = "1"
    cluster, _ = _cluster(1, env["temp_dir"])
    try:
        config_file = Path(env["temp_dir"]) / "serve.yaml"
        config_file.write_text(f"model: {{path: {env['checkpoint']}, preset: ''}}\n"
                               f"cache_dir: {env['cache_dir']}\n"
                               "serving: {num_cpus: 4, placement_timeout_s: 2}\n"
                               "parallel: {ep_size: 2, placement_strategy: PACK}\n"
                               "frontdoor: {grpc_port: 0, metrics_port: -1}\n")
        started = time.monotonic()
        serve_cli = subprocess.Popen([sys.executable, "-m", "cluster", "serve", "--config", str(config_file),
                                      "--address", cluster.address], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        if sigterm:
            ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
            while "gptoss" not in serve.status().applications and time.monotonic() - started < 60:
                time.sleep(0.2)
            serve_cli.send_signal(signal.SIGTERM)
        try:
            out, err = serve_cli.communicate(timeout=120)
            code = serve_cli.returncode
        except subprocess.TimeoutExpired:
            serve_cli.kill()
            out, err = serve_cli.communicate()
            code = None
        took_s = time.monotonic() - started
        if not ray.is_initialized():
            ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
        end = time.monotonic() + 30
        while time.monotonic() < end:
            apps = serve.status().applications
            groups = [g for g in ray.util.placement_group_table().values() if g["state"] != "REMOVED"]
            if "gptoss" not in apps and not groups:
                break
            time.sleep(0.5)
        name = "SIGTERM during placement wait" if sigterm else "unplaceable expert-parallel group"
        checks = {"exited": code is not None, "no app left": "gptoss" not in apps,
                  f"no placement group left ({len(groups)})": not groups}
        if not sigterm:
            checks.update({"exit code 1": code == 1,
                           "names what a replica asks for and what the cluster has":
                               "asks for {CPU 4} + {CPU 4}" in err and "the cluster has" in err})
        row = {"scenario": name, "sent": 0, "completed": 0, "migrated": 0, "failed": {}, "hung": int(code is None),
               "recover_s": round(took_s, 2), "checks": checks, "stderr": err[-600:]}
        ray.shutdown()
    finally:
        cluster.shutdown()
    return row


class RefusalFloor:
    """A bare grpc.aio server that refuses every Generate call at once with the same status and
    details the front door sends (no admission, no routing): what answering a refusal costs
    Python gRPC on this machine, for a ratio measured in the same run."""

    def __init__(self) -> None:
        import asyncio

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="refusal-floor", daemon=True)
        self.thread.start()
        self.port = asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(30)

    async def _start(self) -> int:
        import grpc

        from cluster.engine.errors import EngineOverloadedError
        from cluster.frontdoor.errors import status_for
        from gptoss.v1 import inference_pb2 as pb

        async def generate(request, context):
            status = status_for(EngineOverloadedError(12, 12, 1.0), request_id="floor")
            await context.abort_with_status(status.to_status())
            yield  # an async generator, as the front door's stream handler is

        handler = grpc.method_handlers_generic_handler("gptoss.v1.Inference", {"Generate": grpc.unary_stream_rpc_method_handler(
            generate, request_deserializer=pb.GenerateRequest.FromString)})
        self.server = grpc.aio.server()
        self.server.add_generic_rpc_handlers((handler,))
        port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        return port

    def close(self) -> None:
        import asyncio

        asyncio.run_coroutine_threadsafe(self.server.stop(None), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def _burst(target: str, n: int, max_tokens: int) -> list[dict]:
    """n Generate calls at once from a client process of its own (burst_client.py); a call with no
    line never ended."""
    import subprocess

    client = subprocess.run([sys.executable, "-m", "tests.faults.burst_client", target, str(n), str(max_tokens)],
                            capture_output=True, text=True, timeout=150)
    results = [json.loads(line) for line in client.stdout.splitlines() if line.startswith("{")]
    return results + [{"status": None}] * (n - len(results))


def _percentiles_ms(seconds: list[float]) -> dict[str, float]:
    ordered = sorted(seconds) or [0.0]
    return {"p50": round(ordered[len(ordered) // 2] * 1000, 1),
            "p99": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000, 1)}


def _dispatched(app_name: str, paths: tuple[str, ...] = ("direct", "engine_client", "serve_handle")) -> float:
    """Generate streams the front door's router has sent to a replica of `app_name` by `paths`
    (by default either path; a re-route after a replica's own refusal is not a new request)."""
    from cluster.metrics import router_metrics

    return sum(s.value for m in router_metrics().streams_total.collect() for s in m.samples
               if s.name.endswith("_total") and s.labels["application"] == app_name and s.labels["path"] in paths)


def _wait_direct_path(door: Door, app_name: str) -> None:
    """Wait until a Generate takes the replica's direct stream: the front door's channel to it is
    connected (until then calls go through the Serve handle). One 1-token call per look."""
    from gptoss.v1 import inference_pb2 as pb

    probe = pb.GenerateRequest(prompt_token_ids=[1000, 2000, 3000], sampling=pb.SamplingParams(max_tokens=1))

    def took_direct_path() -> bool:
        before = _dispatched(app_name, ("direct",))
        list(door.stub.Generate(probe, timeout=30))
        return _dispatched(app_name, ("direct",)) > before

    wait_until(took_direct_path, timeout=30, interval=0.1, message="a call on the replica's direct stream")


def burst_ten_times_capacity(env: dict) -> dict:
    """1 replica holding 12 streams (batch 4 + queue 8) gets 120 at once: exactly 12 are accepted
    and complete; every refusal is RESOURCE_EXHAUSTED with RetryInfo, ErrorInfo and RequestInfo,
    decided by the front door (only the 12 accepted were ever sent to the replica). The refusals'
    latency is set against a bare grpc.aio server refusing the same burst in the same run."""
    from cluster.serving.runtime import start_serving

    capacity, burst = 12, 120
    cluster, _ = _cluster(1, env["temp_dir"])
    try:
        config = _config(cluster.address, env["cache_dir"], Path(env["checkpoint"]), **{
            "engine.max_num_seqs": 4, "engine.max_waiting_requests": 8, "engine.max_num_batched_tokens": 64})
        runtime = start_serving(config)
        door = Door(runtime.handle, config)
        floor = RefusalFloor()
        try:
            floor_latencies = [r["took_s"] for r in _burst(f"127.0.0.1:{floor.port}", burst, 64)]
            _wait_direct_path(door, config.serving.app_name)
            dispatched = _dispatched(config.serving.app_name)
            started = time.monotonic()
            results = _burst(door.door.target, burst, 64)
            took_s = time.monotonic() - started
            dispatched = _dispatched(config.serving.app_name) - dispatched
            refused = [r for r in results if r["status"] == "RESOURCE_EXHAUSTED"]
            complete_details = all(r["details"].get("RetryInfo", 0) > 0 and r["details"].get("ErrorInfo")
                                   == "MODEL_OVERLOADED" and r["details"].get("RequestInfo") for r in refused)
            ours, bare = _percentiles_ms([r["took_s"] for r in refused]), _percentiles_ms(floor_latencies)
            row = _counts(results, 0)
            row.update(scenario="burst of 10x capacity", recover_s=round(took_s, 2), refusal_ms=ours,
                       bare_grpc_refusal_ms=bare, sent_to_replica=dispatched,
                       p99_over_bare_grpc=round(ours["p99"] / max(bare["p99"], 0.1), 2),
                       checks={f"exactly capacity ({capacity}) accepted, got {row['completed']}":
                                   row["completed"] == capacity,
                               "every other refused RESOURCE_EXHAUSTED": len(refused) == burst - capacity,
                               "each refusal with RetryInfo + ErrorInfo + RequestInfo": complete_details,
                               f"refused before dispatch: {dispatched:g} sent to the replica, {capacity} accepted":
                                   dispatched == capacity,
                               "0 hung": row["hung"] == 0})
        finally:
            floor.close()
            door.close()
            runtime.stop()
    finally:
        cluster.shutdown()
    return row


def replicas_spread(env: dict) -> dict:
    """3 replicas that ask for no CPU (the embedded default) on a cluster of 3 worker nodes, with
    serving.max_replicas_per_node 1: each lands on a node of its own (read from the Serve
    controller's replica details), so losing one node loses one replica, and all three serve."""
    import ray

    from cluster.serving.runtime import start_serving

    cluster, _ = _cluster(3, env["temp_dir"])
    try:
        config = _config(cluster.address, env["cache_dir"], Path(env["checkpoint"]), **{
            "serving.replicas": 3, "serving.num_cpus": 0.0, "serving.max_replicas_per_node": 1,
            "serving.placement_timeout_s": 200.0})  # three replicas starting at once on a loaded box
        started = time.monotonic()
        runtime = start_serving(config)
        placed_s = time.monotonic() - started
        door = Door(runtime.handle, config)
        try:
            controller = ray.get_actor("SERVE_CONTROLLER_ACTOR", namespace="serve")
            details = ray.get(controller.get_serve_instance_details.remote(), timeout=30)
            replicas = details["applications"][config.serving.app_name]["deployments"]["ModelReplica"]["replicas"]
            nodes = [r["node_id"] for r in replicas if r["state"] == "RUNNING"]
            streams = Streams(door.stub, _prompts(6, 5), 16)
            streams.join(120)
            row = _counts(streams.results, 0)
            row.update(scenario="3 replicas, max 1 per node", recover_s=round(placed_s, 2), replica_nodes=nodes,
                       checks={"3 replicas running": len(nodes) == 3,
                               f"each on a node of its own ({len(set(nodes))} nodes)": len(set(nodes)) == 3,
                               "every request completed": row["completed"] == row["sent"], "0 hung": row["hung"] == 0})
        finally:
            door.close()
            runtime.stop()
    finally:
        cluster.shutdown()
    return row


def drain_with_streams(env: dict) -> dict:
    """4 streams in flight when the front door drains with the default grace (as on SIGTERM): new
    calls are refused UNAVAILABLE (DRAINING), every stream in flight completes, then it stops."""
    from cluster.config import FrontdoorConfig
    from gptoss.v1 import inference_pb2 as pb

    with _serving(env, 1, **{"frontdoor.grace_period_s": FrontdoorConfig().grace_period_s}) as s:
        streams = Streams(s.door.stub, _prompts(4, 9), 240)
        streams.wait_tokens(4)
        started = time.monotonic()
        s.door.server_stopped = True
        stopping = threading.Thread(target=s.door.door.call, args=(s.door.door.server.stop(), 200), daemon=True)
        stopping.start()
        while not s.door.door.server.draining:
            time.sleep(0.01)
        refused = {"tokens": [], "status": None}
        Streams._run(s.door.stub, pb.GenerateRequest(prompt_token_ids=[5, 6, 7]), 10, refused)
        streams.join(150)
        stopping.join(150)
        drained_s = time.monotonic() - started
        row = _counts(streams.results, 0)
        row.update(scenario="drain with the default grace", recover_s=round(drained_s, 2),
                   checks={"every stream in flight completed": row["completed"] == row["sent"],
                           "all 240 tokens each": all(len(r["tokens"]) == 240 for r in streams.results),
                           "a new call during the drain: UNAVAILABLE": refused["status"] == "UNAVAILABLE",
                           "stopped once drained": not stopping.is_alive(), "0 hung": row["hung"] == 0})
    return row


def expert_rank_killed(env: dict) -> dict:
    """One expert-parallel replica of 2 ranks spread over 2 of 3 nodes (placement SPREAD): the
    ranks talk over gloo, not shared memory, although the nodes share this host. One rank's
    process is killed mid-stream: the group fails, Serve replaces the replica (on the nodes left),
    and the streams resume on it with exactly the undisturbed greedy tokens."""
    import signal

    with _serving(env, 3, **{
            "parallel.ep_size": 2, "parallel.placement_strategy": "SPREAD", "frontdoor.replica_wait_s": 90.0}) as s:
        prompts, max_tokens = _prompts(2, 5), 120
        streams = Streams(s.door.stub, prompts, max_tokens, timeout_s=240)
        streams.wait_tokens(6)
        shm_bytes = s.runtime.handle.expert_shm_bytes.remote().result(timeout_s=30)
        (worker_pid,) = s.runtime.handle.expert_worker_pids.remote().result(timeout_s=30)
        started = time.monotonic()
        os.kill(worker_pid, signal.SIGKILL)
        streams.join(240)
        recovered_s = time.monotonic() - started
        equal = _undisturbed(env, streams, prompts, max_tokens)
        row = _counts(streams.results, sum(s.door.migrations().values()))
        row.update(scenario="expert-parallel rank killed (2 nodes)", recover_s=round(recovered_s, 2),
                   checks={f"ranks on gloo, no shared memory across nodes ({shm_bytes})":
                               len(shm_bytes) == 2 and not any(shm_bytes),
                           "every stream equals the undisturbed greedy run": all(equal),
                           "all completed": row["completed"] == row["sent"], "0 hung": row["hung"] == 0},
                   migrations=s.door.migrations())
    return row


def controller_killed(env: dict) -> dict:
    """The Serve controller is killed (Ray restarts it) while 3 streams run: they complete with
    the undisturbed greedy tokens, and the front door keeps routing new requests meanwhile."""
    import ray

    from gptoss.v1 import inference_pb2 as pb

    with _serving(env, 1) as s:
        prompts, max_tokens = _prompts(3, 11), 200
        streams = Streams(s.door.stub, prompts, max_tokens)
        streams.wait_tokens(4)
        started = time.monotonic()
        from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

        ray.kill(ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE), no_restart=False)
        during = [{"tokens": [], "status": None} for _ in range(3)]
        for result in during:  # new requests while the controller restarts
            Streams._run(s.door.stub, pb.GenerateRequest(prompt_token_ids=[4000, 5000], sampling=pb.SamplingParams(
                max_tokens=8, ignore_stop=True)), 60, result)
        streams.join(120)
        recovered_s = time.monotonic() - started
        equal = _undisturbed(env, streams, prompts, max_tokens)
        row = _counts(streams.results + during, sum(s.door.migrations().values()))
        row.update(scenario="Serve controller killed", recover_s=round(recovered_s, 2),
                   checks={"streams in flight equal the undisturbed greedy run": all(equal),
                           "new requests answered while it restarts": all(r["status"] == "OK" for r in during),
                           "none migrated (the replica lived)": row["migrated"] == 0,
                           "0 hung": row["hung"] == 0})
    return row


class RedisServer:
    """A redis-server of the scenario's own (the Debian package) on a free loopback port, with its
    own directory and no persistence to disk: the GCS's external storage. Stopped by its pid."""

    def __init__(self, directory: Path) -> None:
        import subprocess

        import redis

        from cluster.sockets import free_port

        self.port = free_port()
        directory.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(directory),
             "--save", "", "--appendonly", "no", "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client, end = redis.Redis(host="127.0.0.1", port=self.port), time.monotonic() + 30
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if self.process.poll() is not None or time.monotonic() > end:
                    self.close()
                    raise RuntimeError(f"redis-server did not start on port {self.port}") from None
                time.sleep(0.1)
        client.close()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def close(self) -> None:
        import subprocess

        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)


@contextlib.contextmanager
def _gcs_fault_tolerance(temp_dir: str, reconnect_timeout_s: float):
    """Ray processes started inside keep the GCS's state in a Redis of their own (RAY_REDIS_ADDRESS,
    in a namespace of this cluster's: what KubeRay's gcsFaultToleranceOptions sets on the head), and
    wait up to `reconnect_timeout_s` for a GCS that went away (what KubeRay sets on workers, and the
    chart on front doors, RAY_gcs_rpc_server_reconnect_timeout_s)."""
    redis_server = RedisServer(Path(temp_dir) / "redis")
    settings = {"RAY_REDIS_ADDRESS": redis_server.address,
                "RAY_external_storage_namespace": f"gptoss-faults-{os.getpid()}",
                "RAY_gcs_rpc_server_reconnect_timeout_s": str(int(reconnect_timeout_s))}
    before = {name: os.environ.get(name) for name in settings}
    os.environ.update(settings)
    try:
        yield redis_server
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        redis_server.close()  # after the cluster: its shutdown deletes the cluster's keys


HEAD_OUTAGE_S = 35.0  # longer than the ~30 s after which the front door used to give up on Ray
SPANNING_TOKENS = 600  # the streams started just before the GCS restart


def _replica_details(app_name: str, timeout_s: float) -> dict[str, dict]:
    """The Serve controller's running replicas of `app_name`: replica id -> {pid, node_id}."""
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    details = ray.get(controller.get_serve_instance_details.remote(), timeout=timeout_s)
    replicas = details["applications"][app_name]["deployments"]["ModelReplica"]["replicas"]
    return {r["replica_id"]: {"pid": r["pid"], "node_id": r["node_id"]} for r in replicas if r["state"] == "RUNNING"}


def head_restart(env: dict) -> dict:
    """GCS fault tolerance: the head's GCS keeps its state in Redis. A replica on a worker node,
    3 greedy streams. Mid-stream the head's GCS and the Serve controller (which lives on the head)
    are killed; for HEAD_OUTAGE_S the cluster has no control plane while new requests keep coming;
    2 more streams start just before the GCS restarts on the same Redis (and restarts the
    controller). Every stream completes with the undisturbed greedy tokens; each request of the
    outage completes or fails at once with UNAVAILABLE + RetryInfo; the front door stays SERVING
    and does not give up on the cluster (watch_ray with the default ray.gcs_reconnect_timeout_s);
    afterwards the controller knows the same replicas and new requests succeed. recover_s: from
    the GCS's restart until the controller answers again with the replica."""
    import asyncio
    import signal

    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    from cluster.cli.frontdoor import watch_ray
    from cluster.config import RayConfig
    from gptoss.v1 import inference_pb2 as pb
    from tests.frontdoor.status_details import retry_delay_s

    with _gcs_fault_tolerance(env["temp_dir"], reconnect_timeout_s=4 * HEAD_OUTAGE_S), \
            _serving(env, 1) as s:
        app = s.config.serving.app_name
        replicas_before = _replica_details(app, 30)
        controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
        controller_pid = ray.get(controller.__ray_call__.remote(lambda _: os.getpid()), timeout=30)
        gave_up = asyncio.Event()  # the front door pod's watchdog, run on the door's loop
        watchdog = asyncio.run_coroutine_threadsafe(watch_ray(gave_up, RayConfig().gcs_reconnect_timeout_s),
                                                    s.door.door.loop)
        prompts, max_tokens = _prompts(3, 13), 240
        streams = Streams(s.door.stub, prompts, max_tokens, timeout_s=240)
        streams.wait_tokens(4)

        killed = time.monotonic()
        s.cluster.head_node.kill_gcs_server()
        os.kill(controller_pid, signal.SIGKILL)
        at_kill = sum(r["status"] is None for r in streams.results)
        during: list[dict] = []
        health: list[str] = []
        short = pb.GenerateRequest(prompt_token_ids=[4000, 5000, 6000],
                                   sampling=pb.SamplingParams(max_tokens=8, ignore_stop=True))
        while time.monotonic() - killed < HEAD_OUTAGE_S - 3:
            health.append(s.door.health())
            result = {"tokens": [], "status": None}
            asked = time.monotonic()
            Streams._run(s.door.stub, short, 30, result)
            result["took_s"] = time.monotonic() - asked
            during.append(result)
            time.sleep(1.0)
        time.sleep(max(0.0, killed + HEAD_OUTAGE_S - time.monotonic()))
        # streams that are running when the GCS comes back: started once the outage has lasted its
        # time, not before the wait (on an idle box 600 tokens took less than that wait)
        spanning_prompts = _prompts(2, 17)
        spanning = Streams(s.door.stub, spanning_prompts, SPANNING_TOKENS, timeout_s=240)
        spanning.wait_tokens(2, timeout_s=10)
        health.append(s.door.health())
        spanned = sum(r["status"] is None for r in spanning.results)
        s.cluster.head_node.start_gcs_server()
        restarted = time.monotonic()
        replicas_after: dict = {}
        while time.monotonic() - restarted < 180:
            try:
                replicas_after = _replica_details(app, 10)
                if len(replicas_after) == len(replicas_before):
                    break
            except Exception:  # noqa: BLE001 - the GCS or the controller is still coming back
                pass
            time.sleep(1.0)
        recovered_s = time.monotonic() - restarted
        after = [{"tokens": [], "status": None} for _ in range(3)]
        for result in after:
            Streams._run(s.door.stub, short, 60, result)
        streams.join(240)
        spanning.join(240)
        lost = gave_up.is_set()
        watchdog.cancel()
        equal = _undisturbed(env, streams, prompts, max_tokens) + _undisturbed(env, spanning, spanning_prompts, SPANNING_TOKENS)
        refused = [r for r in during if r["status"] not in ("OK", None)]
        refused_properly = all(r["status"] == "UNAVAILABLE" and retry_delay_s(r["error"]) > 0 and r["took_s"] < 5
                               for r in refused)
        row = _counts(streams.results + spanning.results + during + after, sum(s.door.migrations().values()))
        row.update(scenario="head restart (GCS FT, Redis)", recover_s=round(recovered_s, 2),
                   outage_s=HEAD_OUTAGE_S, during_outage={"sent": len(during),
                                                         "ok": sum(r["status"] == "OK" for r in during)},
                   checks={"streams in flight at the kill and across the restart equal the undisturbed greedy run":
                               all(equal),
                           f"{at_kill} of 3 streams were running when the GCS was killed": at_kill == 3,
                           f"{spanned} of 2 streams were still running when the GCS restarted": spanned == 2,
                           "requests during the outage: OK, or UNAVAILABLE + RetryInfo within 5 s": refused_properly,
                           f"health SERVING throughout the outage ({sorted(set(health))})": set(health) == {"SERVING"},
                           "the front door did not give up on the cluster": not lost,
                           "the restarted controller knows the same replicas (ids, pids)":
                               replicas_after == replicas_before,
                           "new requests after the restart complete": all(r["status"] == "OK" for r in after),
                           "none migrated (the replicas lived)": row["migrated"] == 0,
                           "0 hung": row["hung"] == 0},
                   migrations=s.door.migrations())
    return row


SCENARIOS = {
    "controller_killed": controller_killed,
    "head_restart": head_restart,
    "ep_rank_killed": expert_rank_killed,
    "burst": burst_ten_times_capacity,
    "spread": replicas_spread,
    "drain": drain_with_streams,
    "replica_killed": lambda env: lose_replica_mid_stream(env, "actor"),
    "node_lost": lambda env: lose_replica_mid_stream(env, "node"),
    "no_replica": no_replica_routable,
    "unplaceable": lambda env: unplaceable_start(env, sigterm=False),
    "sigterm_start": lambda env: unplaceable_start(env, sigterm=True),
}


def main() -> None:
    name, checkpoint, cache_dir = sys.argv[1:4]
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    with tempfile.TemporaryDirectory(prefix="gf") as temp_dir:
        row = SCENARIOS[name]({"checkpoint": checkpoint, "cache_dir": cache_dir, "temp_dir": temp_dir})
    row.pop("error", None)
    print("RESULT " + json.dumps(row, default=str), flush=True)


if __name__ == "__main__":
    main()
