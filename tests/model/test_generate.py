"""decode_stream / greedy: KV-cache decoding, stop tokens, sampling controls."""

from __future__ import annotations

import pytest
import torch

from cluster.model.checkpoint import load_model
from cluster.model.generate import decode_stream, greedy


@pytest.fixture(scope="module")
def model(checkpoint_dir):
    return load_model(checkpoint_dir("tiny-small-vocab", True))


PROMPT = [5, 77, 300, 12, 999, 4, 4, 18, 640, 2]


def test_greedy_equals_argmax_of_full_recompute(model):
    tokens = greedy(model, PROMPT, 12)
    seq = list(PROMPT)
    for _ in range(12):  # no cache reuse: the whole sequence every step
        logits = model(torch.tensor([seq]), model.new_cache(len(seq)))
        seq.append(int(logits[0, -1].argmax()))
    assert tokens == seq[len(PROMPT):]


def test_stream_yields_one_token_at_a_time_and_stops(model):
    tokens = greedy(model, PROMPT, 20)
    stream = decode_stream(model, PROMPT, 20)
    assert next(stream) == tokens[0]
    assert list(stream) == tokens[1:]
    stop = tokens[5]
    first = tokens.index(stop)
    assert greedy(model, PROMPT, 20, stop_token_ids=[stop]) == tokens[: first + 1]  # the stop token is included
    assert greedy(model, PROMPT, 0) == []


def test_sampling_controls(model):
    kwargs = dict(temperature=1.0, seed=123)
    a = list(decode_stream(model, PROMPT, 16, **kwargs))
    assert a == list(decode_stream(model, PROMPT, 16, **kwargs))  # seeded: reproducible
    assert a != list(decode_stream(model, PROMPT, 16, temperature=1.0, seed=124))
    greedy_tokens = greedy(model, PROMPT, 16)
    assert list(decode_stream(model, PROMPT, 16, temperature=0.7, top_k=1, seed=1)) == greedy_tokens
    assert list(decode_stream(model, PROMPT, 16, temperature=0.7, top_p=1e-6, seed=1)) == greedy_tokens


def test_bad_arguments(model):
    with pytest.raises(ValueError):
        list(decode_stream(model, [], 4))
    with pytest.raises(ValueError):
        list(decode_stream(model, [1024], 4))
    with pytest.raises(ValueError):
        list(decode_stream(model, PROMPT, 4, temperature=1.0, top_p=0.0))
