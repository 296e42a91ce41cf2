"""Score gpt-oss-tiny on held-out conversations through the real engine (batched greedy decoding).

The evaluation set comes from `curriculum.EVAL_SEED`, with every conversation that also occurs
in the training set (same skill, messages, tools, effort and instructions) dropped, so each one
scored is new to the model. Per sample:

- valid: openai-harmony parses the completion as an analysis message followed by a final message
  ending in `<|return|>`, or by a tool call (commentary channel, recipient `functions.*`) ending
  in `<|call|>`;
- exact: the final text, or the tool name and JSON arguments, equal the curriculum's answer;
- args_valid (tool calls): the arguments parse as JSON and satisfy the declared tool's schema.

The analysis length (in tokens) per reasoning effort shows whether effort is followed.
"""

from __future__ import annotations

import asyncio
import json
import statistics
from dataclasses import dataclass
from pathlib import Path

import openai_harmony as oh
import torch

from cluster.engine.batching_engine import BatchingEngine
from cluster.config import EngineConfig
from cluster.engine.request import GenerateRequest, SamplingParams
from cluster.harmony import CALL_ID, RETURN_ID, load_tokenizer
from cluster.tiny import curriculum

STOP_IDS = (RETURN_ID, CALL_ID)  # harmony's stop tokens for assistant actions


@dataclass
class Scored:
    skill: str
    effort: str
    valid: bool
    exact: bool
    args_valid: bool | None  # None: no tool call was made
    analysis_tokens: int
    completion: str


def _key(s: curriculum.Sample) -> str:
    return repr((s.skill, s.effort, s.messages, s.tools, s.instructions))


def eval_samples(n: int, *, train_samples: int, train_seed: int = 0, dwell: dict[str, int] | None = None,
                 seed: int = curriculum.EVAL_SEED) -> list[curriculum.Sample]:
    """`n` samples from the eval seed, none of which is in the training set (the curriculum's
    `train_samples` and the extra conversations training ended on, `dwell` = {skill: count}).
    Another `seed` draws a development set, to choose training settings on without looking at
    the one reported."""
    trained = curriculum.generate(train_samples, curriculum.TRAIN_SEED + train_seed)
    trained += curriculum.of_skills(dwell or {}, curriculum.DWELL_SEED + train_seed)
    seen = {_key(s) for s in trained}
    fresh = [s for s in curriculum.generate(4 * n, seed) if _key(s) not in seen]
    if len(fresh) < n:
        raise ValueError(f"only {len(fresh)} of {4 * n} eval samples are new to the model; ask for fewer")
    out = fresh[:n]
    return out


def matches_schema(value, schema: dict | None) -> bool:
    """The JSON-schema subset the curriculum's tools use: objects, required keys, string and integer."""
    if not schema:
        return isinstance(value, dict)
    kind = schema.get("type")
    if kind == "object":
        if not isinstance(value, dict) or any(k not in value for k in schema.get("required", ())):
            return False
        props = schema.get("properties", {})
        return all(k in props and matches_schema(v, props[k]) for k, v in value.items())
    if kind == "string":
        return isinstance(value, str)
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return True


def score(sample: curriculum.Sample, tokens: list[int]) -> Scored:
    enc = load_tokenizer()._encoding
    text = enc.decode(tokens)
    base = dict(skill=sample.skill, effort=sample.effort, completion=text)
    try:
        messages = enc.parse_messages_from_completion_tokens(tokens, oh.Role.ASSISTANT)
    except Exception:  # openai-harmony raises its own error types on malformed completions
        return Scored(valid=False, exact=False, args_valid=None, analysis_tokens=0, **base)
    first = messages[0] if messages else None
    analysis = first.content[0].text if first and first.channel == "analysis" and first.content else None
    analysis_tokens = len(enc.encode(analysis, allowed_special="all")) if analysis is not None else 0
    if analysis is None or len(messages) != 2 or not tokens:
        return Scored(valid=False, exact=False, args_valid=None, analysis_tokens=analysis_tokens, **base)
    last = messages[1]
    body = last.content[0].text if last.content else ""
    if last.channel == "final" and not last.recipient:
        valid = tokens[-1] == RETURN_ID
        return Scored(valid=valid, exact=valid and sample.call is None and body == sample.final, args_valid=None,
                      analysis_tokens=analysis_tokens, **base)
    if last.channel == "commentary" and (last.recipient or "").startswith("functions."):
        valid = tokens[-1] == CALL_ID
        name = last.recipient.removeprefix("functions.")
        try:
            args = json.loads(body)
        except ValueError:
            args = None
        declared = {t.name: t for t in sample.tools}
        args_valid = args is not None and name in declared and matches_schema(args, declared[name].parameters)
        exact = valid and sample.call == (name, args)
        return Scored(valid=valid, exact=exact, args_valid=args_valid, analysis_tokens=analysis_tokens, **base)
    return Scored(valid=False, exact=False, args_valid=None, analysis_tokens=analysis_tokens, **base)


async def _generate_all(engine: BatchingEngine, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    async def one(prompt: list[int]) -> list[int]:
        out: list[int] = []
        request = GenerateRequest(tuple(prompt), SamplingParams(max_tokens=max_tokens, stop_token_ids=STOP_IDS))
        async for chunk in engine.generate(request):
            out.extend(chunk.token_ids)
        return out

    return await asyncio.gather(*(one(p) for p in prompts))


def run_eval(model, samples: list[curriculum.Sample], *, max_tokens: int = 160, max_num_seqs: int = 64) -> list[Scored]:
    # every sample is queued at once, so the queue bound is the sample count
    engine = BatchingEngine.for_model(model, EngineConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=2048,
                                                          kv_cache_memory_mib=256,
                                                          max_waiting_requests=max(1, len(samples))))
    try:
        completions = asyncio.run(_generate_all(engine, [s.prompt_ids() for s in samples], max_tokens))
    finally:
        engine.shutdown()
    return [score(s, c) for s, c in zip(samples, completions)]


def summarize(scored: list[Scored]) -> dict:
    def pct(xs: list[bool]) -> float | None:
        return round(100.0 * sum(xs) / len(xs), 2) if xs else None

    skills = {}
    for skill in curriculum.SKILLS:
        rows = [r for r in scored if r.skill == skill]
        if rows:
            skills[skill] = {"n": len(rows), "valid_pct": pct([r.valid for r in rows]),
                             "exact_pct": pct([r.exact for r in rows])}
    calls = [r.args_valid for r in scored if r.args_valid is not None]
    effort = {e: round(statistics.mean([r.analysis_tokens for r in scored if r.effort == e and r.valid] or [0]), 2)
              for e in curriculum.EFFORTS}
    return {
        "samples": len(scored),
        "valid_pct": pct([r.valid for r in scored]),
        "exact_pct": pct([r.exact for r in scored]),
        "min_skill_exact_pct": min(v["exact_pct"] for v in skills.values()),
        "tool_calls": len(calls),
        "tool_args_valid_pct": pct(calls),
        "analysis_tokens_by_effort": effort,
        "effort_monotonic": effort["low"] < effort["medium"] < effort["high"],
        "skills": skills,
    }


def table(summary: dict) -> str:
    lines = [f"{'skill':<14}{'n':>6}{'valid %':>10}{'exact %':>10}"]
    for skill, row in summary["skills"].items():
        lines.append(f"{skill:<14}{row['n']:>6}{row['valid_pct']:>10.2f}{row['exact_pct']:>10.2f}")
    lines.append(f"{'all':<14}{summary['samples']:>6}{summary['valid_pct']:>10.2f}{summary['exact_pct']:>10.2f}")
    e = summary["analysis_tokens_by_effort"]
    lines.append(f"tool calls: {summary['tool_calls']}, arguments valid JSON matching the schema: "
                 f"{summary['tool_args_valid_pct']}%")
    lines.append(f"analysis tokens by effort: low {e['low']}, medium {e['medium']}, high {e['high']} "
                 f"({'increasing' if summary['effort_monotonic'] else 'NOT increasing'})")
    return "\n".join(lines)


def model_from_float_state(path: Path):
    """The unquantized model training saved (float_state.pt), widened to the full vocabulary."""
    import dataclasses

    from cluster.model.config import GptOssConfig
    from cluster.model.transformer import GptOssModel

    saved = torch.load(path, weights_only=True)
    ids, state = saved["vocab_ids"], dict(saved["state"])
    config = GptOssConfig.from_preset("gpt-oss-tiny")
    for name in ("embedding.weight", "unembedding.weight"):
        full = torch.zeros(config.vocab_size, config.hidden_size)
        full[ids] = state[name]
        state[name] = full
    model = GptOssModel(dataclasses.replace(config))
    model.load_state_dict(state)
    return model.requires_grad_(False).eval()
