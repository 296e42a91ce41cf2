"""`gptoss-cluster serve` as a user runs it: a subprocess with its own cache and Ray temp dir,
answering the CLI client, and leaving no process behind after SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import pytest

from gptoss.v1 import inference_pb2 as pb
from gptoss.v1.inference_pb2_grpc import InferenceStub

from cluster.bench.processes import alive
from cluster.procfs import descendants, process_table
from cluster.sockets import free_port


def start_serve(env, grpc_port: int, metrics_port: int, *args: str,
                new_session: bool = False) -> tuple[subprocess.Popen, str]:
    """`python -m cluster serve` with `args`; returns the process and its readiness banner (the lines
    before it stay in `serve.seen`). new_session: in a process group of its own, as `timeout` runs it."""
    serve = subprocess.Popen(
        [sys.executable, "-m", "cluster", "serve", "--grpc-port", str(grpc_port), "--metrics-port", str(metrics_port),
         "--http-port", "0", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=new_session)
    banner, seen = None, []
    serve.seen = seen
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        line = serve.stdout.readline()
        if not line:
            break
        seen.append(line)
        if line.startswith("gptoss-cluster: serving"):
            banner = line
            break
    assert banner is not None, "serve never became ready:\n" + "".join(seen)
    assert f"gRPC 127.0.0.1:{grpc_port}" in banner and f":{metrics_port}/metrics" in banner
    assert "| HTTP http://127.0.0.1:" in banner
    return serve, banner


def stop_serve_and_check_nothing_left(serve: subprocess.Popen, short_tmp: Path) -> None:
    """SIGTERM: serve exits 0 and every process it started (Ray's included) is gone."""
    started = descendants(serve.pid)
    serve.send_signal(signal.SIGTERM)
    output, _ = serve.communicate(timeout=90)
    assert serve.returncode == 0, output
    assert "gptoss-cluster: stopped" in output
    deadline = time.monotonic() + 15  # processes that got their signal may take a moment to go
    while alive(started) and time.monotonic() < deadline:
        time.sleep(0.2)
    leftovers = {pid: process_table().get(pid, (0, "?"))[1][:120] for pid in alive(started)}
    assert not leftovers, f"processes left behind: {leftovers}"
    assert not [c for _, c in process_table().values() if str(short_tmp) in c and "raylet" in c]


def run_serve(env, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    args = args if "--http-port" in args else ("--http-port", "0", *args)  # never the fixed default port
    return subprocess.run([sys.executable, "-m", "cluster", "serve", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


def cli_generate(env, grpc_port: int) -> list[str]:
    generate = subprocess.run(
        [sys.executable, "-m", "cluster", "generate", "--tokens", "1,2,3", "--max-tokens", "4",
         "--target", f"127.0.0.1:{grpc_port}"], capture_output=True, text=True, env=env, timeout=60)
    assert generate.returncode == 0, generate.stderr
    return generate.stdout.split()


@pytest.mark.slow
def test_serve_answers_chat_and_exits_cleanly_on_sigterm(tmp_path, short_tmp):
    grpc_port, metrics_port = free_port(), free_port()
    env = dict(os.environ, GPTOSS_CACHE_DIR=str(tmp_path / "cache"), GPTOSS_RAY_TEMP_DIR=str(short_tmp),
               GPTOSS_RAY_NUM_CPUS="2")
    # The random tiny preset: this test reads its unparsed output and exact lengths (the trained
    # default, gpt-oss-tiny, goes through the stack in tests/tiny/test_trained_e2e.py).
    serve, banner = start_serve(env, grpc_port, metrics_port, "--preset", "tiny")
    try:
        # the tiny checkpoint was built into the private cache
        assert list((tmp_path / "cache" / "checkpoints").glob("tiny-*/config.json"))

        started = descendants(serve.pid)
        ray_processes = {pid for pid in started if str(short_tmp) in process_table().get(pid, (0, ""))[1]}
        assert ray_processes, "expected the local Ray's processes (raylet, gcs_server) under the temp dir"

        chat = subprocess.run(
            [sys.executable, "-m", "cluster", "chat", "Say hi", "--target", f"127.0.0.1:{grpc_port}",
             "--max-tokens", "12", "--reasoning", "low"],
            capture_output=True, text=True, env=env, timeout=120)
        assert chat.returncode == 0, chat.stderr
        assert "raw output" in chat.stdout  # random weights: unparsed text, clearly marked
        assert len(chat.stdout.strip().splitlines()) >= 2
        assert "completion 12 tokens" in chat.stderr

        assert len(cli_generate(env, grpc_port)) == 4

        # A second cluster on the same gRPC port is refused before it starts anything.
        second = run_serve(env, "--grpc-port", str(grpc_port), "--metrics-port", str(free_port()))
        assert second.returncode == 1
        assert second.stderr.strip() == (f"gptoss-cluster serve: cannot listen on 127.0.0.1:{grpc_port} "
                                         "(frontdoor.grpc_port): address already in use; choose another port "
                                         "with --grpc-port")
        assert len(cli_generate(env, grpc_port)) == 4

        # The OpenAI-compatible HTTP API of the same process, through the official SDK, on the real
        # tiny model (random weights: raw text as content, no reasoning).
        import openai

        http_url = banner.split("| HTTP ")[1].split()[0]
        with openai.OpenAI(base_url=http_url + "/v1", api_key="unused", max_retries=0) as client:
            model = client.models.list().data[0].id
            assert model == "gpt-oss-tiny"
            completion = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Say hi"}],
                                                        max_completion_tokens=12, reasoning_effort="low")
            assert completion.usage.completion_tokens == 12 and completion.choices[0].finish_reason == "length"
            assert completion.choices[0].message.content
        stop_serve_and_check_nothing_left(serve, short_tmp)
    finally:
        if serve.poll() is None:
            serve.kill()
            serve.wait(30)


@pytest.mark.slow
def test_serve_with_ep_size_2_answers_and_exits_cleanly_on_sigterm(tmp_path, short_tmp):
    """`serve --ep-size 2` on a CPU box: the replica and one expert worker process form a gloo group;
    the CLI client gets its tokens, /metrics shows the expert load, SIGTERM takes the worker down too."""
    grpc_port, metrics_port = free_port(), free_port()
    env = dict(os.environ, GPTOSS_CACHE_DIR=str(tmp_path / "cache"), GPTOSS_RAY_TEMP_DIR=str(short_tmp),
               GPTOSS_RAY_NUM_CPUS="2", GPTOSS_FRONTDOOR_LOAD_POLL_INTERVAL_S="0.5",
               GPTOSS_ENGINE_DEFAULT_MAX_TOKENS="48")
    serve, _ = start_serve(env, grpc_port, metrics_port, "--ep-size", "2", "--preset", "tiny")
    try:
        workers = [pid for pid in descendants(serve.pid) if "ExpertWorker" in process_table().get(pid, (0, ""))[1]]
        assert len(workers) == 1, "one expert worker (rank 1) beside the replica (rank 0)"

        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            info = InferenceStub(channel).GetModelInfo(pb.GetModelInfoRequest(), timeout=30)
        assert (info.parallel.expert_parallel_size, info.parallel.tensor_parallel_size) == (2, 2)
        assert info.default_max_tokens == 48  # as configured, not 0

        assert len(cli_generate(env, grpc_port)) == 4
        # 3 prompt + 3 fed-back tokens through the tiny model's top-4 routing: 24 per layer
        deadline = time.monotonic() + 15
        while True:
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
                page = response.read().decode()
            routed = sum(float(line.rsplit(" ", 1)[1]) for line in page.splitlines()
                         if line.startswith("gptoss_expert_tokens_total{") and 'layer="0"' in line)
            if routed == 24 or time.monotonic() > deadline:
                break
            time.sleep(0.25)
        assert routed == 24, page
        assert "gptoss_expert_imbalance_ratio{" in page

        stop_serve_and_check_nothing_left(serve, short_tmp)
        assert not alive(workers)
    finally:
        if serve.poll() is None:
            serve.kill()
            serve.wait(30)


def test_serve_rejects_an_invalid_config_naming_the_field(tmp_path):
    env = dict(os.environ, GPTOSS_CACHE_DIR=str(tmp_path))
    result = subprocess.run([sys.executable, "-m", "cluster", "serve", "--replicas", "0"],
                            capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 2
    assert "config: serving.replicas must be >= 1, got 0" in result.stderr


# ── start-up errors: one line naming what to change, exit 1, nothing left running ──

NOISE = ("Traceback", "Token authentication is enabled", "graceful_shutdown failed", "Controller failed to shut down",
         "Event loop is closed", "never awaited", "Errno")


@pytest.mark.parametrize("which", ["grpc", "metrics"])
def test_a_port_in_use_fails_the_start_at_once_naming_port_and_flag(tmp_path, which):
    """Checked before Ray starts. The holder listens with SO_REUSEPORT, as grpcio does by default."""
    with socket.socket() as held:
        held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        held.bind(("127.0.0.1", 0))
        held.listen()
        taken = held.getsockname()[1]
        ports = {"grpc": free_port(), "metrics": free_port(), which: taken}
        started = time.monotonic()
        result = run_serve(dict(os.environ, GPTOSS_CACHE_DIR=str(tmp_path)), "--grpc-port", str(ports["grpc"]),
                           "--metrics-port", str(ports["metrics"]))
    assert result.returncode == 1
    assert result.stderr.strip() == (f"gptoss-cluster serve: cannot listen on 127.0.0.1:{taken} "
                                     f"(frontdoor.{which}_port): address already in use; choose another port with "
                                     f"--{which}-port")
    assert time.monotonic() - started < 30  # no Ray start (that alone takes 20 s and more here)


def test_a_missing_or_broken_checkpoint_fails_before_ray_starts(tmp_path):
    from cluster.model.config import GptOssConfig

    env = dict(os.environ, GPTOSS_CACHE_DIR=str(tmp_path / "cache"))
    missing = run_serve(env, "--model", str(tmp_path / "nonexistent"))
    assert missing.returncode == 1
    assert missing.stderr.strip() == (f"gptoss-cluster serve: checkpoint {tmp_path / 'nonexistent'} (--model) cannot "
                                      f"be served: {tmp_path / 'nonexistent'}: no such checkpoint directory")

    config_only = tmp_path / "config-only"  # a config.json, but no weights
    config_only.mkdir()
    (config_only / "config.json").write_text(json.dumps(GptOssConfig.from_preset("tiny").to_hf_dict()))
    broken = run_serve(env, "--model", str(config_only))
    assert broken.returncode == 1
    assert broken.stderr.strip().endswith(f"{config_only}: no .safetensors files")
    assert not any(noise in broken.stdout + broken.stderr for noise in NOISE)


@pytest.mark.slow
def test_a_failing_replica_shows_its_own_error_and_leaves_nothing_running(tmp_path, short_tmp):
    """engine.kind vllm without vLLM installed: the replica's constructor raises; the terminal shows
    that exception in one line instead of Serve's "Deploying application gptoss failed" traceback."""
    try:
        import vllm  # noqa: F401
        pytest.skip("vllm is installed here: its engine would start")
    except ImportError:
        pass
    env = dict(os.environ, GPTOSS_CACHE_DIR=str(tmp_path / "cache"), GPTOSS_RAY_TEMP_DIR=str(short_tmp),
               GPTOSS_RAY_NUM_CPUS="2", GPTOSS_ENGINE_KIND="vllm")
    result = run_serve(env, "--grpc-port", str(free_port()), "--metrics-port", str(free_port()), timeout=240)
    assert result.returncode == 1
    assert result.stderr.strip() == ("gptoss-cluster serve: the model replicas failed to start: "
                                     "ModelReplica: ModuleNotFoundError: No module named 'vllm'")
    assert not any(noise in result.stdout + result.stderr for noise in NOISE)
    deadline = time.monotonic() + 15
    while [c for _, c in process_table().values() if str(short_tmp) in c] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [c for _, c in process_table().values() if str(short_tmp) in c], "Ray processes left behind"


# Ray's driver hanging in its disconnect, which a signal to the whole group caused now and then
# (the GCS ending during it): it cannot be caused on purpose, so a sitecustomize makes the driver's
# ray.shutdown() hang (a test double for that hang; Ray's workers are left alone).
HANGING_RAY_SHUTDOWN = """
import ray, ray._private.worker as worker, time
_shutdown = worker.shutdown
def shutdown(*args, **kwargs):
    if worker.global_worker.mode == worker.SCRIPT_MODE:
        time.sleep(300)
    return _shutdown(*args, **kwargs)
worker.shutdown = ray.shutdown = shutdown
"""


def sigterm_the_group(env) -> tuple[subprocess.Popen, str, float]:
    """Start serve in a process group of its own and SIGTERM the whole group once it serves; returns
    the ended process, its output after the banner and the seconds from the signal to its exit.
    Every process serve started must be gone 15 s later."""
    serve, _ = start_serve(env, free_port(), free_port(), new_session=True)
    try:
        started = descendants(serve.pid)
        sent = time.monotonic()
        os.killpg(serve.pid, signal.SIGTERM)
        output, _ = serve.communicate(timeout=90)
        took = time.monotonic() - sent
        deadline = time.monotonic() + 15
        while alive(started) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not alive(started), output
        return serve, output, took
    finally:
        if serve.poll() is None:
            os.killpg(serve.pid, signal.SIGKILL)
            serve.wait(30)


@pytest.mark.slow
def test_a_stop_stuck_in_rays_disconnect_still_ends_soon_after_the_drain(tmp_path, short_tmp):
    from cluster.cli.serve import STUCK_STOP_S

    grace_s = 2.0
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(HANGING_RAY_SHUTDOWN)
    env = dict(os.environ, GPTOSS_CACHE_DIR=str(tmp_path / "cache"), GPTOSS_RAY_TEMP_DIR=str(short_tmp),
               GPTOSS_RAY_NUM_CPUS="2", GPTOSS_FRONTDOOR_GRACE_PERIOD_S=str(grace_s),
               PYTHONPATH=os.pathsep.join((str(site), os.environ["PYTHONPATH"])))
    serve, output, took = sigterm_the_group(env)
    assert serve.returncode == 0, output
    assert grace_s + STUCK_STOP_S - 1 < took < grace_s + STUCK_STOP_S + 10, f"took {took:.1f} s"
    assert "disconnect did not end" in output and "gptoss-cluster: stopped" in output, output


@pytest.mark.slow
def test_sigterm_to_the_process_group_stops_quietly_within_the_drain_time(tmp_path, short_tmp):
    """What `timeout`, systemd and Kubernetes do: every process of the group (Ray's too) gets SIGTERM."""
    grace_s = 2.0
    env = dict(os.environ, GPTOSS_CACHE_DIR=str(tmp_path / "cache"), GPTOSS_RAY_TEMP_DIR=str(short_tmp),
               GPTOSS_RAY_NUM_CPUS="2", GPTOSS_FRONTDOOR_GRACE_PERIOD_S=str(grace_s))
    serve, output, took = sigterm_the_group(env)
    assert serve.returncode == 0, output
    assert took < grace_s + 10, f"took {took:.1f} s"
    everything = "".join(serve.seen) + output
    assert "gptoss-cluster: stopped" in output
    assert not [line for line in everything.splitlines() if any(noise in line for noise in NOISE)], everything
