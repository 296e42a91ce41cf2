"""Structured output with expert parallelism (ep_size 2: rank 1 a Ray actor, gloo): the group's
logits go through the same masked sampler, so every answer validates and matches ep_size 1."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from cluster.config import EngineConfig
from cluster.engine.core import EngineCore, run_to_completion
from cluster.engine.guided import GuideCompiler
from cluster.engine.sequence import SamplingSettings, Sequence
from cluster.harmony.structured import CONSTRAINED_STOP_TOKEN_IDS
from cluster.model.checkpoint import load_model
from cluster.parallel.workers import ep_forward_factory

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engine"))
from structured_cases import MAX_TOKENS, cases, check_output, prompt  # noqa: E402

ENGINE = EngineConfig(block_size=16, max_num_seqs=16, max_num_batched_tokens=1024, kv_cache_memory_mib=32)
NAMES = ["nested_object", "array_of_objects", "recursive_tree", "pattern", "enum_mixed", "regex", "grammar",
         "strict_tool_only"]


def run(core, compiler):
    chosen = {name: c for name, c in cases().items() if name in NAMES}
    settings = SamplingSettings(max_tokens=MAX_TOKENS, temperature=0.0, stop_token_ids=CONSTRAINED_STOP_TOKEN_IDS)
    seqs = [Sequence(name, prompt(), settings, guide=compiler.compile(c, MAX_TOKENS)) for name, c in chosen.items()]
    return chosen, run_to_completion(core, seqs)


def test_constrained_answers_validate_under_ep_size_2_and_match_ep_1(ray_cluster, tiny_checkpoint):
    torch.set_num_threads(1)
    compiler = GuideCompiler(ENGINE.structured_wrap_up_tokens)
    groups = []
    model = load_model(tiny_checkpoint)
    try:
        chosen, reference = run(EngineCore(model, ENGINE), compiler)
        factory = ep_forward_factory(str(tiny_checkpoint), 2, model=model, on_start=groups.append)
        _, got = run(EngineCore(model, ENGINE, factory), compiler)
        for name, constraint in chosen.items():
            check_output(name, constraint, got[name])
        assert got == reference
    finally:
        compiler.shutdown()
        for group in groups:
            group.shutdown()
