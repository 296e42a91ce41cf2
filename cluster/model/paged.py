"""gpt-oss over a paged KV cache: one flat forward for a ragged batch of sequences.

The continuous-batching engine (cluster/engine/) hands over every token it wants computed this
step, sequence after sequence, as one flat list; each token carries its position. New keys and
values go to cache *slots* (block_id * block_size + offset) given by a slot mapping; attention reads
a sequence's earlier keys through its block table. The math is the model's own: the same modules
and weights (`GptOssModel.blocks`), YaRN tables (`model.rope`), sinks, sliding window and
`apply_rotary`; only where K/V live and how they are gathered differs from attention.py.

Shape letters as in layers.py, plus: S new tokens in the step (all sequences), R rows whose logits
are wanted, P physical blocks, C block size, M blocks gathered per sequence, Q queries of one
sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cluster.model.attention import Attention
from cluster.model.layers import apply_rotary
from cluster.model.transformer import GptOssModel
from cluster.model.unembedding import unembed


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
def paged_forward(model: GptOssModel, batch: PagedBatch, cache: PagedKVCache) -> torch.Tensor:
    """Run the step, writing its K/V into `cache`; returns float32 logits [R, V] for `logits_indices`."""
    return unembed(model.unembedding, paged_hidden(model, batch, cache))  # [R, V]


@torch.inference_mode()
def paged_hidden(model: GptOssModel, batch: PagedBatch, cache: PagedKVCache) -> torch.Tensor:
    """paged_forward up to the unembedding: the normed hidden states [R, H] of `logits_indices`."""
    max_position = max(batch.context_lens)
    cos_table, sin_table = model.rope.ensure(max_position, model.dtype)
    plan = _AttentionPlan(batch, cache.block_size)
    if plan.lone_decode:  # one token, at the end of its context: slices, not gathers
        cos, sin = cos_table[max_position - 1 : max_position], sin_table[max_position - 1 : max_position]
    else:
        cos, sin = cos_table[batch.positions], sin_table[batch.positions]  # [S, D/2]
    x = model.embedding(batch.input_ids)  # [S, H]
    for layer, block in enumerate(model.blocks):
        g, j = cache.layer_group[layer], cache.layer_tensor[layer]
        h = _paged_attention(block.attn, block.attn_norm(x), cache.k[j], cache.v[j], batch.slot_mapping[g],
                             batch.block_tables[g], plan, cos, sin)
        x = x + h
        x = x + block.mlp(block.mlp_norm(x))
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


class _AttentionPlan:
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
        oldest = max(0, n - window) if window else 0
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
        oldest = torch.tensor([[max(0, n - window) if window else 0] for n in self.decode_context])  # [Bd, 1]
        newest = torch.tensor([[n - 1] for n in self.decode_context])  # [Bd, 1]
        visible = (key_pos >= oldest) & (key_pos <= newest)
        return _DecodeKeys(physical, visible.unsqueeze(1), slice(None))


def _attend(attn: Attention, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
            visible: torch.Tensor | None) -> torch.Tensor:
    """q [B, Q, N, D], keys/values [B, L, K, D], visible [B, Q, L] bool (None: all) -> [B, Q, N*D], with sinks."""
    B, Q, N, D = q.shape
    L, K = keys.shape[1], keys.shape[2]
    G = N // K
    q = q.permute(0, 2, 1, 3).reshape(B, K, G * Q, D)  # query head n = kv head n // G
    scores = torch.matmul(q, keys.permute(0, 2, 3, 1)) * attn.sm_scale  # [B, K, G*Q, L]
    scores = scores.view(B, K, G, Q, L)
    if visible is not None:
        scores = scores.masked_fill(~visible.view(B, 1, 1, Q, L), float("-inf"))
    sinks = attn.sinks.to(scores.dtype).view(1, K, G, 1, 1).expand(B, K, G, Q, 1)
    probs = torch.softmax(torch.cat((scores, sinks), dim=-1), dim=-1)[..., :-1]  # [B, K, G, Q, L]
    y = torch.matmul(probs.reshape(B, K, G * Q, L), values.transpose(1, 2))  # [B, K, G*Q, D]
    return y.view(B, K, G, Q, D).permute(0, 3, 1, 2, 4).reshape(B, Q, N * D)


def _paged_attention(attn: Attention, x: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     slot_mapping: torch.Tensor, block_tables: torch.Tensor, plan: _AttentionPlan,
                     cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [S, H] -> [S, H]: project, rotate, store the new K/V, attend over each sequence's cache."""
    S = x.shape[0]
    N, K, D, C = attn.num_heads, attn.num_kv_heads, attn.head_dim, plan.block_size
    qk, v = attn.qkv(x).split(((N + K) * D, K * D), dim=-1)
    qk = apply_rotary(qk.view(S, N + K, D).transpose(0, 1), cos, sin).transpose(0, 1)  # q and k heads at once
    q, k = qk.split((N, K), dim=1)  # [S, N, D], [S, K, D]
    k_cache.view(-1, K, D).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, K, D).index_copy_(0, slot_mapping, v.view(S, K, D))

    window = attn.window
    out = None if plan.all_decode else torch.empty(S, N * D, dtype=x.dtype, device=x.device)
    if plan.decode_rows:
        decode = plan.decode_keys(window, block_tables)
        Bd, M = decode.physical.shape
        keys = k_cache.index_select(0, decode.physical.view(-1)).view(Bd, M * C, K, D)[:, decode.span]
        values = v_cache.index_select(0, decode.physical.view(-1)).view(Bd, M * C, K, D)[:, decode.span]
        if plan.all_decode:  # every sequence brings one token: no gather from q, no scatter into `out`
            return attn.out(_attend(attn, q.unsqueeze(1), keys, values, decode.visible).squeeze(1))
        rows = plan.decode_tokens
        out[rows] = _attend(attn, q[rows].unsqueeze(1), keys, values, decode.visible).squeeze(1)
    for b in plan.prefill_rows:
        first, last = plan.query_start[b], plan.query_start[b + 1]
        context = plan.context_lens[b]
        start = context - (last - first)  # position of the first query
        lo = max(0, start - window + 1) if window else 0  # oldest key any query can see
        first_block, num_blocks = lo // C, (context - 1) // C + 1 - lo // C
        physical = block_tables[b, first_block : first_block + num_blocks]  # [M]
        keys = k_cache[physical].view(1, num_blocks * C, K, D)
        values = v_cache[physical].view(1, num_blocks * C, K, D)
        q_pos = torch.arange(start, context).unsqueeze(1)  # [Q, 1]
        key_pos = (first_block * C + torch.arange(num_blocks * C)).unsqueeze(0)  # [1, M*C]
        visible = key_pos <= q_pos
        if window:
            visible &= q_pos - key_pos < window
        out[first:last] = _attend(attn, q[first:last].unsqueeze(0), keys, values, visible.unsqueeze(0)).squeeze(0)
    return attn.out(out)
