import time

import pytest
import torch

from cluster.config import EngineConfig
from cluster.engine.kv_cache import KVCacheManager, KVCacheSpec, LayerGroup
from cluster.engine.sequence import EndReason, Sequence, SequenceStatus, SamplingSettings
from cluster.engine.errors import EngineOverloadedError, RequestTooLong
from cluster.engine.scheduler import Scheduler


def make_scheduler(num_blocks=256, block_size=4, window=16, **config) -> Scheduler:
    spec = KVCacheSpec(block_size, 1, 4, (LayerGroup((1,), None), LayerGroup((0,), window)), torch.float32)
    return Scheduler(EngineConfig(**config), KVCacheManager(spec, num_blocks))


def fake_step(scheduler: Scheduler):
    """One engine step with a stand-in model that always emits token 5."""
    out = scheduler.schedule()
    sampled = {c.request.request_id: (5, None) for c in out.chunks if c.samples}
    finished = scheduler.update_from_output(out, sampled)
    scheduler.kv_cache.check_invariants()
    return out, finished


def req(rid, n, max_tokens=4, **kw):
    return Sequence(rid, list(range(100, 100 + n)), SamplingSettings(max_tokens=max_tokens, **kw))


def test_long_prompt_is_chunked_and_decoders_run_every_step():
    s = make_scheduler(max_num_batched_tokens=64, max_num_seqs=8)
    s.add_request(req("decoder", 8, max_tokens=20))
    fake_step(s)  # decoder prefilled and sampled its first token
    s.add_request(Sequence("long", list(range(1000, 1200)), SamplingSettings(max_tokens=4)))
    seen = []
    for _ in range(4):
        out, _ = fake_step(s)
        tokens = {c.request.request_id: c.num_tokens for c in out.chunks}
        assert out.num_batched_tokens <= 64
        assert tokens["decoder"] == 1, "decoding is never starved by a long prompt"
        seen.append(tokens.get("long", 0))
    assert seen == [63, 63, 63, 11]  # 200 prompt tokens in chunks under the budget
    assert s.running[1].output_token_ids == [5]


def test_max_num_seqs_caps_the_batch():
    s = make_scheduler(max_num_seqs=3, max_num_batched_tokens=64)
    for i in range(5):
        s.add_request(req(f"r{i}", 4))
    out, _ = fake_step(s)
    assert [c.request.request_id for c in out.chunks] == ["r0", "r1", "r2"]
    assert len(s.waiting) == 2


def test_requests_finish_on_length_and_on_stop_token():
    s = make_scheduler()
    s.add_request(req("length", 4, max_tokens=3))
    s.add_request(req("stop", 4, max_tokens=10, stop_token_ids=(5,)))
    finished = []
    for _ in range(5):
        finished += fake_step(s)[1]
    reasons = {r.request_id: (r.finish_reason, len(r.output_token_ids)) for r in finished}
    assert reasons == {"length": (EndReason.LENGTH, 3), "stop": (EndReason.STOP, 1)}
    assert s.kv_cache.pool.num_free_blocks == s.kv_cache.pool.num_usable_blocks


def test_newest_is_preempted_when_blocks_run_out_and_later_recomputed():
    # 24 usable blocks of 4 tokens; each request's full group grows to 10 blocks.
    s = make_scheduler(num_blocks=25, block_size=4, window=8, max_num_batched_tokens=64)
    requests = [req(f"r{i}", 16, max_tokens=24) for i in range(3)]
    for r in requests:
        s.add_request(r)
    preempted = []
    while s.num_unfinished:
        out, _ = fake_step(s)
        preempted += [r.request_id for r in out.preempted]
    assert preempted and set(preempted) <= {"r1", "r2"}, "the oldest request is never the victim"
    assert all(r.output_token_ids == [5] * 24 and r.finish_reason is EndReason.LENGTH for r in requests)
    assert s.num_preemptions == len(preempted)
    assert s.kv_cache.pool.num_free_blocks == s.kv_cache.pool.num_usable_blocks


def test_full_waiting_queue_refuses_at_once():
    s = make_scheduler(max_waiting_requests=2, max_num_seqs=2, max_num_batched_tokens=8)
    for name in "abcd":  # a and b take the free batch slots at the next step: they are not queued
        s.add_request(req(name, 4))
    with pytest.raises(EngineOverloadedError) as err:
        s.add_request(req("e", 4))
    assert (err.value.queued, err.value.limit) == (2, 2) and err.value.retry_after_s > 0


def test_request_that_can_never_fit_is_refused():
    s = make_scheduler(num_blocks=9, block_size=4)
    with pytest.raises(RequestTooLong):
        s.add_request(req("huge", 40))


def test_abort_frees_blocks_wherever_the_request_is():
    s = make_scheduler(max_num_seqs=1)
    s.add_request(req("running", 10, max_tokens=50))
    s.add_request(req("waiting", 10))
    fake_step(s)
    assert s.kv_cache.pool.num_used_blocks > 0
    assert s.abort_request("running").finish_reason is EndReason.ABORT
    assert s.abort_request("waiting").status is SequenceStatus.FINISHED
    assert s.abort_request("nobody") is None
    assert s.num_unfinished == 0 and s.kv_cache.pool.num_used_blocks == 0
    s.kv_cache.check_invariants()


def test_second_request_with_shared_prefix_starts_from_the_hit():
    s = make_scheduler(block_size=4, max_num_batched_tokens=256)
    prefix = list(range(1, 65))
    s.add_request(Sequence("a", prefix + [200, 201], SamplingSettings(max_tokens=2)))
    while s.num_unfinished:
        fake_step(s)
    s.add_request(Sequence("b", prefix + [300], SamplingSettings(max_tokens=2)))
    out, _ = fake_step(s)
    (chunk,) = out.chunks
    assert chunk.start == 64 and chunk.num_tokens == 1
    assert s.kv_cache.prefix_hit_tokens == 64


def test_waiting_request_past_its_deadline_is_dropped_at_the_next_step():
    s = make_scheduler(max_num_seqs=1)
    s.add_request(req("running", 4, max_tokens=10))
    s.add_request(Sequence("late", list(range(100, 108)), SamplingSettings(max_tokens=4), deadline_s=time.time() - 1))
    s.add_request(Sequence("on-time", list(range(100, 108)), SamplingSettings(max_tokens=4),
                           deadline_s=time.time() + 3600))
    out, _ = fake_step(s)
    assert [r.request_id for r in out.expired] == ["late"]
    late = out.expired[0]
    assert late.status is SequenceStatus.FINISHED and late.finish_reason is EndReason.DEADLINE
    assert [r.request_id for r in s.waiting] == ["on-time"]  # still queued behind max_num_seqs 1
    s.running[0].deadline_s = time.time() - 1  # running requests are left to their consumer
    out, _ = fake_step(s)
    assert out.expired == [] and [c.request.request_id for c in out.chunks] == ["running"]


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="max_num_seqs"):
        EngineConfig(max_num_seqs=0)
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        EngineConfig(max_num_seqs=64, max_num_batched_tokens=32)
