"""Randomized workloads: whatever mix of arrivals, completions, aborts and preemptions, no KV block
is leaked or double-freed and every surviving request gets exactly the tokens it asked for."""

import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from cluster.config import EngineConfig
from cluster.engine.kv_cache import KVCacheManager, KVCacheSpec, LayerGroup
from cluster.engine.sequence import EndReason, Sequence, SamplingSettings
from cluster.engine.errors import EngineOverloadedError
from cluster.engine.scheduler import Scheduler

SHARED_PREFIXES = [list(range(1, 33)), list(range(50, 70)), []]

operation = st.one_of(
    st.tuples(st.just("add"), st.integers(0, 2), st.integers(1, 40), st.integers(1, 16)),
    st.tuples(st.just("add"), st.integers(0, 2), st.integers(1, 8), st.integers(8, 40)),
    st.tuples(st.just("step"), st.integers(1, 3)),
    st.tuples(st.just("abort"), st.integers(0, 1000)),
)


def stand_in_token(request: Sequence) -> int:
    """Deterministic 'model': the next token depends only on the sequence so far."""
    return (sum(request.all_token_ids) * 31 + request.num_tokens) % 97 + 1


def step(scheduler: Scheduler, finished: list[Sequence]) -> None:
    out = scheduler.schedule()
    assert out.num_batched_tokens <= scheduler.config.max_num_batched_tokens
    assert len(scheduler.running) <= scheduler.config.max_num_seqs
    for chunk in out.chunks:  # scheduled blocks must cover the chunk in every group
        tables = scheduler.kv_cache.block_tables[chunk.request.request_id]
        for table in tables:
            assert len(table) * scheduler.kv_cache.block_size >= chunk.start + chunk.num_tokens
            last = (chunk.start + chunk.num_tokens - 1) // scheduler.kv_cache.block_size
            assert not table[last].is_null
    sampled = {c.request.request_id: (stand_in_token(c.request), None) for c in out.chunks if c.samples}
    finished += scheduler.update_from_output(out, sampled)
    scheduler.kv_cache.check_invariants()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    ops=st.lists(operation, min_size=10, max_size=80),
    num_blocks=st.integers(12, 48),
    block_size=st.sampled_from([2, 4, 8]),
    window=st.sampled_from([4, 8, 16]),
    budget=st.integers(8, 48),
)
def test_no_block_leaks_or_double_frees(ops, num_blocks, block_size, window, budget):
    spec = KVCacheSpec(block_size, 1, 2, (LayerGroup((1,), None), LayerGroup((0,), window)), torch.float32)
    kv = KVCacheManager(spec, num_blocks)
    scheduler = Scheduler(EngineConfig(max_num_seqs=6, max_num_batched_tokens=budget, max_waiting_requests=6), kv)
    added: list[Sequence] = []
    finished: list[Sequence] = []
    for op in ops:
        if op[0] == "add":
            _, prefix, tail, max_tokens = op
            request = Sequence(f"r{len(added)}", SHARED_PREFIXES[prefix] + list(range(200, 200 + tail)),
                              SamplingSettings(max_tokens=max_tokens))
            try:
                scheduler.add_request(request)
                added.append(request)
            except EngineOverloadedError:
                assert len(scheduler.waiting) >= 6  # preempted requests return to the queue beyond the bound
            except ValueError:  # RequestTooLong: can never fit this pool
                pass
        elif op[0] == "step":
            for _ in range(op[1]):
                step(scheduler, finished)
        elif added:
            aborted = scheduler.abort_request(added[op[1] % len(added)].request_id)
            if aborted is not None:
                finished.append(aborted)
            kv.check_invariants()

    for _ in range(2000):  # drain
        if not scheduler.num_unfinished:
            break
        step(scheduler, finished)
    assert scheduler.num_unfinished == 0
    event(f"preempted: {scheduler.num_preemptions > 0}; aborted: {any(r.finish_reason is EndReason.ABORT for r in finished)}; "
          f"prefix hits: {kv.prefix_hit_tokens > 0}")
    assert kv.block_tables == {}
    assert kv.pool.num_free_blocks == kv.pool.num_usable_blocks, "leaked blocks"
    assert all(b.ref_count == 0 for b in kv.pool.blocks[1:])
    assert sorted(r.request_id for r in finished) == sorted(r.request_id for r in added), "each finishes exactly once"
    for request in finished:
        if request.finish_reason is EndReason.LENGTH:
            assert len(request.output_token_ids) == request.sampling.max_tokens
            # Preempted or not, prefix hit or not, the tokens follow from the sequence alone.
            replay = Sequence("replay", request.prompt_token_ids)
            for token in request.output_token_ids:
                assert token == stand_in_token(replay)
                replay.output_token_ids.append(token)
