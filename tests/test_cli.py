import os
import subprocess
import sys


def test_cli_help_lists_commands():
    out = subprocess.run([sys.executable, "-m", "cluster", "--help"], capture_output=True, text=True, check=True)
    assert "usage: gptoss-cluster" in out.stdout


def test_serve_and_frontdoor_take_the_same_listening_flags_into_the_same_config():
    from cluster.cli import build_parser
    from cluster.cli.frontdoor import FLAG_PATHS as FRONTDOOR_PATHS
    from cluster.cli.frontdoor_flags import config_from_flags
    from cluster.cli.serve import FLAG_PATHS as SERVE_PATHS

    flags = ["--grpc-port", "50123", "--http-port", "-1", "--metrics-port", "9555", "--host", "0.0.0.0",
             "--address", "auto", "--log-level", "info"]
    configs = [config_from_flags(build_parser().parse_args([command, *flags]), command, paths)
               for command, paths in (("serve", SERVE_PATHS), ("frontdoor", FRONTDOOR_PATHS))]
    for config in configs:
        door = config.frontdoor
        assert (door.grpc_port, door.http_port, door.metrics_port, door.host) == (50123, -1, 9555, "0.0.0.0")
        assert (config.ray.address, config.log_level) == ("auto", "info")


def test_a_bad_flag_value_is_refused_naming_its_config_key(capsys):
    from cluster.cli import main

    assert main(["frontdoor", "--grpc-port", "70000", "--address", "auto"]) == 2
    assert "frontdoor.grpc_port" in capsys.readouterr().err


def test_benchmarks_sharing_a_flag_keep_their_own_defaults_and_read_lengths_alike(capsys):
    import pytest

    from cluster.bench.workload import IntRange
    from cluster.cli import build_parser

    parser = build_parser()
    overhead = parser.parse_args(["bench", "overhead"])
    vllm = parser.parse_args(["bench", "vllm-serving", "--prompt-len", "32:64"])
    serving = parser.parse_args(["bench", "serving", "--target", "127.0.0.1:1"])
    assert (overhead.concurrency, overhead.rounds, overhead.startup_timeout, overhead.c1_requests) == (64, 3, 240.0, 60)
    assert (vllm.concurrency, vllm.rounds, vllm.startup_timeout, vllm.c1_requests) == (32, 1, 600.0, 60)
    assert (overhead.prompt_len, overhead.output_len, vllm.output_len, serving.prompt_len) == ("16", "32:128", "128", "128")
    assert IntRange.parse(vllm.prompt_len, "--prompt-len") == IntRange(32, 64)  # vllm-serving takes ranges too
    helps = {}
    for command in ("overhead", "vllm-serving"):
        with pytest.raises(SystemExit):
            parser.parse_args(["bench", command, "--help"])
        helps[command] = " ".join(capsys.readouterr().out.split())
    assert "seconds to wait for the servers, started together (default 240)" in helps["overhead"]
    assert "seconds to wait for each server (default 600)" in helps["vllm-serving"]


def test_the_front_door_commands_slow_serves_router_metrics_before_serve_reads_them():
    """`serve` and `frontdoor` set RAY_SERVE_METRICS_EXPORT_INTERVAL_MS (cli/frontdoor_process.py) first
    thing; it only works if importing the command has not imported ray.serve yet, and unless the
    operator set it."""
    script = """
import os, sys
import cluster.cli.serve, cluster.cli.frontdoor
assert not any(name.startswith("ray.serve") for name in sys.modules), "a command imports ray.serve at import"
cluster.cli.serve.set_serve_process_defaults()
from ray.serve._private import router
print(router.RAY_SERVE_METRICS_EXPORT_INTERVAL_MS)
"""
    env = {k: v for k, v in os.environ.items() if k != "RAY_SERVE_METRICS_EXPORT_INTERVAL_MS"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1000"]
    env["RAY_SERVE_METRICS_EXPORT_INTERVAL_MS"] = "250"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert out.stdout.split() == ["250"], out.stderr
