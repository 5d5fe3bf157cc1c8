"""Per-sequence sampling in one batched pass: greedy is the argmax, top-k and top-p keep the tokens they
should, a draw follows the distribution, a seed repeats its draws, log-probabilities are the model's."""
import math

import pytest
import torch

from moerun.serve.sampling import SamplingParams, sample

V = 16


def _logits(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, V, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_rows_take_the_argmax_beside_sampled_rows():
    logits = _logits(4)
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.0, seed=1)] * 2
    tokens, logprobs = sample(logits, params, [p.generator() for p in params])
    assert tokens[0] == logits[0].argmax().item() and tokens[2] == logits[2].argmax().item()
    assert logprobs == [None] * 4


def test_a_greedy_tie_takes_the_first_maximum():
    # generate(do_sample=False) takes torch's argmax, the first of equal maxima: a server that took
    # another would answer differently from transformers on the same logits.
    logits = torch.zeros(2, V)  # [2, V]
    logits[0, [3, 9]] = 5.0
    logits[1, [0, V - 1]] = 2.0
    params = [SamplingParams(temperature=0)] * 2
    tokens, _ = sample(logits, params, [p.generator() for p in params])
    assert tokens == [3, 0]


@pytest.mark.parametrize("params", [SamplingParams(temperature=2.0, top_k=1, seed=3),
                                    SamplingParams(temperature=2.0, top_p=1e-6, seed=3)])
def test_top_k_of_one_and_a_tiny_top_p_leave_only_the_most_likely(params):
    logits = _logits(3, seed=1)
    tokens, _ = sample(logits, [params] * 3, [params.generator() for _ in range(3)])
    assert tokens == logits.argmax(dim=-1).tolist()


def test_draws_follow_the_distribution_and_respect_top_k_and_top_p():
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1] + [0.0] * (V - 4))
    logits = probs.clamp_min(1e-30).log()[None].repeat(2000, 1)  # [2000, V]
    plain = SamplingParams(temperature=1.0, seed=5)
    gens = [torch.Generator().manual_seed(i) for i in range(2000)]
    counts = torch.bincount(torch.tensor(sample(logits, [plain] * 2000, gens)[0]), minlength=V)
    # Within 5 standard deviations of the expected counts, and never a token of probability 0.
    for p, c in zip(probs.tolist(), counts.tolist()):
        assert abs(c - 2000 * p) <= 5 * math.sqrt(2000 * p * (1 - p)) + 1e-9
    top2 = SamplingParams(temperature=1.0, top_k=2)
    assert set(sample(logits, [top2] * 2000, gens)[0]) == {0, 1}
    nucleus = SamplingParams(temperature=1.0, top_p=0.65)  # 0.4 + 0.3 reach it: two tokens
    assert set(sample(logits, [nucleus] * 2000, gens)[0]) == {0, 1}


def test_a_seed_repeats_its_draws_and_another_seed_does_not():
    logits = _logits(1, seed=2).repeat(20, 1) / 3  # a flat-ish distribution
    draws = {}
    for seed in (7, 7, 8):
        params = SamplingParams(temperature=1.0, seed=seed)
        gen = params.generator()
        draws.setdefault(seed, []).append([sample(logits[:1], [params], [gen])[0][0] for _ in range(20)])
    assert draws[7][0] == draws[7][1] != draws[8][0]


def test_logprobs_are_the_raw_distribution_with_the_top_alternatives():
    logits = _logits(2, seed=4)
    params = [SamplingParams(temperature=0.5, seed=1, logprobs=3), SamplingParams(temperature=0, logprobs=0)]
    tokens, logprobs = sample(logits, params, [p.generator() for p in params])
    logp = torch.log_softmax(logits, dim=-1)
    for row in range(2):
        assert logprobs[row].logprob == pytest.approx(logp[row, tokens[row]].item(), abs=1e-5)
    top = logp[0].topk(3)
    assert [i for i, _ in logprobs[0].top] == top.indices.tolist()
    assert logprobs[1].top == ()


@pytest.mark.parametrize("kwargs, words", [({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"),
                                           ({"top_k": -1}, "top_k"), ({"logprobs": 21}, "logprobs"),
                                           ({"temperature": float("nan")}, "temperature")])
def test_out_of_range_settings_are_refused(kwargs, words):
    with pytest.raises(ValueError, match=words):
        SamplingParams(**kwargs)
