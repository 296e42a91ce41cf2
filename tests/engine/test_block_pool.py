import pytest

from cluster.engine.block_pool import NULL_BLOCK_ID, BlockPool, BlockPoolExhausted


def test_allocate_and_release_round_trip():
    pool = BlockPool(5)
    assert pool.num_usable_blocks == 4 and pool.num_free_blocks == 4
    blocks = pool.allocate(3)
    assert [b.ref_count for b in blocks] == [1, 1, 1]
    assert NULL_BLOCK_ID not in {b.block_id for b in blocks}
    assert pool.num_free_blocks == 1 and pool.num_used_blocks == 3
    pool.release(blocks)
    assert pool.num_free_blocks == 4
    pool.check_invariants()


def test_allocating_more_than_free_raises_and_changes_nothing():
    pool = BlockPool(3)
    with pytest.raises(BlockPoolExhausted):
        pool.allocate(3)
    assert pool.num_free_blocks == 2
    pool.check_invariants()


def test_double_free_is_detected():
    pool = BlockPool(3)
    (block,) = pool.allocate(1)
    pool.release([block])
    with pytest.raises(RuntimeError, match="double free"):
        pool.release([block])


def test_released_cached_block_can_be_taken_back_until_evicted():
    pool = BlockPool(4)  # 3 usable
    a, b, c = pool.allocate(3)
    pool.cache(a, "key-a")
    pool.release([a, b, c])  # queue order now a, b, c
    assert pool.lookup("key-a") is a and a.ref_count == 0
    pool.touch([a])  # a prefix hit revives it
    assert a.ref_count == 1 and pool.num_free_blocks == 2
    pool.release([a])  # queue order now b, c, a
    fresh = pool.allocate(2)
    assert fresh == [b, c]
    assert pool.lookup("key-a") is a, "the least recently released blocks go first"
    (last,) = pool.allocate(1)
    assert last is a and pool.lookup("key-a") is None and a.cache_key is None
    assert pool.num_evictions == 1
    pool.check_invariants()


def test_shared_block_needs_every_reference_released():
    pool = BlockPool(3)
    (block,) = pool.allocate(1)
    pool.cache(block, "k")
    pool.touch([block])  # a second request shares it
    pool.release([block])
    assert block.ref_count == 1 and pool.num_free_blocks == 1
    pool.release([block])
    assert pool.num_free_blocks == 2
    pool.check_invariants()


def test_duplicate_key_keeps_first_block():
    pool = BlockPool(4)
    a, b = pool.allocate(2)
    pool.cache(a, "same")
    pool.cache(b, "same")
    assert pool.lookup("same") is a and b.cache_key is None
    pool.check_invariants()


def test_null_block_is_never_released_or_cached():
    pool = BlockPool(3)
    pool.release([pool.null_block])
    pool.touch([pool.null_block])
    pool.cache(pool.null_block, "x")
    assert pool.null_block.ref_count == 1 and pool.lookup("x") is None
    pool.check_invariants()
