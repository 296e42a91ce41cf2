import math

import pytest
import torch

from cluster.engine.sequence import SamplingSettings
from cluster.engine.sampler import Sampler, apply_top_k_top_p
from cluster.model.unembedding import argmax_rows

V = 50


def logits_rows(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, V, generator=torch.Generator().manual_seed(seed)) * 3


def gens(*seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


@pytest.mark.parametrize("width", [201088, 1024 * 16, 1024 * 20 + 7])
def test_argmax_rows_is_torch_argmax_on_wide_rows_with_ties_and_nan(width):
    logits = torch.randn(6, width, generator=torch.Generator().manual_seed(width))
    logits[1, [7, width - 1]] = 100.0  # tie across blocks: the first wins
    logits[2, [width - 3, width - 1]] = 100.0  # tie inside the short last block
    logits[3, 5000] = float("nan")  # NaN wins, as in torch.argmax
    logits[4] = float("-inf")
    logits[5, width - 1] = 100.0
    assert argmax_rows(logits).tolist() == logits.argmax(dim=-1).tolist()
    assert argmax_rows(logits[[1, 3]]).tolist() == logits[[1, 3]].argmax(dim=-1).tolist()


def test_greedy_is_argmax():
    logits = logits_rows(4)
    out = Sampler()(logits, [SamplingSettings(temperature=0.0)] * 4, gens(0, 1, 2, 3))
    assert out.token_ids == logits.argmax(-1).tolist()
    assert out.logprobs == [None] * 4


@pytest.mark.parametrize("params", [SamplingSettings(top_k=1), SamplingSettings(top_p=1e-6)])
def test_top_k_1_and_tiny_top_p_reduce_to_greedy(params):
    logits = logits_rows(6)
    out = Sampler()(logits, [params] * 6, gens(*range(6)))
    assert out.token_ids == logits.argmax(-1).tolist()


def test_top_k_top_p_masks():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.5, 0.3, 0.15, 0.05]]))
    masked = apply_top_k_top_p(logits, torch.tensor([2, 0]), torch.tensor([1.0, 0.7]))
    assert torch.isfinite(masked).tolist() == [[True, True, False, False], [True, True, False, False]]
    masked = apply_top_k_top_p(logits, torch.tensor([0, 3]), torch.tensor([0.85, 1.0]))
    assert torch.isfinite(masked).tolist() == [[True, True, True, False], [True, True, True, False]]


def test_sampling_follows_the_distribution():
    probs = torch.tensor([0.5, 0.3, 0.2])
    logits = probs.log().repeat(4000, 1)
    out = Sampler()(logits, [SamplingSettings()] * 4000, [torch.Generator().manual_seed(i) for i in range(4000)])
    counts = torch.bincount(torch.tensor(out.token_ids), minlength=3).float() / 4000
    assert torch.allclose(counts, probs, atol=0.03), counts


def test_temperature_sharpens():
    logits = torch.log(torch.tensor([0.6, 0.4])).repeat(2000, 1)
    cold = Sampler()(logits, [SamplingSettings(temperature=0.25)] * 2000, [torch.Generator().manual_seed(i) for i in range(2000)])
    share = sum(t == 0 for t in cold.token_ids) / 2000
    expected = 0.6**4 / (0.6**4 + 0.4**4)  # p^(1/T) renormalised
    assert abs(share - expected) < 0.03


def test_seeded_row_is_the_same_alone_and_in_a_batch():
    logits = logits_rows(8, seed=3)
    params = SamplingSettings(temperature=0.9, top_k=20, top_p=0.9, seed=1234)
    alone = [Sampler()(logits[5:6], [params], gens(1234)).token_ids[0] for _ in range(3)]
    assert len(set(alone)) == 1
    mixed = [SamplingSettings(temperature=0.0), SamplingSettings(temperature=1.5), SamplingSettings(top_p=0.5)] * 2
    batch_params = mixed[:5] + [params] + mixed[5:]
    batch = Sampler()(logits[:7], batch_params, gens(*range(5), 1234, 99))
    assert batch.token_ids[5] == alone[0]
    # ... and over a whole sequence of draws from one generator
    g_alone, g_batch = gens(7, 7)
    seq_alone = [Sampler()(logits[i : i + 1], [params], [g_alone]).token_ids[0] for i in range(8)]
    seq_batch = [Sampler()(logits[[0, i]], [SamplingSettings(), params], [torch.Generator(), g_batch]).token_ids[1]
                 for i in range(8)]
    assert seq_alone == seq_batch


def test_logprobs_of_chosen_and_top_tokens():
    logits = logits_rows(2)
    out = Sampler()(logits, [SamplingSettings(temperature=0.0, logprobs=3), SamplingSettings(logprobs=0)], gens(0, 1))
    reference = logits.log_softmax(-1)
    first = out.logprobs[0]
    assert first.token_id == out.token_ids[0] and first.top_token_ids[0] == out.token_ids[0]
    assert list(first.top_token_ids) == reference[0].topk(3).indices.tolist()
    assert all(math.isclose(a, b, rel_tol=1e-5) for a, b in zip(first.top_logprobs, reference[0].topk(3).values.tolist()))
    second = out.logprobs[1]
    assert second.top_token_ids == () and math.isclose(second.logprob, reference[1, out.token_ids[1]].item(), rel_tol=1e-5)


def test_invalid_params_fail_fast_with_the_field_name():
    for kwargs, name in [({"max_tokens": 0}, "max_tokens"), ({"temperature": -1}, "temperature"),
                         ({"top_p": 0}, "top_p"), ({"top_k": -2}, "top_k"), ({"logprobs": -1}, "logprobs")]:
        with pytest.raises(ValueError, match=name):
            SamplingSettings(**kwargs)
