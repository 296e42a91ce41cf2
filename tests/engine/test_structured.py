"""Structured output through the torch engine on the random `tiny` model (real vocabulary): the
constraint alone must make every answer valid, the analysis must be the unconstrained one, a bad
constraint is refused before anything runs, and preemption keeps the grammar state."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
import torch
from engine_fixtures import engine_model, one_intra_op_thread  # noqa: F401  (fixtures)
from structured_cases import ANALYSIS_QUESTIONS, BUDGET, MAX_TOKENS, cases, check_output, prompt

from cluster.engine.batching_engine import BatchingEngine
from cluster.config import EngineConfig
from cluster.engine.errors import InvalidRequestError
from cluster.engine.bitmask import apply_bitmask
from cluster.engine.guided import GuideCompiler, GuidedRows, guide_bitmask
from cluster.engine.request import FinishReason, GenerateRequest, SamplingParams
from cluster.engine.sampler import Sampler
from cluster.engine.sequence import SamplingSettings
from cluster.harmony.render import Message, render_prompt
from cluster.harmony.structured import ResponseFormat, StrictTool, TurnConstraint
from cluster.harmony.tokenizer import CHANNEL_ID, END_ID, MESSAGE_ID, RETURN_ID, START_ID, load_tokenizer

WRAP_UP_TOKENS = EngineConfig().structured_wrap_up_tokens  # the configured default


@pytest.fixture
def make_engine(engine_model):
    engines = []

    def make(wrap_up_tokens=WRAP_UP_TOKENS, **config):
        settings = dict(max_num_seqs=48, max_num_batched_tokens=2048, kv_cache_memory_mib=64, chunk_interval_ms=0,
                        structured_wrap_up_tokens=wrap_up_tokens)
        engine = BatchingEngine.for_model(engine_model("tiny"), EngineConfig(**{**settings, **config}))
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.shutdown()


async def run(engine, constraint, *, seed=None, temperature=0.0, max_tokens=MAX_TOKENS, request_id="r", ids=None):
    request = GenerateRequest(tuple(ids or prompt()), SamplingParams(max_tokens=max_tokens, temperature=temperature,
                                                                     seed=seed),
                              request_id=request_id, constraint=constraint)
    chunks = [c async for c in engine.generate(request)]
    return [t for c in chunks for t in c.token_ids], chunks[-1].finish_reason


def test_every_case_validates_greedy_and_sampled_in_one_batch(make_engine):
    """33 schemas + json_object, regex, grammar and a strict tool, each greedy and a third of them
    also sampled (sampling a 201088-token row costs more on CPU), batched together with
    unconstrained requests, on random weights."""
    engine = make_engine()
    runs = [(name, c, 0.0) for name, c in cases().items()]
    runs += [(name, c, 1.0) for name, c in list(cases().items())[::3]]

    async def main():
        jobs = [run(engine, c, temperature=t, seed=7, request_id=f"{name}-{t}") for name, c, t in runs]
        jobs += [run(engine, None, max_tokens=20, request_id=f"free{i}") for i in range(4)]
        return await asyncio.gather(*jobs)

    results = asyncio.run(main())
    assert len({name for name, _, _ in runs}) >= 30
    for (name, constraint, _), (ids, finish) in zip(runs, results):
        assert finish is FinishReason.STOP, (name, load_tokenizer().decode(ids)[-200:])
        check_output(name, constraint, ids)
    for ids, finish in results[len(runs):]:  # unconstrained neighbours: untouched (no grammar, no header)
        assert finish is FinishReason.LENGTH and len(ids) == 20


def test_analysis_is_the_unconstrained_one_up_to_the_final_header(make_engine):
    """Greedy: the analysis text of a constrained request is what the model writes without a
    constraint after the same analysis header (the mask allows all text there)."""
    engine = make_engine()
    tokenizer = load_tokenizer()
    header = [CHANNEL_ID, *tokenizer.encode("analysis"), MESSAGE_ID]
    constraint = TurnConstraint(ResponseFormat("json_schema", {"type": "object", "properties": {
        "a": {"type": "integer"}}, "required": ["a"]}, strict=True), reasoning_budget=24)

    async def main():
        for question in ANALYSIS_QUESTIONS:
            ids = render_prompt([Message("user", question)], reasoning_effort="low")
            constrained, _ = await run(engine, constraint, max_tokens=96, ids=ids)
            if constrained[:len(header)] == header:
                break
        else:
            pytest.fail("no question led the random model into an analysis")
        end = constrained.index(END_ID)
        analysis = constrained[len(header):end]
        free, _ = await run(engine, None, ids=ids + header, max_tokens=len(analysis))
        return analysis, free, constrained[end:]

    analysis, free, rest = asyncio.run(main())
    assert len(analysis) == 24  # random weights never end on their own: the budget ended it
    assert analysis == free
    assert rest[:5] == [END_ID, START_ID, load_tokenizer().encode("assistant")[0], CHANNEL_ID,
                        load_tokenizer().encode("final")[0]]
    assert rest[-1] == RETURN_ID


@pytest.mark.parametrize("budget", [0, 5])
def test_the_reasoning_budget_alone_bounds_the_analysis(make_engine, budget):
    engine = make_engine()
    ids, finish = asyncio.run(run(engine, TurnConstraint(reasoning_budget=budget), temperature=1.0, seed=3,
                                  max_tokens=64))
    text = load_tokenizer().decode(ids)
    if budget == 0:
        assert text.startswith("<|channel|>final<|message|>")
    else:
        analysis = ids[3:ids.index(END_ID)]
        assert len(analysis) == budget and text.startswith("<|channel|>analysis<|message|>")
    assert finish is FinishReason.STOP and ids[-1] == RETURN_ID  # the free final text wrapped up


def test_the_wrap_up_window_closes_a_long_value_and_is_a_setting(make_engine):
    """A free string the random model never ends: with the wrap-up (default) the answer is closed in
    time, valid and STOP; with engine.structured_wrap_up_tokens 0 it runs into max_tokens (LENGTH)."""
    schema = {"type": "object", "properties": {"note": {"type": "string"}}, "required": ["note"]}
    constraint = TurnConstraint(ResponseFormat("json_schema", schema, strict=True), reasoning_budget=0)
    closed, finish = asyncio.run(run(make_engine(), constraint, max_tokens=80))
    assert finish is FinishReason.STOP
    check_output("note", constraint, closed)
    assert len(closed) > 80 - WRAP_UP_TOKENS  # the model wrote on until the window, then closed
    cut, finish = asyncio.run(run(make_engine(wrap_up_tokens=0), constraint, max_tokens=80))
    assert finish is FinishReason.LENGTH and len(cut) == 80 and cut[-1] != RETURN_ID
    assert cut[:80 - WRAP_UP_TOKENS] == closed[:80 - WRAP_UP_TOKENS]  # the same until the window


@pytest.mark.parametrize("constraint, field", [
    (TurnConstraint(ResponseFormat("json_schema", {"type": "object", "properties": {"a": {"type": "strin"}}},
                                   strict=True)), "response_format.schema"),
    (TurnConstraint(ResponseFormat("json_schema", {"type": "string", "pattern": "(?<=a)b"}, strict=True)),
     "response_format.schema"),
    (TurnConstraint(ResponseFormat("json_schema", None)), "response_format.schema"),
    (TurnConstraint(ResponseFormat("json_schema", {"type": "integer"}, name="two words")), "response_format.name"),
    (TurnConstraint(ResponseFormat("json_schema", {"type": "integer"}, description="\ud800")),
     "response_format.description"),
    (TurnConstraint(ResponseFormat("regex", pattern="a(b")), "response_format.pattern"),
    (TurnConstraint(ResponseFormat("grammar", grammar="start: missing_rule")), "response_format.grammar"),
    (TurnConstraint(ResponseFormat("xml")), "response_format.type"),
    (TurnConstraint(strict_tools=(StrictTool("t", {"type": "object", "properties": {"x": {"$ref": "#/nope"}}}),)),
     "tools[0].parameters"),
    (TurnConstraint(reasoning_budget=-1), "reasoning_budget"),
])
def test_a_bad_constraint_is_refused_naming_the_field_before_anything_runs(make_engine, constraint, field):
    engine = make_engine()

    async def main():
        with pytest.raises(InvalidRequestError) as info:
            await run(engine, constraint)
        return info.value

    err = asyncio.run(main())
    assert err.field == field, err
    assert engine.stats().requests_total == 0 and engine.core.stats.steps_total == 0


def test_ignore_stop_with_a_constraint_is_refused(make_engine):
    engine = make_engine()
    request = GenerateRequest(tuple(prompt()), SamplingParams(max_tokens=8, ignore_stop=True),
                              constraint=TurnConstraint(ResponseFormat("json_object")))

    async def main():
        with pytest.raises(InvalidRequestError) as info:
            [c async for c in engine.generate(request)]
        return info.value

    assert asyncio.run(main()).field == "sampling.ignore_stop"


def test_preempted_constrained_requests_resume_with_their_grammar_state(make_engine):
    """A KV pool too small for the batch: sequences are preempted and recomputed mid-answer, and
    end with the same (valid) answers as without preemption."""
    roomy = make_engine(block_size=4)
    bytes_per_token = (64 << 20) / roomy.core.kv_cache.capacity_tokens
    longest = len(prompt()) + MAX_TOKENS
    # Room for one and a quarter whole requests; twelve in flight, each with a prompt of its own.
    tight = make_engine(block_size=4, max_num_batched_tokens=256,
                        kv_cache_memory_mib=int(1.25 * longest * bytes_per_token) / (1 << 20))
    all_cases = list(cases().items())[:12]
    prompts = [render_prompt([Message("user", f"Question {i}: {name}?")], reasoning_effort="low")
               for i, (name, _) in enumerate(all_cases)]

    async def answers(engine):
        return await asyncio.gather(*[run(engine, c, request_id=name, ids=ids)
                                      for (name, c), ids in zip(all_cases, prompts)])

    expected, got = asyncio.run(answers(roomy)), asyncio.run(answers(tight))
    assert tight.stats().preemptions_total > 0
    assert got == expected
    for (name, constraint), (ids, _) in zip(all_cases, got):
        check_output(name, constraint, ids)


def test_the_mask_of_a_batch_is_one_op_and_leaves_unconstrained_rows_alone():
    compiler = GuideCompiler(WRAP_UP_TOKENS)
    try:
        guide = compiler.compile(TurnConstraint(ResponseFormat("regex", pattern="ab")), 64)
        guide.consume(CHANNEL_ID)
        logits = torch.randn(3, 201088)
        before = logits.clone()
        bitmask = guide_bitmask([guide], [64])
        apply_bitmask(logits, [1], bitmask)
        allowed = torch.isfinite(logits[1]).nonzero().flatten().tolist()
        tokenizer = load_tokenizer()
        assert {tokenizer.decode([t]) for t in allowed} == {"analysis", "final"} or len(allowed) < 10
        assert torch.equal(logits[0], before[0]) and torch.equal(logits[2], before[2])
        # Wrap-up: with few tokens left the closing tokens win where the grammar allows any.
        json_guide = compiler.compile(TurnConstraint(ResponseFormat("json_object"), reasoning_budget=0), 64)
        for token in tokenizer.encode('<|channel|>final<|message|>{"k":"abc', allow_special=True):
            json_guide.consume(token)
        narrowed = torch.zeros(1, 201088)
        apply_bitmask(narrowed, [0], guide_bitmask([json_guide], [WRAP_UP_TOKENS]))
        closing = {tokenizer.decode([t]) for t in torch.isfinite(narrowed[0]).nonzero().flatten().tolist()}
        assert closing and all(set(text) <= set('"}]') for text in closing), closing
    finally:
        compiler.shutdown()


SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "n": {"type": "integer"}},
          "required": ["name", "n"]}
# Where a turn can stand: the start, its analysis, the final header, inside a string, a key, a number, the value's end.
STATES = ["", "<|channel|>analysis<|message|>Let me think", "<|channel|>final<|message|>",
          '<|channel|>final<|message|>{"name":"Ab', '<|channel|>final<|message|>{"name":"Ab",',
          '<|channel|>final<|message|>{"name":"Ab","n":12', '<|channel|>final<|message|>{"name":"Ab","n":12}']


def guide_at(compiler, prefix, budget=32):
    guide = compiler.compile(TurnConstraint(ResponseFormat("json_schema", SCHEMA), reasoning_budget=budget), 400)
    for token in load_tokenizer().encode(prefix, allow_special=True):
        guide.consume(token)
    return guide


def test_the_check_of_a_drawn_token_agrees_with_the_mask_on_the_whole_vocabulary():
    """Drawing unmasked and checking the token stands in for the mask: in every state of a turn,
    with the reasoning budget spent or not, the guide's check allows the mask's tokens and no
    other, <|return|> included (llguidance's own check refuses it at the value's end, where the
    mask allows it: a row drawing it would be masked and drawn again, one mask more a turn)."""
    compiler = GuideCompiler(WRAP_UP_TOKENS)
    try:
        for prefix, budget in [(state, 32) for state in STATES] + [("<|channel|>analysis<|message|>Let me think", 3)]:
            guide = guide_at(compiler, prefix, budget)
            allowed = torch.zeros(1, 201088)
            apply_bitmask(allowed, [0], guide_bitmask([guide], [300]))
            by_mask = torch.isfinite(allowed[0]).nonzero().flatten().tolist()
            by_check = [t for t in range(201088) if guide.allows(t)]
            assert by_check == by_mask, prefix
            llguidance_refuses = [t for t in by_mask if not guide.matcher.validate_tokens([t])]
            assert llguidance_refuses in ([], [RETURN_ID]), prefix
            if prefix == STATES[-1]:  # the value's end: only <|return|>, which llguidance's check refuses
                assert by_mask == llguidance_refuses == [RETURN_ID]
    finally:
        compiler.shutdown()


def test_a_refused_unmasked_draw_masks_the_next_steps_ahead_backing_off():
    compiler = GuideCompiler(WRAP_UP_TOKENS)
    try:
        guide = guide_at(compiler, "")
        ahead = []
        for allowed in [False] * 6 + [True, False]:
            guide.mask_ahead_steps = 0  # the steps masked ahead have run: the row is drawn unmasked again
            guide.note_unmasked_draw(allowed)
            ahead.append(guide.mask_ahead_steps)
        assert ahead == [1, 2, 4, 8, 16, 16, 0, 1]
        rows = GuidedRows([0], [guide], [300], [SamplingSettings(temperature=0.0)])
        assert rows.masked_rows == [0] and rows.checked_rows == [] and guide.mask_ahead_steps == 0
        rows.masks()
        assert GuidedRows([0], [guide], [300], [SamplingSettings(temperature=0.0)]).checked_rows == [0]
    finally:
        compiler.shutdown()


def test_rows_drawn_unmasked_are_masked_only_when_refused_and_every_token_is_the_masked_draws():
    """Constrained rows get no mask ahead unless their draw depends on it (top-k/top-p, wrap-up) or
    their guide's unmasked draws were refused lately: the sampler draws from the unmasked logits and
    masks only the rows whose token the grammar refuses. In every state of the turn, the tokens must
    be exactly those of masking every constrained row first, greedy and sampled, with the same seeds,
    step after step as the guides move rows between the two kinds."""
    compiler = GuideCompiler(WRAP_UP_TOKENS)
    settings = [SamplingSettings(temperature=0.0), SamplingSettings(temperature=0.8),
                SamplingSettings(temperature=1.0, top_k=40), SamplingSettings(temperature=0.7, top_p=0.9)]
    tokenizer = load_tokenizer()
    try:
        guides, params, left = [], [], []
        for i, prefix in enumerate(STATES * len(settings)):
            guides.append(guide_at(compiler, prefix))
            params.append(settings[i // len(STATES)])
            left.append(WRAP_UP_TOKENS if i == 1 else 300)  # one analysis row in its wrap-up window
        S = len(guides) + 2  # and two unconstrained rows, last
        params += [SamplingSettings(temperature=0.0), SamplingSettings(temperature=0.9)]
        rows = list(range(len(guides)))
        needs_mask = {i for i in rows if params[i].top_k or params[i].top_p < 1 or i == 1}
        seen = {"checked": 0, "refused": 0, "ahead_after_refusal": 0}
        for trial in range(6):
            logits = torch.randn(S, 201088, generator=torch.Generator().manual_seed(trial)) * 3
            # Some rows favour tokens the grammar allows where they stand (text, digits, keys, the headers).
            for token in tokenizer.encode('a the 7"n":<|channel|>final<|return|>', allow_special=True):
                logits[trial % 3::3, token] += 12.0
            masked = logits.clone()
            apply_bitmask(masked, rows, guide_bitmask(guides, left))
            first = Sampler()(masked, params, [torch.Generator().manual_seed(100 + i) for i in range(S)])
            unmasked = Sampler()(logits.clone(), params, [torch.Generator().manual_seed(100 + i) for i in range(S)])
            ahead = {i for i in rows if guides[i].mask_ahead_steps > 0}
            # Its masks are computed on a thread from here until the sampler takes them (a matcher
            # serves one thread at a time, as in the runner).
            guided = GuidedRows(rows, guides, left, params[:len(guides)])
            assert guided.masked_rows == sorted(needs_mask | ahead)
            assert guided.checked_rows == [i for i in rows if i not in needs_mask | ahead]
            seen["ahead_after_refusal"] += len(ahead - needs_mask)
            lazy = Sampler()(logits.clone(), params, [torch.Generator().manual_seed(100 + i) for i in range(S)],
                             guided)
            assert lazy.token_ids == first.token_ids
            refused = {i for i in guided.checked_rows if not guides[i].allows(unmasked.token_ids[i])}
            assert {i for i in guided.checked_rows if guides[i].mask_ahead_steps > 0} == refused  # masked next step
            assert all(lazy.token_ids[i] == unmasked.token_ids[i] for i in guided.checked_rows if i not in refused)
            seen["checked"] += len(guided.checked_rows)
            seen["refused"] += len(refused)
        assert seen["refused"] and seen["checked"] > seen["refused"] and seen["ahead_after_refusal"]
    finally:
        compiler.shutdown()


def test_a_migrated_constrained_stream_continues_its_grammar_mid_answer(make_engine):
    """The rest of a constrained stream, as the front door resumes it on another replica after a
    loss (resumed_request: prompt + the tokens sent, max_tokens left, resumed_tokens), cut in the
    analysis, in the final header and in the middle of the JSON value: the engine advances the
    turn's grammar over the tokens sent, so greedy gives exactly the undisturbed answer, valid.
    Without the advance (resumed_tokens 0) the grammar would start the turn again after them."""
    from cluster.frontdoor.migration import resumed_request

    engine = make_engine()
    tokenizer = load_tokenizer()
    name = "nested_object"
    constraint = cases()[name]
    context = engine.limits.context_length

    async def generate(request):
        return [t for c in [c async for c in engine.generate(request)] for t in c.token_ids]

    async def main():
        requests = [GenerateRequest(tuple(render_prompt([Message("user", q)], reasoning_effort="low")),
                                    SamplingParams(max_tokens=MAX_TOKENS), request_id=f"q{i}", constraint=constraint)
                    for i, q in enumerate(ANALYSIS_QUESTIONS)]
        answers = await asyncio.gather(*map(generate, requests))
        analysed = [(r, a) for r, a in zip(requests, answers) if a[:2] == [CHANNEL_ID, *tokenizer.encode("analysis")]]
        if not analysed:
            pytest.fail("no question led the random model into an analysis")
        request, whole = analysed[0]
        value_at = len(whole) - whole[::-1].index(MESSAGE_ID)  # the final message's first token
        cuts = {"analysis": 5, "final header": value_at - 2, "mid-JSON": value_at + (len(whole) - value_at) // 2}
        rests = [resumed_request(request, whole[:k], 0, context) for k in cuts.values()]
        for rest, k in zip(rests, cuts.values()):
            assert rest.resumed_tokens == k and rest.sampling.max_tokens == MAX_TOKENS - k
        unadvanced = dataclasses.replace(rests[-1], resumed_tokens=0)
        *continued, restarted = await asyncio.gather(*map(generate, [*rests, unadvanced]))
        return whole, cuts, dict(zip(cuts, continued)), restarted

    whole, cuts, continued, restarted = asyncio.run(main())
    check_output(name, constraint, whole)
    answer = tokenizer.decode(whole[cuts["mid-JSON"]:])
    assert answer.strip() and not answer.startswith("<|"), "the mid-JSON cut is not inside the value"
    for where, k in cuts.items():
        assert whole[:k] + continued[where] == whole, where
    # The grammar started over: the rest opens a new turn (a channel header) instead of finishing the value.
    assert restarted[0] == CHANNEL_ID and whole[cuts["mid-JSON"]] != CHANNEL_ID
