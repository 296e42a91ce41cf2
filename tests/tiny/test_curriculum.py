"""The curriculum: seeded, rendered by openai-harmony into turns its parser accepts, with tool
arguments matching their schemas, effort ordering the analysis, and an eval set disjoint from training."""

from __future__ import annotations

import json
import math
import statistics

import openai_harmony as oh
import pytest

from cluster.harmony import CALL_ID, RETURN_ID, load_tokenizer
from cluster.tiny import curriculum
from cluster.tiny.evaluate import _key, eval_samples, matches_schema, score


def test_same_seed_same_samples_other_seed_other_samples():
    a, b = curriculum.generate(50, 7), curriculum.generate(50, 7)
    assert [_key(s) for s in a] == [_key(s) for s in b]
    assert [s.completion_ids() for s in a] == [s.completion_ids() for s in b]
    assert [_key(s) for s in curriculum.generate(50, 8)] != [_key(s) for s in a]


def test_every_completion_is_a_harmony_turn_the_parser_accepts_and_scores_exact():
    enc = load_tokenizer()._encoding
    samples = curriculum.generate(300, 3)
    assert {s.skill for s in samples} == set(curriculum.SKILLS)
    for s in samples:
        tokens = s.completion_ids()
        messages = enc.parse_messages_from_completion_tokens(tokens, oh.Role.ASSISTANT)
        assert messages[0].channel == "analysis"
        if s.call:
            assert tokens[-1] == CALL_ID and messages[-1].recipient == f"functions.{s.call[0]}"
            schema = {t.name: t.parameters for t in s.tools}[s.call[0]]
            assert matches_schema(json.loads(messages[-1].content[0].text), schema)
        else:
            assert tokens[-1] == RETURN_ID and messages[-1].channel == "final"
        assert score(s, tokens).exact  # the scorer accepts the curriculum's own answer


def test_a_wrong_answer_or_bad_arguments_score_as_such():
    s = next(x for x in curriculum.generate(200, 4) if x.call and x.call[0] == "get_weather")
    enc = load_tokenizer()._encoding
    good = s.completion_ids()
    wrong_city = enc.encode(enc.decode(good).replace(s.call[1]["city"], "Atlantis"), allowed_special="all")
    scored = score(s, wrong_city)
    assert scored.valid and scored.args_valid and not scored.exact
    bad_json = enc.encode(enc.decode(good).replace('{"city": ', '{"city" '), allowed_special="all")
    scored = score(s, bad_json)
    assert scored.args_valid is False and not scored.exact
    assert not score(s, good[:-1]).valid  # cut before <|call|>


def test_reasoning_effort_orders_the_analysis_length():
    enc = load_tokenizer()._encoding
    lengths = {e: [] for e in curriculum.EFFORTS}
    for s in curriculum.generate(300, 5):
        lengths[s.effort].append(len(enc.encode(s.reply[0].content, allowed_special=set())))
    means = [statistics.mean(lengths[e]) for e in curriculum.EFFORTS]
    assert means[0] < means[1] < means[2]


def test_eval_samples_never_occur_in_the_training_set():
    train = {_key(s) for s in curriculum.generate(2000, curriculum.TRAIN_SEED)}
    held_out = eval_samples(200, train_samples=2000)
    assert len(held_out) == 200 and not train & {_key(s) for s in held_out}
    development = {_key(s) for s in eval_samples(200, train_samples=2000, seed=curriculum.EVAL_SEED + 1)}
    assert not train & development
    assert len(development - {_key(s) for s in held_out}) > 150  # another draw, not the reported set


def test_eval_samples_leave_out_the_conversations_the_dwell_trained_on(monkeypatch):
    # Let the dwell draw the eval seed's own reversals and upper-casings: those must not be evaluated.
    monkeypatch.setattr(curriculum, "DWELL_SEED", curriculum.EVAL_SEED)
    dwell = {"reverse": 10, "upper": 10}
    dwelt = {_key(s) for s in curriculum.of_skills(dwell, curriculum.EVAL_SEED)}
    assert dwelt & {_key(s) for s in eval_samples(100, train_samples=500)}  # unless named, some are evaluated
    held_out = eval_samples(100, train_samples=500, dwell=dwell)
    assert len(held_out) == 100 and not dwelt & {_key(s) for s in held_out}


def test_the_dwell_adds_each_skills_share_of_its_data():
    from cluster.tiny.train import TrainSettings

    settings = TrainSettings(samples=1000, dwell_shares=(("reverse", 0.2), ("upper", 0.3)))
    # half the dwell's data is the curriculum's 1000 conversations, the other half these
    assert settings.dwell_samples == {"reverse": 400, "upper": 600}
    assert TrainSettings(dwell_steps=0).dwell_samples == {}


def test_training_targets_the_assistants_words_in_earlier_turns_but_not_an_earlier_finals_end():
    from cluster.harmony import END_ID
    from cluster.tiny.train import encode

    tokenizer = load_tokenizer()
    s = next(x for x in curriculum.generate(200, 6) if x.bare and len(x.messages) >= 3)
    (ids, trained), = encode([s])
    prompt_len = len(s.prompt_ids())
    assert trained[-(len(ids) - prompt_len):] == list(range(prompt_len, len(ids)))  # the whole reply
    earlier = [p for p in trained if p < prompt_len]
    answers = [m.content for m in s.messages if m.role == "assistant"]
    assert tokenizer.decode([ids[p] for p in earlier]) == "".join(answers)  # their words, nothing else
    assert all(ids[p] != END_ID for p in earlier)  # a final's <|end|> is the prompt's, <|return|> the model's


def test_drills_are_copying_chats_without_a_system_message():
    drills = [s for s in curriculum.generate(400, 2) if s.bare]
    assert 0.15 < len(drills) / 400 < 0.35
    for s in drills[:20]:
        prompt = load_tokenizer().decode(s.prompt_ids())
        assert prompt.startswith("<|start|>user<|message|>") and "<|start|>system" not in prompt
        assert s.skill in ("repeat", "reverse", "count", "upper")


def test_greetings_are_answered_with_what_the_model_can_do_and_never_call_a_tool():
    greetings = [s for s in curriculum.generate(3000, 4) if s.skill == "greet"]
    assert 0.01 < len(greetings) / 3000 < 0.06  # rare: one fixed answer needs little practice
    assert any(s.tools for s in greetings)  # tools declared and still no call
    for s in greetings:
        assert s.messages[-1].content in curriculum.GREETINGS
        assert s.call is None and s.final == curriculum.GREETING


def test_quantization_aware_training_shows_rounded_experts_and_trains_the_float_ones():
    import torch

    from cluster.model import mxfp4
    from cluster.model.config import GptOssConfig
    from cluster.model.transformer import GptOssModel
    from cluster.tiny.train import float_state, init_weights, round_experts_in_forward

    model = GptOssModel(GptOssConfig.from_preset("tiny-small-vocab"))
    init_weights(model, 0)
    before = float_state(model)
    round_experts_in_forward(model)
    mlp = model.blocks[0].mlp
    original = mlp.parametrizations.gate_up_weight.original
    assert torch.equal(mlp.gate_up_weight, mxfp4.unpack(*mxfp4.pack(original.detach()), original.dtype))
    assert not torch.equal(mlp.gate_up_weight, original)
    (mlp.gate_up_weight * 3).sum().backward()
    assert torch.equal(original.grad, torch.full_like(original, 3.0))  # straight through the rounding
    after = float_state(model)
    assert after.keys() == before.keys() and torch.equal(after["blocks.0.mlp.gate_up_weight"], original)


def test_a_short_run_ends_with_its_dwell_and_records_it_for_eval(tmp_path):
    import argparse

    from cluster.cli.tiny import _trained_on
    from cluster.tiny.train import TrainSettings, train

    settings = TrainSettings(samples=40, steps=3, dwell_steps=2, threads=1)
    artifact = tmp_path / "tiny.safetensors"
    summary = train(settings, tmp_path, artifact=artifact, progress=False)
    assert summary["steps_done"] == 5 and math.isfinite(summary["final_loss"])
    assert summary["dwell_samples"] == {"reverse": 15, "upper": 15, "count": 30}
    # eval reads back from the artifact what to leave out
    assert _trained_on(argparse.Namespace(artifact=str(artifact))) == {
        "train_samples": 40, "train_seed": settings.seed, "dwell": {"reverse": 15, "upper": 15, "count": 30}}


def test_a_dwell_run_from_the_main_steps_end_state_ends_with_the_whole_runs_weights(tmp_path):
    from cluster.tiny.train import TrainSettings, train

    settings = TrainSettings(samples=40, steps=4, dwell_steps=3, threads=1)
    whole, dwell = tmp_path / "whole", tmp_path / "dwell"
    train(settings, whole, artifact=whole / "tiny.safetensors", progress=False)
    summary = train(settings, dwell, artifact=dwell / "tiny.safetensors", progress=False,
                    dwell_from=whole / "main_state.pt")
    assert summary["steps_done"] == 7
    assert (dwell / "tiny.safetensors").read_bytes() == (whole / "tiny.safetensors").read_bytes()
    for other, named in ((TrainSettings(samples=40, steps=4, lr=1e-3, dwell_steps=3, threads=1), "'lr': 0.001"),
                         (TrainSettings(samples=48, steps=4, dwell_steps=3, threads=1), "'samples': 48")):
        with pytest.raises(ValueError, match=f"main steps of other settings .*{named}"):
            train(other, tmp_path / "other", artifact=tmp_path / "other.safetensors", progress=False,
                  dwell_from=whole / "main_state.pt")


def test_the_cli_refuses_a_main_state_of_other_settings_in_one_line_before_rendering(tmp_path, capsys):
    from cluster.cli import main
    from cluster.tiny.train import TrainSettings, train

    train(TrainSettings(samples=40, steps=2, dwell_steps=1, threads=1), tmp_path, artifact=tmp_path / "a.safetensors",
          progress=False)
    argv = ["tiny", "train", "--out", str(tmp_path / "dwell"), "--artifact", str(tmp_path / "b.safetensors")]
    assert main([*argv, "--dwell-from", str(tmp_path / "main_state.pt")]) == 2
    said = capsys.readouterr().err
    assert said.startswith("gptoss-cluster tiny train: ") and "'samples': 60000" in said and "'steps': 13000" in said
    assert main([*argv, "--dwell-from", str(tmp_path / "missing.pt")]) == 2
    assert "missing.pt" in capsys.readouterr().err
    assert not (tmp_path / "b.safetensors").exists()


def test_the_dwell_shares_are_given_as_skill_share_pairs_and_a_bad_one_names_itself():
    import argparse

    from cluster.cli.tiny import _shares

    assert _shares("reverse=0.15,count=0.3") == (("reverse", 0.15), ("count", 0.3))
    for bad, said in (("cnt=0.3", "'cnt' is not a skill"), ("count=x", "'count=x': the share must be a number"),
                      ("count=0.7,upper=0.4", "less than 1")):
        with pytest.raises(argparse.ArgumentTypeError, match=said):
            _shares(bad)
