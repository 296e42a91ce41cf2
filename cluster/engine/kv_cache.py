"""Per-request view of the paged KV cache: block tables per layer group, prefix hits, window trimming.

gpt-oss alternates sliding-window layers (window 128, even layers) and full-attention layers. The
layers are split into *groups* of one attention kind. Each request has one block table per group,
and all groups draw their blocks from one shared `BlockPool`: a block id stands for `block_size`
token slots in every layer of whichever group owns it. Physically there are `num_cache_tensors`
K and V tensors of shape [num_blocks, block_size, kv_heads, head_dim]; the j-th layer of every
group writes tensor j. (gpt-oss has as many sliding as full layers, so no slot is wasted.)

A full-attention group keeps every block; a sliding group hands back blocks that no query of the
request can reach any more (their table entries become the null block), so a long sequence costs
about a full layer's K/V per token, plus a window's worth for the sliding layers.

Prefix caching: full blocks are keyed by a chained SHA-256 of their tokens (a block's key covers
every token before it) plus the group index. Blocks are published once their K/V are computed.
"""

from __future__ import annotations

import hashlib
from array import array
from dataclasses import dataclass

import torch

from cluster.engine.block_pool import BlockPool, KVBlock
from cluster.engine.sequence import Sequence


@dataclass(frozen=True)
class LayerGroup:
    layer_ids: tuple[int, ...]
    sliding_window: int | None  # None: full attention

    @property
    def is_sliding(self) -> bool:
        return self.sliding_window is not None


@dataclass(frozen=True)
class KVCacheSpec:
    """Shape of the cache for one model: enough to size it from a memory budget and to lay it out."""

    block_size: int
    num_kv_heads: int
    head_dim: int
    groups: tuple[LayerGroup, ...]
    dtype: torch.dtype = torch.bfloat16

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")

    @classmethod
    def from_model_config(cls, config, block_size: int = 16, dtype: torch.dtype | None = None) -> KVCacheSpec:
        """Build from a GptOssConfig-like object (HF config.json field names)."""
        num_layers = config.num_hidden_layers
        layer_types = getattr(config, "layer_types", None) or [
            "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)
        ]
        window = config.sliding_window
        sliding = tuple(i for i, t in enumerate(layer_types) if t == "sliding_attention")
        full = tuple(i for i, t in enumerate(layer_types) if t != "sliding_attention")
        groups = tuple(g for g in (LayerGroup(full, None), LayerGroup(sliding, window)) if g.layer_ids)
        if dtype is None:
            dtype = getattr(config, "dtype", None) or torch.bfloat16
            if isinstance(dtype, str):
                dtype = getattr(torch, dtype)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(block_size, config.num_key_value_heads, head_dim, groups, dtype)

    @property
    def num_layers(self) -> int:
        return sum(len(g.layer_ids) for g in self.groups)

    @property
    def num_cache_tensors(self) -> int:
        """K (and V) tensors to allocate: one per layer of the largest group, shared across groups."""
        return max(len(g.layer_ids) for g in self.groups)

    def cache_location(self, layer_id: int) -> tuple[int, int]:
        """(group index, cache tensor index) holding `layer_id`'s K/V."""
        for g, group in enumerate(self.groups):
            if layer_id in group.layer_ids:
                return g, group.layer_ids.index(layer_id)
        raise KeyError(f"layer {layer_id} is in no KV cache group")

    @property
    def bytes_per_block(self) -> int:
        """K and V for `block_size` tokens across all cache tensors."""
        per_token_per_tensor = 2 * self.num_kv_heads * self.head_dim * self.dtype.itemsize
        return self.num_cache_tensors * self.block_size * per_token_per_tensor

    def num_blocks_for_budget(self, budget_bytes: int) -> int:
        """How many blocks (null block included) fit in `budget_bytes`."""
        n = budget_bytes // self.bytes_per_block
        if n < 2:
            raise ValueError(f"KV cache memory budget {budget_bytes} B holds {n} blocks of {self.bytes_per_block} B; need >= 2")
        return n

    def num_blocks_for_sequence(self, num_tokens: int) -> int:
        """Blocks one sequence holds once `num_tokens` are computed (sliding groups trimmed to the window)."""
        total = 0
        for group in self.groups:
            blocks = -(-num_tokens // self.block_size)
            if group.is_sliding:
                blocks -= first_needed_block(num_tokens, group.sliding_window, self.block_size)
            total += blocks
        return total


def first_needed_block(num_computed_tokens: int, window: int, block_size: int) -> int:
    """Lowest logical block a sliding layer may still read once `num_computed_tokens` are cached.

    The next query sits at position `num_computed_tokens`; keys at or after `position - window` are
    kept (one more than the model's window needs, which keeps this safe under either convention).
    """
    return max(0, num_computed_tokens - window) // block_size


@dataclass
class CachedPrefix:
    """A prefix-cache hit: per group the blocks to reuse, and how many tokens they cover."""

    blocks: list[list[KVBlock]]
    num_tokens: int


def hash_block(parent: bytes, token_ids: list[int]) -> bytes:
    return hashlib.sha256(parent + array("i", token_ids).tobytes()).digest()


class KVCacheManager:
    def __init__(self, spec: KVCacheSpec, num_blocks: int, enable_prefix_caching: bool = True):
        self.spec = spec
        self.block_size = spec.block_size
        self.pool = BlockPool(num_blocks)
        self.enable_prefix_caching = enable_prefix_caching
        self.block_tables: dict[str, list[list[KVBlock]]] = {}  # request id -> per group, logical order
        self._num_published: dict[str, list[int]] = {}  # request id -> per group, leading blocks in the cache
        self._num_trimmed: dict[str, list[int]] = {}  # request id -> per group, leading blocks set to null
        self.prefix_query_tokens = 0
        self.prefix_hit_tokens = 0

    # --- reading ----------------------------------------------------------------------------------

    @property
    def usage(self) -> float:
        return self.pool.num_used_blocks / self.pool.num_usable_blocks

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_hit_tokens / self.prefix_query_tokens if self.prefix_query_tokens else 0.0

    @property
    def capacity_tokens(self) -> int:
        """About how many tokens one sequence could hold with the pool to itself (for messages)."""
        return self.pool.num_usable_blocks * self.block_size // len(self.spec.groups)

    def block_ids(self, request_id: str) -> list[list[int]]:
        return [[b.block_id for b in table] for table in self.block_tables[request_id]]

    def fits_alone(self, num_tokens: int, max_chunk_tokens: int) -> bool:
        """Whether a sequence of `num_tokens`, prefilled in chunks of at most `max_chunk_tokens`, fits the pool alone.

        A request that fails this can never finish, so the engine refuses it up front instead of
        preempting it forever. Worst moment: the last chunk, when each sliding group holds that
        chunk's blocks plus the window before it.
        """
        bs, need = self.block_size, 0
        for group in self.spec.groups:
            blocks = -(-num_tokens // bs)
            if group.is_sliding:
                chunk_start = max(0, num_tokens - max_chunk_tokens)
                blocks -= first_needed_block(chunk_start, group.sliding_window, bs)
            need += blocks
        return need <= self.pool.num_usable_blocks

    # --- prefix cache -----------------------------------------------------------------------------

    def _block_hashes(self, request: Sequence, num_blocks: int) -> list[bytes]:
        hashes = request.block_hashes
        bs = self.block_size
        while len(hashes) < num_blocks:
            i = len(hashes)
            parent = hashes[-1] if hashes else b""
            hashes.append(hash_block(parent, request.all_token_ids[i * bs : (i + 1) * bs]))
        return hashes

    def find_cached_prefix(self, request: Sequence) -> CachedPrefix:
        """Longest run of leading full blocks whose K/V every group can reuse (at least one token is left to compute)."""
        groups = self.spec.groups
        if not self.enable_prefix_caching:
            return CachedPrefix([[] for _ in groups], 0)
        max_blocks = (request.num_tokens - 1) // self.block_size
        hashes = self._block_hashes(request, max_blocks)
        full_run = 0  # leading blocks present in every full-attention group
        while full_run < max_blocks and all(
            self.pool.lookup((g, hashes[full_run])) is not None for g, grp in enumerate(groups) if not grp.is_sliding
        ):
            full_run += 1
        for num_hit in range(full_run, -1, -1):
            if all(self._window_cached(g, hashes, num_hit) for g, grp in enumerate(groups) if grp.is_sliding):
                break
        blocks = []
        for g, group in enumerate(groups):
            first = first_needed_block(num_hit * self.block_size, group.sliding_window, self.block_size) if group.is_sliding else 0
            blocks.append([self.pool.null_block] * first + [self.pool.lookup((g, hashes[i])) for i in range(first, num_hit)])
        return CachedPrefix(blocks, num_hit * self.block_size)

    def _window_cached(self, group_index: int, hashes: list[bytes], num_blocks: int) -> bool:
        window = self.spec.groups[group_index].sliding_window
        first = first_needed_block(num_blocks * self.block_size, window, self.block_size)
        return all(self.pool.lookup((group_index, hashes[i])) is not None for i in range(first, num_blocks))

    def _publish_computed_blocks(self, request: Sequence) -> None:
        """Put blocks whose every token has K/V into the prefix cache."""
        if not self.enable_prefix_caching:
            return
        tables, published = self.block_tables[request.request_id], self._num_published[request.request_id]
        num_full = request.num_computed_tokens // self.block_size
        if num_full <= min(published):  # no block filled up since the last call (most decode steps)
            return
        hashes = self._block_hashes(request, num_full)
        for g, table in enumerate(tables):
            for i in range(published[g], min(num_full, len(table))):
                self.pool.cache(table[i], (g, hashes[i]))
            published[g] = max(published[g], min(num_full, len(table)))

    # --- allocation -------------------------------------------------------------------------------

    def allocate_slots(self, request: Sequence, num_new_tokens: int, prefix: CachedPrefix | None = None) -> bool:
        """Make room for `num_new_tokens` more tokens of `request`; False (and nothing changed) if the pool is short.

        `prefix` (only for a request that holds no blocks yet) is a hit from `find_cached_prefix`;
        the caller then sets `request.num_computed_tokens = prefix.num_tokens`.
        """
        rid, bs = request.request_id, self.block_size
        if rid not in self.block_tables:
            prefix = prefix or CachedPrefix([[] for _ in self.spec.groups], 0)
            num_computed = prefix.num_tokens
            current = prefix.blocks
            reused = {id(b): b for table in prefix.blocks for b in table if not b.is_null}
            num_taken_from_free = sum(b.ref_count == 0 for b in reused.values())
        else:
            assert prefix is None, "a prefix hit only applies to a request without blocks"
            num_computed = request.num_computed_tokens
            self._publish_computed_blocks(request)
            self._trim_out_of_window(request)
            current, num_taken_from_free = self.block_tables[rid], 0

        num_blocks_after = -(-(num_computed + num_new_tokens) // bs)
        new_per_group = [max(0, num_blocks_after - len(table)) for table in current]
        if sum(new_per_group) + num_taken_from_free > self.pool.num_free_blocks:
            return False

        if rid not in self.block_tables:
            self.pool.touch(b for table in prefix.blocks for b in table)
            self.block_tables[rid] = [list(table) for table in prefix.blocks]
            num_prefix_blocks = prefix.num_tokens // bs
            self._num_published[rid] = [num_prefix_blocks] * len(self.spec.groups)
            self._num_trimmed[rid] = [sum(b.is_null for b in table) for table in prefix.blocks]
            self.prefix_query_tokens += request.num_tokens
            self.prefix_hit_tokens += prefix.num_tokens
        for table, n in zip(self.block_tables[rid], new_per_group):
            if n:
                table.extend(self.pool.allocate(n))
        return True

    def _trim_out_of_window(self, request: Sequence) -> None:
        """Sliding groups: swap blocks no query can reach any more for the null block and release them."""
        tables, trimmed = self.block_tables[request.request_id], self._num_trimmed[request.request_id]
        for g, group in enumerate(self.spec.groups):
            if not group.is_sliding:
                continue
            first = min(first_needed_block(request.num_computed_tokens, group.sliding_window, self.block_size), len(tables[g]))
            if first <= trimmed[g]:
                continue
            table = tables[g]
            dropped = table[trimmed[g] : first]
            table[trimmed[g] : first] = [self.pool.null_block] * len(dropped)
            self.pool.release(dropped)
            trimmed[g] = first

    def free(self, request: Sequence) -> None:
        """Release all of a request's blocks (finished, aborted or preempted); computed full ones stay cached."""
        rid = request.request_id
        if rid not in self.block_tables:
            return
        self._publish_computed_blocks(request)
        for table in self.block_tables.pop(rid):
            # Tail first: the front of a sequence is likelier to be shared, so it is evicted last.
            self.pool.release(reversed(table))
        del self._num_published[rid], self._num_trimmed[rid]

    def check_invariants(self) -> None:
        """Every block's ref_count equals the number of block tables holding it; pool state consistent."""
        self.pool.check_invariants()
        counts: dict[int, int] = {}
        for tables in self.block_tables.values():
            for table in tables:
                for block in table:
                    if not block.is_null:
                        counts[block.block_id] = counts.get(block.block_id, 0) + 1
        for block in self.pool.blocks[1:]:
            assert block.ref_count == counts.get(block.block_id, 0), (
                f"block {block.block_id}: ref_count {block.ref_count}, held by {counts.get(block.block_id, 0)} tables"
            )
