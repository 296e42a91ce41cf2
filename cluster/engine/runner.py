"""Runs one scheduled step on the model: builds the flat batch, calls the paged forward, samples.

Letters: B sequences in the step, S new tokens (all sequences), R sampling rows.
"""

from __future__ import annotations

import torch

from cluster.engine.kv_cache import KVCacheManager
from cluster.engine.sampler import Sampler
from cluster.engine.scheduler import SchedulerOutput
from cluster.engine.request import TokenLogprobs
from cluster.model.paged import PagedBatch, PagedKVCache, paged_forward
from cluster.model.transformer import GptOssModel


class ModelRunner:
    def __init__(self, model: GptOssModel, kv_cache: KVCacheManager):
        self.model = model
        self.kv_cache = kv_cache
        spec = kv_cache.spec
        locations = [spec.cache_location(layer) for layer in range(model.config.num_hidden_layers)]
        self.cache = PagedKVCache.allocate(
            kv_cache.pool.num_blocks, spec.block_size, spec.num_kv_heads, spec.head_dim,
            layer_group=[g for g, _ in locations], layer_tensor=[j for _, j in locations],
            dtype=model.dtype, device=model.device,
        )
        self.sampler = Sampler()

    def prepare(self, output: SchedulerOutput) -> PagedBatch:
        C = self.kv_cache.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        row_of_token: list[int] = []
        query_start, context_lens, logits_indices = [0], [], []
        tables: list[list[list[int]]] = [[] for _ in self.kv_cache.spec.groups]  # per group, per row
        for row, chunk in enumerate(output.chunks):
            seq, start, n = chunk.request, chunk.start, chunk.num_tokens
            if n == 1:
                input_ids.append(seq.token_id_at(start))
            else:
                input_ids.extend(seq.all_token_ids[start : start + n])
            positions.extend(range(start, start + n))
            row_of_token.extend([row] * n)
            query_start.append(query_start[-1] + n)
            context_lens.append(start + n)
            if chunk.samples:
                logits_indices.append(query_start[-1] - 1)
            for g, block_ids in enumerate(self.kv_cache.block_ids(seq.request_id)):
                tables[g].append(block_ids)

        device = self.model.device
        position_t = torch.tensor(positions, dtype=torch.long)  # [S]
        row_t = torch.tensor(row_of_token, dtype=torch.long)  # [S]
        block_tables, slot_mapping = [], []
        for group_tables in tables:
            width = max(len(t) for t in group_tables)
            table_t = torch.tensor([t + [0] * (width - len(t)) for t in group_tables], dtype=torch.long)  # [B, W]
            slots = table_t[row_t, position_t // C] * C + position_t % C  # [S]
            block_tables.append(table_t.to(device))
            slot_mapping.append(slots.to(device))
        return PagedBatch(
            input_ids=torch.tensor(input_ids, dtype=torch.long, device=device),
            positions=position_t.to(device),
            query_start=query_start,
            context_lens=context_lens,
            slot_mapping=slot_mapping,
            block_tables=block_tables,
            logits_indices=torch.tensor(logits_indices, dtype=torch.long, device=device),
        )

    def execute(self, output: SchedulerOutput) -> dict[str, tuple[int, TokenLogprobs | None]]:
        """Compute the step; returns request id -> (sampled token, logprobs) for each sampling chunk."""
        batch = self.prepare(output)
        logits = paged_forward(self.model, batch, self.cache)  # [R, V]
        sampling = [c.request for c in output.chunks if c.samples]
        if not sampling:
            return {}
        result = self.sampler(logits, [s.sampling for s in sampling], [s.generator for s in sampling])
        return {s.request_id: (t, lp) for s, t, lp in zip(sampling, result.token_ids, result.logprobs)}
