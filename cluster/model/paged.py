"""The paged KV cache: the `AttentionCache` the serving engine hands the model.

The continuous-batching engine (cluster/engine/) hands over every token it wants computed this
step, sequence after sequence, as one flat list; each token carries its position. New keys and
values go to cache *slots* (block_id * block_size + offset) given by a slot mapping; attention reads
a sequence's earlier keys through its block table. The forward is the model's own
(`GptOssModel.run_blocks`: the same blocks, YaRN tables, sinks and windows as the plain decode
loop); this file only says where K/V live and which of them each query reads.

Shape letters as in layers.py, plus: S new tokens in the step (all sequences), R rows whose logits
are wanted, P physical blocks, C block size, M blocks gathered per sequence, Q queries of one
sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cluster.model.attention import Attention, oldest_visible_key, sink_attention, visible_keys
from cluster.model.transformer import GptOssModel


@dataclass
class PagedKVCache:
    """K and V tensors [P, C, K, D]; layer l keeps its K/V in tensor `layer_tensor[l]` and reads
    it through the block tables of group `layer_group[l]` (block ids never overlap across groups)."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    layer_group: list[int]
    layer_tensor: list[int]

    @classmethod
    def allocate(cls, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int, layer_group: list[int],
                 layer_tensor: list[int], dtype: torch.dtype, device: torch.device | str = "cpu") -> PagedKVCache:
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        n = max(layer_tensor) + 1
        k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n)]
        v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n)]
        return cls(k, v, list(layer_group), list(layer_tensor))

    @property
    def block_size(self) -> int:
        return self.k[0].shape[1]

    def layers(self, batch: PagedBatch, plan: StepPlan) -> list[PagedLayerCache]:
        """Each layer's view of the cache for this step."""
        return [PagedLayerCache(self.k[j], self.v[j], batch.slot_mapping[g], batch.block_tables[g], plan)
                for g, j in zip(self.layer_group, self.layer_tensor)]


@dataclass
class PagedBatch:
    """One step's tokens. Sequence b owns flat tokens query_start[b] .. query_start[b+1]-1, and
    after this step it has context_lens[b] tokens cached (its last new token at context_lens[b]-1)."""

    input_ids: torch.Tensor  # [S] long
    positions: torch.Tensor  # [S] long
    query_start: list[int]  # B + 1 offsets into S
    context_lens: list[int]  # B
    slot_mapping: list[torch.Tensor]  # per group [S] long: where each new token's K/V go
    block_tables: list[torch.Tensor]  # per group [B, max blocks] long, padded with block 0
    logits_indices: torch.Tensor  # [R] long: flat rows whose logits are returned


@torch.inference_mode()
def paged_hidden(model: GptOssModel, batch: PagedBatch, cache: PagedKVCache) -> torch.Tensor:
    """Run the step, writing its K/V into `cache`; returns the normed hidden states [R, H] of
    `logits_indices` (the unembedding is the caller's: see cluster/engine/unembedding.py)."""
    max_position = max(batch.context_lens)
    cos_table, sin_table = model.rope.ensure(max_position, model.dtype)
    plan = StepPlan(batch, cache.block_size)
    if plan.lone_decode:  # one token, at the end of its context: slices, not gathers
        cos, sin = cos_table[max_position - 1 : max_position], sin_table[max_position - 1 : max_position]
    else:
        cos, sin = cos_table[batch.positions], sin_table[batch.positions]  # [S, D/2]
    x = model.run_blocks(batch.input_ids, cos, sin, cache.layers(batch, plan))  # [S, H]
    if len(batch.logits_indices) != len(x):  # else every token samples (a decode step): all rows, in order
        x = x[batch.logits_indices]  # [R, H]
    return model.norm(x)  # [R, H]


@dataclass
class _DecodeKeys:
    """Where the decode rows' keys come from: `physical` blocks [Bd, M] to gather, then either the
    positions each query sees among the gathered M*C keys (`visible` [Bd, 1, M*C]), or, for a lone
    sequence, the one run of gathered keys it sees (`span`, every key in it visible: no mask)."""

    physical: torch.Tensor
    visible: torch.Tensor | None
    span: slice


class StepPlan:
    """Per-step bookkeeping shared by all layers: which sequences decode (one query) and which prefill."""

    def __init__(self, batch: PagedBatch, block_size: int):
        starts, ends = batch.query_start[:-1], batch.query_start[1:]
        self.decode_rows = [b for b, (s, e) in enumerate(zip(starts, ends)) if e - s == 1]
        self.prefill_rows = [b for b, (s, e) in enumerate(zip(starts, ends)) if e - s > 1]
        self.query_start = batch.query_start
        self.context_lens = batch.context_lens
        self.block_size = block_size
        self.all_decode = not self.prefill_rows
        self.lone_decode = self.all_decode and len(self.decode_rows) == 1  # one user alone
        if self.decode_rows:
            if not self.all_decode:
                self.decode_tokens = torch.tensor([starts[b] for b in self.decode_rows])  # [Bd] flat index of each query
            self.decode_context = [batch.context_lens[b] for b in self.decode_rows]  # [Bd]
        self._decode_keys: dict[tuple[int, int], _DecodeKeys] = {}

    def decode_keys(self, window: int, block_tables: torch.Tensor) -> _DecodeKeys:
        """The decode rows' keys, computed once per step for each (window, block table) pair, from
        Python ints (a decode batch is small, and a handful of tiny tensor ops would cost more).

        Full layers read every block; window layers only the last blocks the window can reach.
        """
        key = (window, id(block_tables))
        if key not in self._decode_keys:
            make = self._lone_keys if self.lone_decode else self._masked_keys
            self._decode_keys[key] = make(window, block_tables)
        return self._decode_keys[key]

    def _lone_keys(self, window: int, block_tables: torch.Tensor) -> _DecodeKeys:
        """One user alone: gather just the blocks its visible keys sit in and slice those keys out,
        so no mask is built or applied."""
        C, n = self.block_size, self.decode_context[0]
        oldest = oldest_visible_key(n - 1, window)
        first = oldest // C
        physical = block_tables[:, first : (n - 1) // C + 1]  # [1, M]
        return _DecodeKeys(physical, None, slice(oldest - first * C, n - first * C))

    def _masked_keys(self, window: int, block_tables: torch.Tensor) -> _DecodeKeys:
        """Every decode row reads the same number of blocks M; a mask marks the keys each one sees."""
        C = self.block_size
        last_blocks = [(n - 1) // C for n in self.decode_context]
        # A window may straddle one more block boundary than it spans.
        M = (window - 1) // C + 2 if window else max(last_blocks) + 1
        first = torch.tensor([last - M + 1 for last in last_blocks]).unsqueeze(1)  # [Bd, 1], < 0 near the start
        logical = first + torch.arange(M)  # [Bd, M]
        tables = block_tables if self.all_decode else block_tables[self.decode_rows]  # [Bd, max blocks]
        physical = tables.gather(1, logical.clamp(min=0))  # [Bd, M]
        key_pos = first * C + torch.arange(M * C)  # [Bd, M*C]; negative: clamped duplicates of block 0
        oldest = torch.tensor([[oldest_visible_key(n - 1, window)] for n in self.decode_context])  # [Bd, 1]
        newest = torch.tensor([[n - 1] for n in self.decode_context])  # [Bd, 1]
        visible = (key_pos >= oldest) & (key_pos <= newest)
        return _DecodeKeys(physical, visible.unsqueeze(1), slice(None))


def _attend(attn: Attention, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
            visible: torch.Tensor | None) -> torch.Tensor:
    """q [B, Q, N, D], keys/values [B, L, K, D] (the cache's layout), visible [B, Q, L] bool (None: all) -> [B, Q, N*D]."""
    B, Q, L = q.shape[0], q.shape[1], keys.shape[1]
    mask = None if visible is None else visible.view(B, 1, 1, Q, L)
    return sink_attention(q.permute(0, 2, 1, 3), keys.transpose(1, 2), values.transpose(1, 2), attn.sinks,
                          attn.sm_scale, mask)


class PagedLayerCache:
    """An `AttentionCache` over one layer's paged K/V for one step: decode rows read their blocks in
    one gather (the step's `StepPlan` says which), each prefill chunk reads its own blocks."""

    def __init__(self, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                 block_tables: torch.Tensor, plan: StepPlan):
        self.k_cache, self.v_cache = k_cache, v_cache  # [P, C, K, D]
        self.slot_mapping, self.block_tables, self.plan = slot_mapping, block_tables, plan

    def attend(self, attn: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [N, S, D], k [K, S, D], v [S, K, D] -> [S, N*D]."""
        q, k = q.transpose(0, 1), k.transpose(0, 1)  # [S, N, D], [S, K, D]
        S, N, D = q.shape
        K, plan = k.shape[1], self.plan
        C = plan.block_size
        k_cache, v_cache = self.k_cache, self.v_cache
        k_cache.view(-1, K, D).index_copy_(0, self.slot_mapping, k)
        v_cache.view(-1, K, D).index_copy_(0, self.slot_mapping, v)

        window = attn.window
        out = None if plan.all_decode else torch.empty(S, N * D, dtype=q.dtype, device=q.device)
        if plan.decode_rows:
            decode = plan.decode_keys(window, self.block_tables)
            Bd, M = decode.physical.shape
            keys = k_cache.index_select(0, decode.physical.view(-1)).view(Bd, M * C, K, D)[:, decode.span]
            values = v_cache.index_select(0, decode.physical.view(-1)).view(Bd, M * C, K, D)[:, decode.span]
            if plan.all_decode:  # every sequence brings one token: no gather from q, no scatter into `out`
                return _attend(attn, q.unsqueeze(1), keys, values, decode.visible).squeeze(1)
            rows = plan.decode_tokens
            out[rows] = _attend(attn, q[rows].unsqueeze(1), keys, values, decode.visible).squeeze(1)
        for b in plan.prefill_rows:
            first, last = plan.query_start[b], plan.query_start[b + 1]
            out[first:last] = self._prefill(attn, b, q[first:last])
        return out

    def _prefill(self, attn: Attention, b: int, q: torch.Tensor) -> torch.Tensor:
        """Sequence b's chunk of Q queries [Q, N, D] over its cached keys -> [Q, N*D]."""
        C, K, D = self.plan.block_size, self.k_cache.shape[2], self.k_cache.shape[3]
        context = self.plan.context_lens[b]
        start = context - q.shape[0]  # position of the first query
        lo = oldest_visible_key(start, attn.window)  # oldest key any query can see
        first_block, num_blocks = lo // C, (context - 1) // C + 1 - lo // C
        physical = self.block_tables[b, first_block : first_block + num_blocks]  # [M]
        keys = self.k_cache[physical].view(1, num_blocks * C, K, D)
        values = self.v_cache[physical].view(1, num_blocks * C, K, D)
        q_pos = torch.arange(start, context).unsqueeze(1)  # [Q, 1]
        key_pos = (first_block * C + torch.arange(num_blocks * C)).unsqueeze(0)  # [1, M*C]
        visible = visible_keys(q_pos, key_pos, attn.window)
        return _attend(attn, q.unsqueeze(0), keys, values, visible.unsqueeze(0)).squeeze(0)
