"""Runs one scheduled step on the model: builds the flat batch, calls the paged forward, unembeds, samples.

Letters: B sequences in the step, S new tokens (all sequences), R sampling rows.
"""

from __future__ import annotations

from typing import Callable

import torch

from cluster.engine.guided import GuidedRows
from cluster.engine.kv_cache import KVCacheManager
from cluster.engine.sampler import Sampler
from cluster.engine.scheduler import SchedulerOutput
from cluster.engine.request import TokenLogprobs
from cluster.engine.unembedding import Unembedding
from cluster.model.paged import PagedBatch, PagedKVCache, paged_hidden
from cluster.model.transformer import GptOssModel


class ModelRunner:
    def __init__(self, model: GptOssModel, kv_cache: KVCacheManager,
                 forward: Callable[[PagedBatch], torch.Tensor] | None = None):
        """`forward(batch) -> hidden [R, H]` replaces the local paged forward (and its cache): e.g. an
        expert-parallel group's driver (cluster/parallel/driver.py), which keeps each rank's slice of the cache."""
        self.model = model
        self.kv_cache = kv_cache
        self.forward = forward
        self.unembed = Unembedding(model.unembedding)
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
        # Plain Python lists, one tensor at the end: a decode step has one token per sequence,
        # and per-token tensor ops would cost more than the lists.
        C = self.kv_cache.block_size
        num_groups = len(self.kv_cache.spec.groups)
        input_ids: list[int] = []
        positions: list[int] = []
        query_start, context_lens, logits_indices = [0], [], []
        tables: list[list[list[int]]] = [[] for _ in range(num_groups)]  # per group, per row
        slots: list[list[int]] = [[] for _ in range(num_groups)]  # per group, per token
        for chunk in output.chunks:
            seq, start, n = chunk.request, chunk.start, chunk.num_tokens
            end = start + n
            if n == 1:  # decoding
                input_ids.append(seq.token_id_at(start))
                positions.append(start)
            else:
                input_ids.extend(seq.all_token_ids[start:end])
                positions.extend(range(start, end))
            query_start.append(query_start[-1] + n)
            context_lens.append(end)
            if chunk.samples:
                logits_indices.append(query_start[-1] - 1)
            for g, block_ids in enumerate(self.kv_cache.block_ids(seq.request_id)):
                tables[g].append(block_ids)
                if n == 1:
                    slots[g].append(block_ids[start // C] * C + start % C)
                else:
                    slots[g].extend(block_ids[p // C] * C + p % C for p in range(start, end))

        # Every integer of the step in one tensor (one host-to-device copy on a GPU), then views of it.
        widths = [max(len(t) for t in group_tables) for group_tables in tables]
        padded: list[int] = []  # the block tables, row after row, each padded with block 0 to its group's width
        for group_tables, width in zip(tables, widths):
            for t in group_tables:
                padded += t
                padded += [0] * (width - len(t))
        S, B = len(input_ids), len(context_lens)
        flat = torch.tensor(input_ids + positions + logits_indices + [s for group in slots for s in group] + padded,
                            dtype=torch.long).to(self.model.device)
        sizes = [S, S, len(logits_indices)] + [S] * num_groups + [B * w for w in widths]
        parts = flat.split(sizes)
        return PagedBatch(
            input_ids=parts[0],
            positions=parts[1],
            query_start=query_start,
            context_lens=context_lens,
            slot_mapping=list(parts[3 : 3 + num_groups]),  # per group [S]
            block_tables=[t.view(B, w) for t, w in zip(parts[3 + num_groups :], widths)],  # per group [B, W]
            logits_indices=parts[2],
        )

    def execute(self, output: SchedulerOutput) -> dict[str, tuple[int, TokenLogprobs | None]]:
        """Compute the step; returns request id -> (sampled token, logprobs) for each sampling chunk."""
        sampling = [c.request for c in output.chunks if c.samples]
        constrained = [i for i, s in enumerate(sampling) if s.guide is not None]
        guided = GuidedRows(constrained, [sampling[i].guide for i in constrained],
                            [sampling[i].num_tokens_left for i in constrained],
                            [sampling[i].sampling for i in constrained]) if constrained else None
        batch = self.prepare(output)
        if self.forward is not None:
            hidden = self.forward(batch)  # [R, H]
        else:
            hidden = paged_hidden(self.model, batch, self.cache)  # [R, H]
        with torch.inference_mode():
            logits = self.unembed(hidden)  # [R, V]
        if not sampling:
            return {}
        result = self.sampler(logits, [s.sampling for s in sampling], [s.generator for s in sampling], guided)
        return {s.request_id: (t, lp) for s, t, lp in zip(sampling, result.token_ids, result.logprobs)}
