"""The batched sampler and logits processors against hand-written references."""

import math

import pytest
import torch

from pagedllm.sample.logits_processors import apply_penalties, apply_top_k_top_p_min_p
from pagedllm.sample.metadata import SamplingMetadata
from pagedllm.sample.sampler import Sampler
from pagedllm.sampling_params import SamplingParams
from pagedllm.worker.input_batch import CachedRequestState, build_sampling_metadata

V = 50


def _state(params, prompt=(1, 2, 3), output=(), rid="r"):
    return CachedRequestState(rid, list(prompt), list(output), params, [0], 0)


def _md(params_list, prompts=None, outputs=None):
    states = [
        _state(p, prompts[i] if prompts else (1, 2, 3), outputs[i] if outputs else (), str(i))
        for i, p in enumerate(params_list)
    ]
    return build_sampling_metadata(states, V, torch.device("cpu"))


def test_penalties_match_reference():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, V, generator=g) * 3
    prompts = [[1, 2, 2, 7], [3], [4, 5]]
    outputs = [[7, 7, 9], [3, 3, 3, 11], []]
    params = [
        SamplingParams(repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.25),
        SamplingParams(repetition_penalty=0.8, frequency_penalty=-0.5),
        SamplingParams(presence_penalty=1.0),
    ]
    md = _md(params, prompts, outputs)
    got = apply_penalties(logits.clone(), md)
    ref = logits.clone()
    for i, p in enumerate(params):
        seen = set(prompts[i]) | set(outputs[i])
        for t in range(V):
            x = ref[i, t].item()
            if t in seen and p.repetition_penalty != 1.0:
                x = x / p.repetition_penalty if x > 0 else x * p.repetition_penalty
            c = outputs[i].count(t)
            x -= p.frequency_penalty * c + p.presence_penalty * (1 if c > 0 else 0)
            ref[i, t] = x
    torch.testing.assert_close(got, ref)


def _support(logits_row):
    return set(torch.nonzero(torch.isfinite(logits_row)).flatten().tolist())


@pytest.mark.parametrize("top_k,top_p,min_p", [(5, 1.0, 0.0), (0, 0.7, 0.0), (8, 0.5, 0.0),
                                               (0, 1.0, 0.2), (10, 0.9, 0.05)])
def test_top_k_top_p_min_p_support_is_exact(top_k, top_p, min_p):
    g = torch.Generator().manual_seed(top_k * 100 + int(top_p * 10))
    logits = torch.randn(4, V, generator=g) * 2
    n = logits.shape[0]
    got = apply_top_k_top_p_min_p(
        logits.clone(),
        torch.full((n,), top_k if top_k > 0 else V) if top_k else None,
        torch.full((n,), top_p) if top_p < 1 else None,
        torch.full((n,), min_p) if min_p > 0 else None,
    )
    for r in range(n):
        probs = torch.softmax(logits[r].double(), 0)
        keep = set(range(V))
        if min_p > 0:
            keep = {t for t in keep if probs[t] >= min_p * probs.max()}
        order = [t for t in torch.argsort(logits[r], descending=True).tolist() if t in keep]
        if top_k:
            order = order[:top_k]
        if top_p < 1:
            sub = torch.tensor([logits[r, t].item() for t in order], dtype=torch.float64)
            p = torch.softmax(sub, 0)
            kept, mass = [], 0.0
            for t, pt in zip(order, p.tolist()):
                if mass >= top_p and kept:
                    break
                kept.append(t)
                mass += pt
            order = kept
        assert _support(got[r]) == set(order)


def test_empirical_frequencies_match_probabilities():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05] + [1e-9] * (V - 4)]))
    params = SamplingParams(temperature=1.0, top_k=3)
    counts = torch.zeros(V)
    sampler = Sampler()
    n = 4000
    md = _md([params] * n)
    out = sampler(logits.expand(n, V).clone(), md).sampled_token_ids
    counts = torch.bincount(out, minlength=V).float() / n
    ref = torch.tensor([0.5, 0.3, 0.15]) / 0.95
    assert counts[3:].sum() == 0  # outside top-k never drawn
    assert torch.allclose(counts[:3], ref, atol=0.03)


def test_temperature_sharpens_distribution():
    logits = torch.log(torch.tensor([[0.6, 0.4] + [1e-9] * (V - 2)]))
    n = 4000
    md = _md([SamplingParams(temperature=0.5)] * n)
    out = Sampler()(logits.expand(n, V).clone(), md).sampled_token_ids
    frac0 = (out == 0).float().mean().item()
    ref = 0.36 / (0.36 + 0.16)  # p^(1/T) renormalised
    assert abs(frac0 - ref) < 0.03


def test_seeded_rows_are_batch_independent():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(5, V, generator=g)
    seeded = SamplingParams(temperature=1.0, seed=1234)
    alone = Sampler()(logits[2:3].clone(), _md([seeded])).sampled_token_ids.item()
    for _ in range(5):
        mixed = [SamplingParams(temperature=0.7), SamplingParams(temperature=0),
                 seeded, SamplingParams(top_p=0.5), SamplingParams(temperature=1.3, seed=9)]
        got = Sampler()(logits.clone(), _md(mixed)).sampled_token_ids[2].item()
        assert got == alone


def test_greedy_and_logprobs():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(2, V, generator=g)
    md = _md([SamplingParams(temperature=0, logprobs=3), SamplingParams(temperature=0)])
    out = Sampler()(logits.clone(), md)
    assert out.sampled_token_ids.tolist() == logits.argmax(-1).tolist()
    lp = out.logprobs
    ref = torch.log_softmax(logits, -1)
    assert lp.token_ids.shape == (2, 4)
    assert lp.ranks.tolist() == [1, 1]
    torch.testing.assert_close(lp.logprobs[:, 0], ref.max(-1).values)
    torch.testing.assert_close(lp.logprobs[:, 1:], ref.topk(3, -1).values)


def test_constraints_logit_bias_allowed_and_min_tokens():
    logits = torch.zeros(3, V)
    logits[:, 5] = 10.0
    p0 = SamplingParams(temperature=0, logit_bias={7: 100.0})
    p1 = SamplingParams(temperature=0, allowed_token_ids=[8, 9])
    p2 = SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[5])
    p2.all_stop_token_ids = {5}
    md = _md([p0, p1, p2])
    out = Sampler()(logits.clone(), md).sampled_token_ids.tolist()
    assert out[0] == 7
    assert out[1] in (8, 9)
    assert out[2] != 5


def test_bad_words_ban_only_after_prefix():
    logits = torch.zeros(2, V)
    logits[:, 6] = 5.0
    p = SamplingParams(temperature=0)
    p.bad_words_token_ids = [[4, 6]]
    md = _md([p, p], outputs=[[4], [3]])
    out = Sampler()(logits.clone(), md).sampled_token_ids.tolist()
    assert out[0] != 6 and out[1] == 6


def test_sampling_metadata_is_none_when_unused():
    md: SamplingMetadata = _md([SamplingParams(temperature=0)])
    assert md.all_greedy and md.top_p is None and md.top_k is None and md.min_p is None
    assert md.repetition_penalty is None and md.output_token_ids is None and md.banned is None


@pytest.mark.parametrize(
    "kwargs,field",
    [({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"top_p": 1.5}, "top_p"),
     ({"n": 0}, "n"), ({"max_tokens": 0}, "max_tokens"), ({"min_p": 2}, "min_p"),
     ({"presence_penalty": 3}, "presence_penalty"), ({"repetition_penalty": 0}, "repetition_penalty"),
     ({"logprobs": -1}, "logprobs"), ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
     ({"stop": [""]}, "stop")],
)
def test_invalid_params_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_model_dependent_checks():
    with pytest.raises(ValueError, match="logprobs"):
        SamplingParams(logprobs=21).verify_against_model(100, 20)
    with pytest.raises(ValueError, match="stop_token_ids"):
        SamplingParams(stop_token_ids=[100]).verify_against_model(100, 20)
    SamplingParams(logprobs=20).verify_against_model(100, 20)
    assert math.isclose(SamplingParams(logit_bias={1: 500}).logit_bias[1], 100.0)
