"""Pick the next token for each sampling row of a step: greedy, temperature, top-k, top-p, seeds, logprobs.

Letters: S rows to sample (one per request whose chunk reached its end), V vocabulary.
Every operation is row-wise, and the random draw of each row comes from that request's own
torch.Generator, so a seeded request gets the same tokens alone or in any batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from cluster.engine.bitmask import apply_bitmask
from cluster.engine.request import TokenLogprobs
from cluster.engine.sequence import SamplingSettings
from cluster.model.unembedding import argmax_rows

if TYPE_CHECKING:
    from cluster.engine.guided import GuidedRows


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
        guided: GuidedRows | None = None,
    ) -> SamplerOutput:
        """logits [S, V] (any float dtype) -> one token per row. The `guided` rows (structured
        output) only draw among the tokens their grammar allows (cluster/engine/guided.py): the
        masks computed during the forward are applied first; the other constrained rows are drawn
        from the unmasked logits and, only where the grammar refuses the token, masked and drawn
        again with the same race noise (the same token as masking first)."""
        logits = logits.float()
        S, V = logits.shape
        model_logits = logits  # logprobs report the model's own distribution, not the masked one
        races: dict[int, torch.Tensor] = {}

        def race(i: int) -> torch.Tensor:  # one draw per row and step, reused when a row is drawn again
            if i not in races:
                races[i] = torch.empty(V).exponential_(generator=generators[i]).clamp_(min=1e-30)
            return races[i]

        keep_model_logits = any(p.logprobs is not None for p in params)
        if guided is not None and guided.masked_rows:
            if keep_model_logits:
                logits = logits.clone()  # else masked in place: nothing reads the model's logits after this
            apply_bitmask(logits, guided.masked_rows, guided.masks())
        token_ids = self._draw(logits, range(S), params, race)
        if guided is not None and guided.checked_rows:
            redo = guided.refused(token_ids.tolist())
            if redo:
                if keep_model_logits and logits is model_logits:
                    logits = logits.clone()
                apply_bitmask(logits, redo, guided.bitmask(redo))
                token_ids[redo] = self._draw(logits, redo, params, race)

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

    @staticmethod
    def _draw(logits: torch.Tensor, rows, params: list[SamplingSettings], race) -> torch.Tensor:
        """The token of each of `rows` (of logits [S, V]): greedy rows take the argmax, the others win
        an exponential race (`race(i)`, row i's noise) over their temperature-scaled, truncated
        distribution."""
        S, V = logits.shape
        rows = list(rows)
        greedy = [k for k, i in enumerate(rows) if params[i].greedy]
        if len(greedy) == len(rows):  # all greedy: no row gather (a copy of [S, V]) when all rows are asked for
            return argmax_rows(logits if len(rows) == S else logits[rows])
        token_ids = torch.empty(len(rows), dtype=torch.long)
        if greedy:
            token_ids[greedy] = argmax_rows(logits[[rows[k] for k in greedy]])
        drawn = [k for k, i in enumerate(rows) if not params[i].greedy]
        random_rows = [rows[k] for k in drawn]
        chosen = [params[i] for i in random_rows]
        scaled = logits[random_rows] / torch.tensor([p.temperature for p in chosen]).unsqueeze(1)  # [R, V]
        if any(p.top_k > 0 or p.top_p < 1.0 for p in chosen):
            top_k = torch.tensor([p.top_k for p in chosen], dtype=torch.long)
            top_p = torch.tensor([p.top_p for p in chosen], dtype=torch.float32)
            scaled = apply_top_k_top_p(scaled, top_k, top_p)
        probs = scaled.softmax(dim=-1)  # [R, V]
        for row, (k, i) in enumerate(zip(drawn, random_rows)):
            # Exponential race: argmax p_v / E_v with E_v ~ Exp(1) draws v with probability p_v.
            token_ids[k] = (probs[row] / race(i)).argmax()
        return token_ids
