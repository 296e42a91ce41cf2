"""Pick the next token for each sampling row of a step: greedy, temperature, top-k, top-p, seeds, logprobs.

Letters: S rows to sample (one per request whose chunk reached its end), V vocabulary.
Every operation is row-wise, and the random draw of each row comes from that request's own
torch.Generator, so a seeded request gets the same tokens alone or in any batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cluster.engine.bitmask import apply_bitmask
from cluster.engine.request import TokenLogprobs
from cluster.engine.sequence import SamplingSettings
from cluster.model.unembedding import argmax_rows


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]  # None where the request did not ask for logprobs


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask to -inf what falls outside each row's top-k and nucleus. logits [S, V]; top_k [S] (0: off); top_p [S]."""
    S, V = logits.shape
    sorted_logits, sorted_ids = logits.sort(dim=-1, descending=True)  # [S, V]
    k = torch.where(top_k > 0, top_k.clamp(max=V), torch.full_like(top_k, V))
    kth_largest = sorted_logits.gather(1, (k - 1).unsqueeze(1))  # [S, 1]
    drop_sorted = sorted_logits < kth_largest
    sorted_probs = sorted_logits.masked_fill(drop_sorted, float("-inf")).softmax(dim=-1)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # probability of strictly more likely tokens
    drop_sorted |= mass_before > top_p.unsqueeze(1)  # the most likely token always survives (mass_before 0)
    drop = torch.zeros_like(drop_sorted).scatter_(1, sorted_ids, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


class Sampler:
    def __call__(
        self, logits: torch.Tensor, params: list[SamplingSettings], generators: list[torch.Generator],
        constrained: list[int] = (), bitmask: torch.Tensor | None = None,
    ) -> SamplerOutput:
        """logits [S, V] (any float dtype) -> one token per row. The `constrained` rows (structured
        output) only draw among the tokens their grammar allows: `bitmask` [len(constrained), V/32]
        holds their allowed tokens' bits (cluster/engine/guided.py)."""
        logits = logits.float()
        S, V = logits.shape
        model_logits = logits  # logprobs report the model's own distribution, not the masked one
        if constrained:
            if any(p.logprobs is not None for p in params):
                logits = logits.clone()  # else masked in place: nothing reads the model's logits after this
            apply_bitmask(logits, constrained, bitmask)
        greedy_rows = [i for i, p in enumerate(params) if p.greedy]
        if len(greedy_rows) == S:  # all greedy: no row gather (a copy of [S, V]), nothing to draw
            token_ids = argmax_rows(logits)
        else:
            token_ids = torch.empty(S, dtype=torch.long)
            if greedy_rows:
                token_ids[greedy_rows] = argmax_rows(logits[greedy_rows])
            random_rows = [i for i, p in enumerate(params) if not p.greedy]
            chosen = [params[i] for i in random_rows]
            scaled = logits[random_rows] / torch.tensor([p.temperature for p in chosen]).unsqueeze(1)  # [R, V]
            if any(p.top_k > 0 or p.top_p < 1.0 for p in chosen):
                top_k = torch.tensor([p.top_k for p in chosen], dtype=torch.long)
                top_p = torch.tensor([p.top_p for p in chosen], dtype=torch.float32)
                scaled = apply_top_k_top_p(scaled, top_k, top_p)
            probs = scaled.softmax(dim=-1)  # [R, V]
            for row, i in enumerate(random_rows):
                # Exponential race: argmax p_v / E_v with E_v ~ Exp(1) draws v with probability p_v.
                race = torch.empty(V).exponential_(generator=generators[i]).clamp_(min=1e-30)
                token_ids[i] = (probs[row] / race).argmax()

        tokens = token_ids.tolist()
        logprobs: list[TokenLogprobs | None] = [None] * S
        wanted = [i for i, p in enumerate(params) if p.logprobs is not None]
        if wanted:
            all_logprobs = model_logits[wanted].log_softmax(dim=-1)  # [W, V], of the model's own distribution
            for row, i in enumerate(wanted):
                n = min(params[i].logprobs, V)
                top_values, top_ids = all_logprobs[row].topk(n) if n else (torch.empty(0), torch.empty(0, dtype=torch.long))
                logprobs[i] = TokenLogprobs(
                    token_id=tokens[i],
                    logprob=all_logprobs[row, tokens[i]].item(),
                    top_token_ids=tuple(top_ids.tolist()),
                    top_logprobs=tuple(top_values.tolist()),
                )
        return SamplerOutput(tokens, logprobs)
