"""`gptoss-cluster serve` as a user runs it: a subprocess with its own cache and Ray temp dir,
answering the CLI client, and leaving no process behind after SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import pytest

from gptoss.v1 import inference_pb2 as pb
from gptoss.v1.inference_pb2_grpc import InferenceStub

from cluster.sockets import free_port

pytestmark = pytest.mark.slow


def process_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) for every process, read from /proc."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        table[int(entry.name)] = (ppid, cmdline)
    return table


def descendants(root: int) -> set[int]:
    table = process_table()
    found, frontier = set(), {root}
    while frontier:
        children = {pid for pid, (ppid, _) in table.items() if ppid in frontier} - found
        found |= children
        frontier = children
    return found


def alive(pids) -> set[int]:
    table = process_table()
    return {pid for pid in pids if pid in table}


def start_serve(env, grpc_port: int, metrics_port: int, *args: str) -> tuple[subprocess.Popen, str]:
    """`python -m cluster serve` with `args`; returns the process and its readiness banner."""
    serve = subprocess.Popen(
        [sys.executable, "-m", "cluster", "serve", "--grpc-port", str(grpc_port), "--metrics-port", str(metrics_port),
         *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    banner, seen = None, []
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


def cli_generate(env, grpc_port: int) -> list[str]:
    generate = subprocess.run(
        [sys.executable, "-m", "cluster", "generate", "--tokens", "1,2,3", "--max-tokens", "4",
         "--target", f"127.0.0.1:{grpc_port}"], capture_output=True, text=True, env=env, timeout=60)
    assert generate.returncode == 0, generate.stderr
    return generate.stdout.split()


def test_serve_answers_chat_and_exits_cleanly_on_sigterm(tmp_path, short_tmp):
    grpc_port, metrics_port = free_port(), free_port()
    env = dict(os.environ, GPTOSS_CACHE_DIR=str(tmp_path / "cache"), GPTOSS_RAY_TEMP_DIR=str(short_tmp),
               GPTOSS_RAY_NUM_CPUS="2")
    serve, _ = start_serve(env, grpc_port, metrics_port)
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
        stop_serve_and_check_nothing_left(serve, short_tmp)
    finally:
        if serve.poll() is None:
            serve.kill()
            serve.wait(30)


def test_serve_with_ep_size_2_answers_and_exits_cleanly_on_sigterm(tmp_path, short_tmp):
    """`serve --ep-size 2` on a CPU box: the replica and one expert worker process form a gloo group;
    the CLI client gets its tokens, /metrics shows the expert load, SIGTERM takes the worker down too."""
    grpc_port, metrics_port = free_port(), free_port()
    env = dict(os.environ, GPTOSS_CACHE_DIR=str(tmp_path / "cache"), GPTOSS_RAY_TEMP_DIR=str(short_tmp),
               GPTOSS_RAY_NUM_CPUS="2", GPTOSS_FRONTDOOR_LOAD_POLL_INTERVAL_S="0.5",
               GPTOSS_ENGINE_DEFAULT_MAX_TOKENS="48")
    serve, _ = start_serve(env, grpc_port, metrics_port, "--ep-size", "2")
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
