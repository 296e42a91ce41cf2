"""The physical KV blocks: a fixed set of ids, a free queue, reference counts and the prefix-cache map.

A block is `block_size` token slots in every layer of one layer group (see kv_cache.py); the pool
knows nothing of tokens or layers, only of ids. Life of a block:

    free (in free queue) --allocate/touch--> referenced (ref_count > 0) --release--> free again

A full block whose K/V are computed may carry a content key (`cache_key`) and sit in `cached`.
When it is released it stays in the free queue *with* its key, so a later request with the same
prefix can take it back (`touch`) instead of recomputing. Allocation pops from the front of the
queue, so the least recently released block is reused first and its key is dropped then: that is
the LRU eviction of the prefix cache.

Block 0 is the null block: it is never handed out, and stands in block tables for slots a
sliding-window layer no longer needs, so gathers over a table never index out of range.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Iterable
from dataclasses import dataclass

NULL_BLOCK_ID = 0


@dataclass(eq=False)
class KVBlock:
    block_id: int
    ref_count: int = 0
    cache_key: Hashable | None = None  # set while the block is in the prefix cache

    @property
    def is_null(self) -> bool:
        return self.block_id == NULL_BLOCK_ID


class BlockPoolExhausted(RuntimeError):
    """Raised by `allocate` when fewer blocks are free than asked for (callers check first)."""


class BlockPool:
    def __init__(self, num_blocks: int):
        if num_blocks < 2:
            raise ValueError(f"a block pool needs at least 2 blocks (one is the null block), got {num_blocks}")
        self.num_blocks = num_blocks
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self.null_block = self.blocks[NULL_BLOCK_ID]
        self.null_block.ref_count = 1  # pinned forever
        # Insertion order is eviction order: the front is the least recently released block.
        self._free: OrderedDict[int, KVBlock] = OrderedDict((b.block_id, b) for b in self.blocks[1:])
        self._cached: dict[Hashable, KVBlock] = {}
        self.num_evictions = 0

    # --- reading ----------------------------------------------------------------------------------

    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def num_free_blocks(self) -> int:
        """Blocks that `allocate` can hand out now, cached-but-unreferenced ones included."""
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_usable_blocks - len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    def lookup(self, cache_key: Hashable) -> KVBlock | None:
        return self._cached.get(cache_key)

    # --- changing ---------------------------------------------------------------------------------

    def allocate(self, n: int) -> list[KVBlock]:
        """Take `n` fresh blocks (ref_count 1), evicting the least recently released cached ones."""
        if n > len(self._free):
            raise BlockPoolExhausted(f"asked for {n} blocks, {len(self._free)} free")
        blocks = []
        for _ in range(n):
            _, block = self._free.popitem(last=False)
            if block.cache_key is not None:
                del self._cached[block.cache_key]
                block.cache_key = None
                self.num_evictions += 1
            block.ref_count = 1
            blocks.append(block)
        return blocks

    def touch(self, blocks: Iterable[KVBlock]) -> None:
        """Add a reference to each block (prefix-cache hits), taking free ones off the free queue."""
        for block in blocks:
            if block.is_null:
                continue
            if block.ref_count == 0:
                del self._free[block.block_id]
            block.ref_count += 1

    def release(self, blocks: Iterable[KVBlock]) -> None:
        """Drop one reference from each block, in order; a block reaching zero joins the queue's end."""
        for block in blocks:
            if block.is_null:
                continue
            if block.ref_count <= 0:
                raise RuntimeError(f"double free of KV block {block.block_id}")
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[block.block_id] = block

    def cache(self, block: KVBlock, cache_key: Hashable) -> None:
        """Publish a full, computed block under its content key (first writer wins on duplicates)."""
        if block.is_null or block.cache_key is not None or cache_key in self._cached:
            return
        block.cache_key = cache_key
        self._cached[cache_key] = block

    def check_invariants(self) -> None:
        """Raise AssertionError if the free queue, reference counts and cache map disagree."""
        assert self.null_block.ref_count == 1 and NULL_BLOCK_ID not in self._free
        for block in self.blocks[1:]:
            assert block.ref_count >= 0, f"block {block.block_id} has ref_count {block.ref_count}"
            assert (block.ref_count == 0) == (block.block_id in self._free), (
                f"block {block.block_id}: ref_count {block.ref_count}, in free queue: {block.block_id in self._free}"
            )
        for key, block in self._cached.items():
            assert block.cache_key == key, f"cache map and block {block.block_id} disagree on its key"
        assert sum(b.cache_key is not None for b in self.blocks) == len(self._cached)
