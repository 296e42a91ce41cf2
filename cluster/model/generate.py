"""Plain decoding with a KV cache: prefill the prompt once, then one token per forward pass.

`decode_stream` is a synchronous generator (the serving engine drives it from a thread);
`greedy` collects it. A stop token, when produced, is yielded and ends the stream.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from cluster.model.transformer import GptOssModel
from cluster.model.unembedding import argmax_rows


def sample(logits: torch.Tensor, *, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
           generator: torch.Generator | None = None) -> int:
    """Pick one token id from logits [V]: argmax at temperature 0, else top-k / top-p sampling."""
    if temperature <= 0.0:
        return int(argmax_rows(logits.unsqueeze(0))[0])
    logits = logits.float() / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # keep the smallest prefix whose mass reaches top_p (always at least the first token)
        outside = torch.cumsum(sorted_probs, dim=-1) - sorted_probs >= top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        choice = torch.multinomial(sorted_probs, 1, generator=generator)
        return int(order[choice])
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.inference_mode()
def decode_stream(model: GptOssModel, prompt_ids: list[int], max_new_tokens: int, *, temperature: float = 0.0,
                  top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
                  stop_token_ids: Iterable[int] = ()) -> Iterator[int]:
    """Yield up to `max_new_tokens` token ids continuing `prompt_ids`, one at a time."""
    if not prompt_ids:
        raise ValueError("prompt_ids must not be empty")
    if max_new_tokens <= 0:
        return
    vocab = model.config.vocab_size
    if min(prompt_ids) < 0 or max(prompt_ids) >= vocab:
        raise ValueError(f"prompt token ids must be in 0..{vocab - 1}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    stops = frozenset(stop_token_ids)
    generator = None
    if temperature > 0.0:
        generator = torch.Generator(device=model.device)
        generator.manual_seed(seed if seed is not None else torch.seed())

    # The last sampled token never needs a forward pass, so the cache holds one less.
    cache = model.new_cache(len(prompt_ids) + max_new_tokens - 1)
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=model.device)  # [1, T]
    for step in range(max_new_tokens):
        logits = model(ids, cache, last_only=True)[0, -1]  # [V]
        token = sample(logits, temperature=temperature, top_p=top_p, top_k=top_k, generator=generator)
        yield token
        if token in stops or step == max_new_tokens - 1:
            return
        ids = torch.tensor([[token]], dtype=torch.long, device=model.device)


def greedy(model: GptOssModel, prompt_ids: list[int], max_new_tokens: int, stop_token_ids: Iterable[int] = ()) -> list[int]:
    """The argmax continuation of `prompt_ids` (including the stop token that ended it, if any)."""
    return list(decode_stream(model, prompt_ids, max_new_tokens, stop_token_ids=stop_token_ids))
