"""`gptoss-cluster checkpoint make|info|presets` and `bench model --help`."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from cluster.cli import main
from cluster.model.checkpoint import load_model


def test_make_then_info(tmp_path, capsys):
    out = tmp_path / "ck"
    assert main(["checkpoint", "make", "--preset", "tiny", "--out", str(out), "--seed", "3", "--layout", "both",
                 "--vocab-size", "2048"]) == 0
    assert "wrote tiny" in capsys.readouterr().out
    model = load_model(out)
    assert model.config.vocab_size == 2048 and model.config.num_hidden_layers == 4
    assert (model.config.eos_token_id, model.config.pad_token_id) == (2047, 2046)  # moved inside the vocabulary

    assert main(["checkpoint", "info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "layout:             hf" in text and "MXFP4 in all 4 layers" in text
    assert f"{model.config.num_parameters():,} total" in text

    assert main(["checkpoint", "info", str(out / "original"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["layout"] == "original" and info["mxfp4_expert_layers"] == [0, 1, 2, 3]
    assert info["parameters"] == model.config.num_parameters()
    assert info["config"]["vocab_size"] == 2048


def test_make_unquantized_via_subprocess(tmp_path):
    out = tmp_path / "dense"
    cmd = [sys.executable, "-m", "cluster", "checkpoint"]
    subprocess.run(cmd + ["make", "--preset", "tiny-small-vocab", "--out", str(out), "--no-mxfp4"], check=True,
                   capture_output=True)
    info = subprocess.run(cmd + ["info", str(out), "--json"], check=True, capture_output=True, text=True)
    data = json.loads(info.stdout)
    assert data["mxfp4_tensors"] == 0 and data["mxfp4_expert_layers"] == []
    assert not load_model(out).blocks[0].mlp.packed


def test_presets_list(capsys):
    assert main(["checkpoint", "presets"]) == 0
    text = capsys.readouterr().out
    assert "116,829,156,672" in text and "20,914,757,184" in text and "tiny-small-vocab" in text


def test_bench_model_help():
    out = subprocess.run([sys.executable, "-m", "cluster", "bench", "model", "--help"], check=True,
                         capture_output=True, text=True)
    assert "transformers" in out.stdout


# Every kind of HF checkpoint `checkpoint make` writes (the original layout is not a transformers format).
CLI_CHECKPOINTS = [("tiny", None, True), ("tiny", 2048, True), ("tiny", 2048, False), ("tiny-vllm", None, False),
                   ("tiny-small-vocab", None, True), ("tiny-small-vocab", 512, False)]


@pytest.mark.parametrize("preset,vocab,mxfp4", CLI_CHECKPOINTS,
                         ids=[f"{p}-{v or 'preset'}-{'mxfp4' if m else 'bf16'}" for p, v, m in CLI_CHECKPOINTS])
def test_transformers_loads_every_checkpoint_the_cli_writes(tmp_path, preset, vocab, mxfp4):
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "ck"
    args = ["checkpoint", "make", "--preset", preset, "--out", str(out)]
    args += ["--vocab-size", str(vocab)] if vocab else []
    args += [] if mxfp4 else ["--no-mxfp4"]
    assert main(args) == 0
    kwargs = {"quantization_config": transformers.Mxfp4Config(dequantize=True)} if mxfp4 else {}
    theirs = transformers.GptOssForCausalLM.from_pretrained(out, dtype=torch.float32, **kwargs).eval()
    ours = load_model(out)
    ids = torch.randint(0, ours.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = theirs(ids).logits
    assert (ours(ids, ours.new_cache(12)) - expected).abs().max().item() < 1e-4
