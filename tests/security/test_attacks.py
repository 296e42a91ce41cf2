"""The attack tier: try to get in, on real local clusters, without the credential each door asks for.

Ray's control plane: a Ray head started the way the chart starts it (RAY_AUTH_MODE=token, the
dashboard and the Ray client port on), in a temp dir of its own on loopback ports of its own:
the dashboard/jobs API, a job submission (Ray's own `ray job submit`), the GCS and the client
port, each without the token, are refused - and each is live (with the token it answers).
The front door and the replicas' direct streams: the session's Ray with an echo-engine app
behind a front door with API keys and tenant limits (tests/security/secure_app.py)."""

from __future__ import annotations

import json
import os
import pickle
import secrets
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest

from cluster.engine.request import GenerateRequest, SamplingParams
from cluster.serving.direct_stream import METHOD, TOKEN_HEADER, DirectAddress
from cluster.serving.serve_internals import request_router
from cluster.sockets import free_port
from gptoss.v1 import admin_pb2
from gptoss.v1 import inference_pb2 as pb
from tests.frontdoor.status_details import details, retry_delay_s
from tests.security.secure_app import SecureApp, bearer
from tests.waiting import holds

pytestmark = pytest.mark.slow


class RayHead:
    """`ray start --head --block` with token auth, its own temp dir, HOME and ports; stop() ends
    exactly the processes it started (its own process group)."""

    def __init__(self, tmp: Path) -> None:
        self.token = secrets.token_hex(24)
        (gcs, dashboard, client, agent_http, agent_grpc, metrics, runtime_env, node_manager,
         object_manager) = (free_port() for _ in range(9))
        self.gcs, self.dashboard, self.client = gcs, dashboard, client
        self.home = tmp / "home"
        self.home.mkdir()
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
        # Loopback only (Ray's single-machine mode), a token of our own, no ~/.ray of anybody's.
        env.update(HOME=str(self.home), RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token,
                   RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0")
        temp_dir = Path(f"/tmp/gta{os.getpid()}")  # Ray's socket paths must stay short
        self.temp_dir = temp_dir
        self.process = subprocess.Popen(
            [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", "--num-cpus", "1",
             "--port", str(gcs), "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
             "--dashboard-port", str(dashboard), "--ray-client-server-port", str(client),
             "--dashboard-agent-listen-port", str(agent_http), "--dashboard-agent-grpc-port", str(agent_grpc),
             "--metrics-export-port", str(metrics), "--runtime-env-agent-port", str(runtime_env),
             "--node-manager-port", str(node_manager), "--object-manager-port", str(object_manager),
             "--temp-dir", str(temp_dir), "--disable-usage-stats"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError("ray start failed:\n" + self.process.stdout.read())
            if self._dashboard_status("/api/version", self.token) == 200:
                return
            time.sleep(1)
        self.stop()
        raise AssertionError("the Ray head's dashboard never answered")

    def _dashboard_status(self, path: str, token: str | None, data: bytes | None = None) -> int:
        request = urllib.request.Request(f"http://127.0.0.1:{self.dashboard}{path}", data=data,
                                         method="POST" if data is not None else "GET")
        if token is not None:
            request.add_header("Authorization", f"Bearer {token}")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status
        except urllib.error.HTTPError as err:
            return err.code
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return 0

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        import shutil

        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    head = RayHead(tmp_path_factory.mktemp("rayhead"))
    yield head
    head.stop()


# ─────────────────────────────────────── Ray's control plane ───────────────────────────────────────

def test_dashboard_and_jobs_api_refuse_a_caller_without_the_token(ray_head):
    assert ray_head._dashboard_status("/api/jobs/", None) == 401
    assert ray_head._dashboard_status("/api/jobs/", "not-the-token-" + "x" * 20) == 403
    assert ray_head._dashboard_status("/api/jobs/", ray_head.token) == 200  # live: the token opens it
    marker = ray_head.home / "pwned"
    job = json.dumps({"entrypoint": f"touch {marker}"}).encode()
    assert ray_head._dashboard_status("/api/jobs/", None, job) == 401
    assert ray_head._dashboard_status("/api/jobs/", "not-the-token-" + "x" * 20, job) == 403
    holds(lambda: not marker.exists(), 2, message="a refused job ran")  # the time a job would take to start


def test_ray_job_submit_without_the_token_fails(ray_head, tmp_path):
    marker = ray_head.home / "pwned-by-cli"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env.update(HOME=str(tmp_path))  # no ~/.ray/auth_token to fall back on
    result = subprocess.run(
        [sys.executable, "-m", "ray.scripts.scripts", "job", "submit", "--address",
         f"http://127.0.0.1:{ray_head.dashboard}", "--no-wait", "--", "touch", str(marker)],
        env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0, result.stdout + result.stderr
    assert "401" in result.stdout + result.stderr or "nauthorized" in result.stdout + result.stderr
    holds(lambda: not marker.exists(), 2, message="a refused job ran")  # the time a job would take to start


@pytest.mark.parametrize("port_name,method", [
    ("gcs", "/ray.rpc.NodeInfoGcsService/GetAllNodeInfo"),
    ("client", "/ray.rpc.RayletDriver/ClusterInfo"),
])
def test_gcs_and_client_port_refuse_a_caller_without_the_token(ray_head, port_name, method):
    with grpc.insecure_channel(f"127.0.0.1:{getattr(ray_head, port_name)}") as channel:
        call = channel.unary_unary(method)
        for metadata in ((), (("authorization", "Bearer not-the-token-0123456789abcdef"),)):
            with pytest.raises(grpc.RpcError) as refused:
                call(b"", timeout=20, metadata=metadata)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED, refused.value
        # Live: with the token the same call gets past authentication.
        try:
            call(b"", timeout=20, metadata=(("authorization", f"Bearer {ray_head.token}"),))
        except grpc.RpcError as err:
            assert err.code() != grpc.StatusCode.UNAUTHENTICATED, err


# ───────────────────────────────────── the front door ─────────────────────────────────────

TENANTS_YAML = """
tenants:
  acme: {tokens_per_min: 600, token_burst: 60}
"""
ECHO_TOKENS_PER_S = 400.0


@pytest.fixture(scope="module")
def app(ray_serving, serving_config, tmp_path_factory):
    app = SecureApp(serving_config, tmp_path_factory.mktemp("attack"), "attack-echo", TENANTS_YAML,
                    **{"engine.echo_tokens_per_s": ECHO_TOKENS_PER_S})
    yield app
    app.close()


def _generate(app, tenant: str, n: int) -> list:
    return list(app.stub.Generate(pb.GenerateRequest(prompt_token_ids=[101, 102, 103],
                                                     sampling=pb.SamplingParams(max_tokens=n)),
                                  timeout=60, metadata=bearer(tenant)))


def test_front_door_without_a_key_is_unauthenticated(app):
    for metadata in ((), (("authorization", "Bearer guessed-key-0123456789"),)):
        with pytest.raises(grpc.RpcError) as refused:
            list(app.stub.Generate(pb.GenerateRequest(prompt_token_ids=[1, 2]), timeout=10, metadata=metadata))
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_a_tenant_calling_admin_is_permission_denied(app):
    with pytest.raises(grpc.RpcError) as refused:
        app.admin.Drain(admin_pb2.DrainRequest(timeout_s=0.1), timeout=10, metadata=bearer("acme"))
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert details(refused.value)["ErrorInfo"].reason == "ADMIN_REQUIRED"
    assert not app.door.server.draining


def _stream_seconds(app, tenant: str, n: int) -> float:
    start = time.perf_counter()
    responses = _generate(app, tenant, n)
    assert responses[-1].complete.usage.completion_tokens == n
    return time.perf_counter() - start


def test_a_tenant_over_its_budget_is_refused_while_another_is_served_at_full_speed(app):
    n = 200  # 0.5 s of echo at 400 tokens/s
    baseline = min(_stream_seconds(app, "globex", n) for _ in range(3))
    _generate(app, "acme", 100)  # 3 + 100 tokens against a burst of 60: acme is in debt
    refusals, stop = [], threading.Event()

    def hammer():  # acme keeps trying while globex streams
        while not stop.is_set():
            try:
                _generate(app, "acme", 4)
            except grpc.RpcError as err:
                refusals.append(err)

    hammers = [threading.Thread(target=hammer) for _ in range(4)]
    for t in hammers:
        t.start()
    try:
        during = [_stream_seconds(app, "globex", n) for _ in range(3)]
    finally:
        stop.set()
        for t in hammers:
            t.join(30)
    assert refusals
    for err in refusals:
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    found = details(refusals[0])
    assert found["QuotaFailure"].violations[0].subject == "tenant:acme/tokens"
    assert "600 tokens per minute" in found["QuotaFailure"].violations[0].description
    assert 0 < retry_delay_s(refusals[0]) <= 60
    # globex at full speed: its streams take as long as they did alone (noise allowance on a shared box).
    assert min(during) <= baseline * 1.5 + 0.1, (baseline, during)
    assert n / min(during) >= 0.5 * ECHO_TOKENS_PER_S, (baseline, during)


# ───────────────────────────────────── the direct streams ─────────────────────────────────────

def _replica_target(app) -> DirectAddress:
    _generate(app, "globex", 2)  # the router exists once a request went through it
    router = request_router(app.door.server._loop_handle)
    targets = [DirectAddress.from_metadata(r.replica_metadata) for r in router.curr_replicas.values()]
    targets = [t for t in targets if t is not None]
    assert targets, "the replica publishes no direct stream"
    return targets[0]


def _direct_call(channel, token: str | None):
    request = pickle.dumps(GenerateRequest(prompt_token_ids=(5, 6, 7), sampling=SamplingParams(max_tokens=2)))
    metadata = ((TOKEN_HEADER, token),) if token is not None else ()
    return list(channel.unary_stream(METHOD)(request, timeout=20, metadata=metadata))


def test_direct_stream_refuses_without_the_token_or_without_tls(app):
    target = _replica_target(app)
    assert target.trust_pem, "direct streams are TLS by default"
    credentials = grpc.ssl_channel_credentials(root_certificates=target.trust_pem.encode())
    with grpc.secure_channel(target.address, credentials) as channel:
        for token in (None, "not-the-replica-token"):
            with pytest.raises(grpc.RpcError) as refused:
                _direct_call(channel, token)
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert len(_direct_call(channel, target.token)) == 2  # live: TLS and the token get an answer
    with grpc.insecure_channel(target.address) as channel:  # the right token, but no TLS
        with pytest.raises(grpc.RpcError) as refused:
            _direct_call(channel, target.token)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
