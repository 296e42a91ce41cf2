from types import SimpleNamespace

import pytest
import torch

from cluster.engine.kv_cache import KVCacheManager, KVCacheSpec, LayerGroup
from cluster.engine.sequence import Sequence


def gpt_oss_like(num_layers: int) -> SimpleNamespace:
    # Field names as in HF config.json; sizes as in GPT-OSS.md.
    return SimpleNamespace(num_hidden_layers=num_layers, num_key_value_heads=8, head_dim=64, sliding_window=128,
                           hidden_size=2880, num_attention_heads=64, dtype="bfloat16")


@pytest.mark.parametrize("num_layers, full_layer_kib", [(36, 36), (24, 24)])
def test_long_sequence_costs_about_the_full_layers_only(num_layers, full_layer_kib):
    spec = KVCacheSpec.from_model_config(gpt_oss_like(num_layers), block_size=16)
    assert [g.is_sliding for g in spec.groups] == [False, True]
    assert spec.groups[1].layer_ids == tuple(range(0, num_layers, 2))
    num_tokens = 32768
    per_token = spec.num_blocks_for_sequence(num_tokens) * spec.bytes_per_block / num_tokens
    theoretical = full_layer_kib * 1024  # 2 (K, V) x 8 heads x 64 x 2 bytes x full layers
    assert theoretical <= per_token <= 1.01 * theoretical


def test_budget_sizing():
    spec = KVCacheSpec(16, 2, 8, (LayerGroup((1, 3), None), LayerGroup((0, 2), 128)), torch.float32)
    assert spec.bytes_per_block == 2 * 16 * 2 * 2 * 8 * 4
    assert spec.num_blocks_for_budget(10 * spec.bytes_per_block + 5) == 10
    assert spec.cache_location(2) == (1, 1) and spec.cache_location(3) == (0, 1)
    with pytest.raises(ValueError, match="budget"):
        spec.num_blocks_for_budget(spec.bytes_per_block)


def small_manager(num_blocks=64, window=32, block_size=4, prefix_caching=True) -> KVCacheManager:
    spec = KVCacheSpec(block_size, 1, 4, (LayerGroup((1,), None), LayerGroup((0,), window)), torch.float32)
    return KVCacheManager(spec, num_blocks, enable_prefix_caching=prefix_caching)


def run_to(manager: KVCacheManager, request: Sequence, num_tokens: int, chunk: int = 1) -> None:
    """Pretend a model computed the request's tokens up to num_tokens, chunk by chunk."""
    while request.num_computed_tokens < num_tokens:
        n = min(chunk, num_tokens - request.num_computed_tokens)
        assert manager.allocate_slots(request, n)
        request.num_computed_tokens += n
        manager.check_invariants()


def test_sliding_group_keeps_only_the_window():
    manager = small_manager(window=32, block_size=4)
    request = Sequence("r", list(range(200)))
    run_to(manager, request, 200, chunk=1)
    full, sliding = manager.block_tables["r"]
    assert len(full) == len(sliding) == 50
    live = [b for b in sliding if not b.is_null]
    # Trimmed when position 199 was scheduled: keys at or after 199 - 32 stay, blocks 41..49.
    assert sliding.index(live[0]) == (199 - 32) // 4 and len(live) == 9
    assert all(b.is_null for b in sliding[:41])
    manager.free(request)
    assert manager.pool.num_free_blocks == manager.pool.num_usable_blocks
    manager.check_invariants()


def test_prefix_hit_reuses_blocks_of_a_finished_request():
    manager = small_manager(num_blocks=128, window=16, block_size=4)
    shared = list(range(1000, 1064))  # 64 tokens = 16 blocks
    first = Sequence("a", shared + [1, 2, 3, 4, 5, 6])
    run_to(manager, first, first.num_tokens, chunk=8)
    manager.free(first)

    second = Sequence("b", shared + [7, 8, 9])
    prefix = manager.find_cached_prefix(second)
    assert prefix.num_tokens == 64
    full, sliding = prefix.blocks
    assert not any(b.is_null for b in full) and len(full) == 16
    assert sum(not b.is_null for b in sliding) == 4 + 1 - 1  # positions >= 64 - 16 -> blocks 12..15
    assert manager.allocate_slots(second, second.num_tokens - prefix.num_tokens, prefix)
    assert manager.prefix_hit_tokens == 64 and manager.prefix_query_tokens == first.num_tokens + second.num_tokens
    assert [b.block_id for b in manager.block_tables["b"][0][:16]] == [b.block_id for b in full]
    manager.check_invariants()


def test_prefix_hit_always_leaves_a_token_to_compute():
    manager = small_manager(block_size=4)
    first = Sequence("a", list(range(16)))
    run_to(manager, first, 16)
    second = Sequence("b", list(range(16)))  # identical prompt, exactly 4 blocks
    assert manager.find_cached_prefix(second).num_tokens == 12
    manager.free(first)


def test_shared_blocks_are_referenced_twice_and_survive_one_free():
    manager = small_manager(num_blocks=64, block_size=4)
    first = Sequence("a", list(range(40)))
    run_to(manager, first, 40, chunk=40)
    first.output_token_ids.append(7)
    assert manager.allocate_slots(first, 1)  # the next step publishes the blocks computed by the last one
    second = Sequence("b", list(range(40)) + [99])
    prefix = manager.find_cached_prefix(second)
    assert prefix.num_tokens == 40
    assert manager.allocate_slots(second, 1, prefix)
    shared = manager.block_tables["b"][0][0]
    assert shared.ref_count == 2
    manager.free(first)
    assert shared.ref_count == 1
    manager.check_invariants()


def test_allocation_fails_cleanly_when_pool_is_short():
    manager = small_manager(num_blocks=9, block_size=4)  # 8 usable
    request = Sequence("r", list(range(20)))
    assert not manager.allocate_slots(request, 20)  # needs 5 + 5 blocks
    assert "r" not in manager.block_tables and manager.pool.num_free_blocks == 8
    assert manager.allocate_slots(request, 16)
    manager.check_invariants()


def test_fits_alone_accounts_for_window_and_chunk():
    manager = small_manager(num_blocks=41, window=16, block_size=4)  # 40 usable
    # 128 tokens: 32 full blocks + a sliding window of chunk 4 + 16 back -> 5 blocks.
    assert manager.fits_alone(128, max_chunk_tokens=4)
    assert not manager.fits_alone(128, max_chunk_tokens=128)


def test_prefix_caching_off_never_hits():
    manager = small_manager(prefix_caching=False)
    first = Sequence("a", list(range(30)))
    run_to(manager, first, 30, chunk=30)
    manager.free(first)
    assert manager.find_cached_prefix(Sequence("b", list(range(30)))).num_tokens == 0
    assert manager.pool.num_cached_blocks == 0
