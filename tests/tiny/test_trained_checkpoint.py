"""The packaged gpt-oss-tiny: rebuilt deterministically with its checksums checked, loaded by
transformers' GptOssForCausalLM with the same greedy tokens as our engine, and answering in harmony."""

from __future__ import annotations

import json
import shutil

import openai_harmony as oh
import pytest
import torch

from cluster.harmony import CALL_ID, RETURN_ID, Message, ToolDefinition, load_tokenizer, render_prompt
from cluster.model.checkpoint import CheckpointError, describe_checkpoint
from cluster.model.generate import greedy
from cluster.model.trained import ARTIFACTS, build_trained_checkpoint, file_sha256, read_artifact, artifact_sha256

STOPS = (RETURN_ID, CALL_ID)
WEATHER = ToolDefinition("get_weather", "Current weather in a city.", {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]})


def parse(tokens):
    return load_tokenizer()._encoding.parse_messages_from_completion_tokens(tokens, oh.Role.ASSISTANT)


def test_artifact_is_compact_and_the_rebuild_is_the_recorded_checkpoint(trained_checkpoint, tmp_path):
    artifact = ARTIFACTS["gpt-oss-tiny"]
    assert artifact.stat().st_size < 20 << 20
    _, tensors, metadata = read_artifact(artifact, artifact_sha256("gpt-oss-tiny"))
    assert 0 < tensors["vocab_ids"].numel() < 5000  # only the curriculum's rows
    again = build_trained_checkpoint("gpt-oss-tiny", tmp_path / "again")
    for name, sha in metadata["checkpoint_sha256"].items():
        assert file_sha256(again / name) == file_sha256(trained_checkpoint / name) == sha
    info = describe_checkpoint(trained_checkpoint)
    assert info["layout"] == "hf" and info["mxfp4_layers"] == list(range(info["config"].num_hidden_layers))
    assert info["config"].vocab_size == 201088


def test_the_artifact_is_written_in_one_byte_order_whatever_the_metadata_order(tmp_path):
    """safetensors writes metadata in hash order, which differs between processes; the packaged
    artifact is already in the canonical order its writer uses, so a rerun of training writes the same bytes."""
    import subprocess
    import sys

    from safetensors import safe_open

    from cluster.model.trained import _save_canonical

    packaged = safe_open(str(ARTIFACTS["gpt-oss-tiny"]), "pt")
    tensors = {k: packaged.get_tensor(k) for k in packaged.keys()}
    metadata = packaged.metadata()
    _save_canonical(tensors, tmp_path / "a.safetensors", metadata)
    _save_canonical(tensors, tmp_path / "b.safetensors", dict(reversed(list(metadata.items()))))
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    assert file_sha256(tmp_path / "a.safetensors") == artifact_sha256("gpt-oss-tiny")
    # and in another process, with another hash seed
    script = ("import sys; from pathlib import Path; from safetensors import safe_open; "
              "from cluster.model.trained import _save_canonical, ARTIFACTS; "
              "f = safe_open(str(ARTIFACTS['gpt-oss-tiny']), 'pt'); "
              "_save_canonical({k: f.get_tensor(k) for k in f.keys()}, Path(sys.argv[1]), f.metadata())")
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "c.safetensors")], check=True, timeout=120)
    assert (tmp_path / "c.safetensors").read_bytes() == (tmp_path / "a.safetensors").read_bytes()


def test_a_corrupt_artifact_is_refused_naming_the_file(tmp_path):
    bad = tmp_path / "gpt-oss-tiny.safetensors"
    shutil.copy(ARTIFACTS["gpt-oss-tiny"], bad)
    shutil.copy(f"{ARTIFACTS['gpt-oss-tiny']}.sha256", f"{bad}.sha256")
    data = bytearray(bad.read_bytes())
    data[-100] ^= 0xFF
    bad.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"gpt-oss-tiny\.safetensors: sha256 is .* expected"):
        build_trained_checkpoint("gpt-oss-tiny", tmp_path / "out", artifact=bad)
    assert not (tmp_path / "out" / "config.json").exists()


def _hf_greedy(path, ids: list[int], new_tokens: int) -> list[int]:
    transformers = pytest.importorskip("transformers")
    model = transformers.GptOssForCausalLM.from_pretrained(
        path, dtype=torch.float32, quantization_config=transformers.Mxfp4Config(dequantize=True)).eval()
    x = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new_tokens, do_sample=False,
                             eos_token_id=list(STOPS), pad_token_id=0)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("messages,tools,call", [
    ([Message("user", "Repeat after me: hello world")], [], False),
    ([Message("user", "What is the capital of Japan?")], [], False),
    ([Message("user", "What is the weather in Paris?")], [WEATHER], True),
], ids=["repeat", "fact", "tool-call"])
def test_transformers_gives_our_greedy_tokens_and_a_harmony_turn(trained_checkpoint, trained_model, messages,
                                                                   tools, call):
    ids = render_prompt(messages, reasoning_effort="low", tools=tools)
    ours = greedy(trained_model, ids, 80, stop_token_ids=STOPS)
    assert _hf_greedy(trained_checkpoint, ids, 80) == ours
    parsed = parse(ours)
    assert [m.channel for m in parsed] == ["analysis", "commentary" if call else "final"]
    assert ours[-1] == (CALL_ID if call else RETURN_ID)
    if call:
        assert parsed[-1].recipient == "functions.get_weather"
        assert set(json.loads(parsed[-1].content[0].text)) == {"city"}
