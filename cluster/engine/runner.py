"""Runs one scheduled step on the model: builds the flat batch, calls the paged forward, samples.

Letters: B sequences in the step, S new tokens (all sequences), R sampling rows.
"""

from __future__ import annotations

from typing import Callable

import torch

from cluster.engine.kv_cache import KVCacheManager
from cluster.engine.sampler import Sampler
from cluster.engine.scheduler import SchedulerOutput
from cluster.engine.request import TokenLogprobs
from cluster.model.paged import PagedBatch, PagedKVCache, paged_forward
from cluster.model.transformer import GptOssModel


class ModelRunner:
    def __init__(self, model: GptOssModel, kv_cache: KVCacheManager,
                 forward: Callable[[PagedBatch], torch.Tensor] | None = None):
        """`forward` replaces the local paged forward (and its cache): e.g. an expert-parallel
        group's driver (cluster/parallel/group.py), which keeps each rank's slice of the cache."""
        self.model = model
        self.kv_cache = kv_cache
        self.forward = forward
        self.sampler = Sampler()
        if forward is not None:
            return
        spec = kv_cache.spec
        locations = [spec.cache_location(layer) for layer in range(model.config.num_hidden_layers)]
        self.cache = PagedKVCache.allocate(
            kv_cache.pool.num_blocks, spec.block_size, spec.num_kv_heads, spec.head_dim,
            layer_group=[g for g, _ in locations], layer_tensor=[j for _, j in locations],
            dtype=model.dtype, device=model.device,
        )

    def prepare(self, output: SchedulerOutput) -> PagedBatch:
        # Plain Python lists, one tensor each at the end: a decode step has one token per
        # sequence, and per-token tensor ops would cost more than the lists.
        C = self.kv_cache.block_size
        num_groups = len(self.kv_cache.spec.groups)
        input_ids: list[int] = []
        positions: list[int] = []
        query_start, context_lens, logits_indices = [0], [], []
        tables: list[list[list[int]]] = [[] for _ in range(num_groups)]  # per group, per row
        slots: list[list[int]] = [[] for _ in range(num_groups)]  # per group, per token
        for chunk in output.chunks:
            seq, start, n = chunk.request, chunk.start, chunk.num_tokens
            if n == 1:
                input_ids.append(seq.token_id_at(start))
            else:
                input_ids.extend(seq.all_token_ids[start : start + n])
            positions.extend(range(start, start + n))
            query_start.append(query_start[-1] + n)
            context_lens.append(start + n)
            if chunk.samples:
                logits_indices.append(query_start[-1] - 1)
            for g, block_ids in enumerate(self.kv_cache.block_ids(seq.request_id)):
                tables[g].append(block_ids)
                slots[g].extend(block_ids[p // C] * C + p % C for p in range(start, start + n))

        device = self.model.device
        block_tables = []
        for group_tables in tables:
            width = max(len(t) for t in group_tables)
            block_tables.append(torch.tensor([t + [0] * (width - len(t)) for t in group_tables],
                                             dtype=torch.long, device=device))  # [B, W]
        return PagedBatch(
            input_ids=torch.tensor(input_ids, dtype=torch.long, device=device),
            positions=torch.tensor(positions, dtype=torch.long, device=device),
            query_start=query_start,
            context_lens=context_lens,
            slot_mapping=[torch.tensor(s, dtype=torch.long, device=device) for s in slots],  # per group [S]
            block_tables=block_tables,
            logits_indices=torch.tensor(logits_indices, dtype=torch.long, device=device),
        )

    def execute(self, output: SchedulerOutput) -> dict[str, tuple[int, TokenLogprobs | None]]:
        """Compute the step; returns request id -> (sampled token, logprobs) for each sampling chunk."""
        batch = self.prepare(output)
        if self.forward is not None:
            logits = self.forward(batch)  # [R, V]
        else:
            logits = paged_forward(self.model, batch, self.cache)  # [R, V]
        sampling = [c.request for c in output.chunks if c.samples]
        if not sampling:
            return {}
        result = self.sampler(logits, [s.sampling for s in sampling], [s.generator for s in sampling])
        return {s.request_id: (t, lp) for s, t, lp in zip(sampling, result.token_ids, result.logprobs)}
