"""llama.cpp as `bench roofline`'s peer: why it cannot run, said before anything is measured; and,
where a llama.cpp Python and source tree are set up (GPTOSS_LLAMA_CPP_PYTHON, GPTOSS_LLAMA_CPP_SRC),
the converter's GGUF and a whole bench run with the peer's tokens/s and the ratio."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest

from cluster.bench import peer_llama_cpp
from cluster.cli import build_parser

LLAMA_CPP_PYTHON = os.environ.get("GPTOSS_LLAMA_CPP_PYTHON")
LLAMA_CPP_SRC = os.environ.get("GPTOSS_LLAMA_CPP_SRC")


def _args(*extra: str):
    return build_parser().parse_args(["bench", "roofline", *extra])


def test_the_peer_is_opt_in_and_named():
    args = _args()
    assert args.peer is None and args.llama_cpp_python == sys.executable
    assert _args("--peer", "llama-cpp").peer == "llama-cpp"
    with pytest.raises(SystemExit):
        _args("--peer", "vllm")


def test_no_gguf_and_no_converter_is_said(tmp_path):
    assert "give --llama-cpp-src DIR" in peer_llama_cpp.unavailable(_args("--peer", "llama-cpp"))
    reason = peer_llama_cpp.unavailable(_args("--peer", "llama-cpp", "--llama-cpp-src", str(tmp_path)))
    assert reason == f"--llama-cpp-src {tmp_path} has no convert_hf_to_gguf.py"
    missing = tmp_path / "model.gguf"
    reason = peer_llama_cpp.unavailable(_args("--peer", "llama-cpp", "--peer-gguf", str(missing)))
    assert reason == f"--peer-gguf {missing} is not a file"


def test_a_python_without_llama_cpp_is_said(tmp_path):
    (tmp_path / "model.gguf").write_bytes(b"")
    python = tmp_path / "python"
    python.write_text("#!/bin/sh\necho \"ModuleNotFoundError: No module named 'llama_cpp'\" >&2\nexit 1\n")
    python.chmod(python.stat().st_mode | stat.S_IXUSR)
    args = _args("--peer", "llama-cpp", "--peer-gguf", str(tmp_path / "model.gguf"), "--llama-cpp-python", str(python))
    assert peer_llama_cpp.unavailable(args) == (
        f"{python} cannot import llama_cpp (ModuleNotFoundError: No module named 'llama_cpp'); "
        "give --llama-cpp-python, a Python with llama-cpp-python")
    args.llama_cpp_python = str(tmp_path / "absent")
    assert peer_llama_cpp.unavailable(args).startswith(f"--llama-cpp-python {tmp_path / 'absent'} does not run")


needs_llama_cpp = pytest.mark.skipif(
    not (LLAMA_CPP_PYTHON and LLAMA_CPP_SRC),
    reason="no llama.cpp set up: GPTOSS_LLAMA_CPP_PYTHON (a Python with llama-cpp-python) and GPTOSS_LLAMA_CPP_SRC "
           "(the llama.cpp source tree it was built from) name none")


def _peer_flags() -> list[str]:
    return ["--peer", "llama-cpp", "--llama-cpp-python", LLAMA_CPP_PYTHON, "--llama-cpp-src", LLAMA_CPP_SRC]


@pytest.mark.slow
@needs_llama_cpp
def test_the_converter_keeps_the_experts_mxfp4(tmp_path):
    from cluster.model.checkpoint import write_checkpoint
    from cluster.model.config import GptOssConfig

    assert peer_llama_cpp.unavailable(_args(*_peer_flags())) is None
    checkpoint = write_checkpoint(GptOssConfig.from_preset("tiny"), tmp_path / "ckpt", seed=0, mxfp4=True)
    gguf = peer_llama_cpp.convert(LLAMA_CPP_PYTHON, LLAMA_CPP_SRC, str(checkpoint), str(tmp_path), "bf16")
    read_types = ("import json, sys; sys.path.insert(0, sys.argv[2]); import gguf; "
                  "print(json.dumps({t.name: t.tensor_type.name for t in gguf.GGUFReader(sys.argv[1]).tensors}))")
    done = subprocess.run([LLAMA_CPP_PYTHON, "-c", read_types, str(gguf), os.path.join(LLAMA_CPP_SRC, "gguf-py")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    types = json.loads(done.stdout)
    layers = GptOssConfig.from_preset("tiny").num_hidden_layers
    for i in range(layers):
        for part in ("gate", "up", "down"):
            assert types[f"blk.{i}.ffn_{part}_exps.weight"] == "MXFP4"
        assert types[f"blk.{i}.attn_q.weight"] == "BF16"
    assert types["output.weight"] == "BF16"


@pytest.mark.slow
@needs_llama_cpp
def test_roofline_runs_the_peer_and_reports_the_ratio(tmp_path):
    out = tmp_path / "roofline.json"
    done = subprocess.run(
        [sys.executable, "-m", "cluster", "bench", "roofline", "--preset", "tiny", "--layers", "1", "--runs", "2",
         "--probe-mb", "16", "--batch", "2", "--context", "8", "--new-tokens", "2", "--threads", "1",
         "--json", str(out), *_peer_flags()],
        capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "llama.cpp peer: converting" in done.stdout and "ratio_vs_llama_cpp" in done.stdout
    summary = json.loads(out.read_text())
    peer = summary["peer"]
    assert (peer["name"], peer["threads"], peer["context"], peer["steps"]) == ("llama-cpp", 1, 8, 3)  # --runs + 1
    assert peer["tokens_per_s"] > 0 and abs(peer["step_ms"] - 1e3 / peer["tokens_per_s"]) < 1e-6
    assert peer["mean_tokens_per_s"] <= peer["tokens_per_s"]
    assert summary["ratio_vs_llama_cpp"] == summary["rows"][0]["tokens_per_s"] / peer["tokens_per_s"]


@pytest.mark.slow
@needs_llama_cpp
def test_a_peer_that_fails_to_load_is_said_and_ours_is_reported(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"not a gguf")
    out = tmp_path / "roofline.json"
    done = subprocess.run(
        [sys.executable, "-m", "cluster", "bench", "roofline", "--preset", "tiny-small-vocab", "--layers", "1",
         "--runs", "1", "--probe-mb", "16", "--batch", "2", "--context", "4", "--new-tokens", "2", "--threads", "1",
         "--json", str(out), "--peer", "llama-cpp", "--llama-cpp-python", LLAMA_CPP_PYTHON, "--peer-gguf", str(bad)],
        capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    failed = [line for line in done.stdout.splitlines() if line.startswith("llama.cpp peer failed: ")]
    assert len(failed) == 1 and "llama.cpp decode exited" in failed[0], done.stdout
    summary = json.loads(out.read_text())
    assert summary["peer"]["unavailable"] == failed[0].removeprefix("llama.cpp peer failed: ")
    assert "ratio_vs_llama_cpp" not in summary and summary["rows"][0]["tokens_per_s"] > 0
