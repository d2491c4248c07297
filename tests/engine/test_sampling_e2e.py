"""Sampling parameters through the whole engine on SmolLM2: seeds, stop strings, n>1 with a
single prefill, prompt logprobs against HF, output kinds and validation."""

from __future__ import annotations

import pytest
import torch

from pagedllm import SamplingParams
from pagedllm.engine.detokenizer import IncrementalDetokenizer
from pagedllm.sampling_params import RequestOutputKind

PROMPT = "Once upon a time, in a small village by the sea,"


def _text(llm, prompt, **kw):
    out = llm.generate([prompt], SamplingParams(**kw), use_tqdm=False)[0]
    return out.outputs[0]


def test_seed_reproducible_alone_and_in_batches(smol_llm):
    p = SamplingParams(temperature=1.0, seed=42, max_tokens=16, ignore_eos=True)
    a = _text(smol_llm, PROMPT, temperature=1.0, seed=42, max_tokens=16, ignore_eos=True)
    b = _text(smol_llm, PROMPT, temperature=1.0, seed=42, max_tokens=16, ignore_eos=True)
    assert a.token_ids == b.token_ids
    others = [
        SamplingParams(temperature=0.7, top_p=0.9, max_tokens=10),
        SamplingParams(temperature=0, max_tokens=20),
        SamplingParams(temperature=1.2, top_k=20, seed=7, max_tokens=5),
    ]
    outs = smol_llm.generate(
        ["Hello there", PROMPT, "The weather today", PROMPT], [others[0], p, others[1], others[2]],
        use_tqdm=False,
    )
    assert outs[1].outputs[0].token_ids == a.token_ids
    diff = _text(smol_llm, PROMPT, temperature=1.0, seed=43, max_tokens=16, ignore_eos=True)
    assert diff.token_ids != a.token_ids


def test_n4_prefills_prompt_once(smol_llm):
    engine = smol_llm.llm_engine
    smol_llm.reset_prefix_cache()
    prompt = PROMPT * 6
    n_prompt = len(smol_llm.get_tokenizer().encode(prompt))
    before_tokens = engine.total_prompt_tokens_computed
    before_hits = engine.total_prefix_cache_hits
    out = smol_llm.generate(
        [prompt], SamplingParams(n=4, temperature=1.0, max_tokens=8, seed=1), use_tqdm=False
    )[0]
    assert [c.index for c in out.outputs] == [0, 1, 2, 3]
    assert all(len(c.token_ids) >= 1 for c in out.outputs)
    full_blocks = (n_prompt - 1) // 16 * 16
    assert engine.total_prefix_cache_hits - before_hits >= 3 * full_blocks
    # one full prefill plus at most one partial block per extra sample
    assert engine.total_prompt_tokens_computed - before_tokens <= n_prompt + 3 * 16
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1


def _greedy_tokens(llm, prompt, n):
    return _text(llm, prompt, temperature=0, max_tokens=n, ignore_eos=True)


def test_stop_strings(smol_llm):
    tok = smol_llm.get_tokenizer()
    base = _greedy_tokens(smol_llm, PROMPT, 24)
    pieces = [tok.decode(base.token_ids[: i + 1]) for i in range(len(base.token_ids))]
    # a boundary between tokens i and i+1 where both sides have at least 2 characters
    i = next(
        k for k in range(1, len(pieces) - 1)
        if len(pieces[k]) - len(pieces[k - 1]) >= 2 and len(pieces[k + 1]) - len(pieces[k]) >= 2
    )
    boundary = len(pieces[i])
    stop = base.text[boundary - 2 : boundary + 2]
    expected = base.text[: base.text.find(stop)]
    got = _text(smol_llm, PROMPT, temperature=0, max_tokens=24, ignore_eos=True, stop=[stop])
    assert got.text == expected and got.finish_reason == "stop" and got.stop_reason == stop
    inc = _text(smol_llm, PROMPT, temperature=0, max_tokens=24, ignore_eos=True, stop=[stop],
                include_stop_str_in_output=True)
    assert inc.text == expected + stop
    # stop inside the first generated token
    first = pieces[0]
    stop1 = first.strip()[-2:] if len(first.strip()) >= 2 else first
    got1 = _text(smol_llm, PROMPT, temperature=0, max_tokens=24, ignore_eos=True, stop=[stop1])
    assert got1.text == base.text[: base.text.find(stop1)]
    assert len(got1.token_ids) == 1


def test_stop_token_ids_and_min_tokens(smol_llm):
    base = _greedy_tokens(smol_llm, PROMPT, 12)
    target = base.token_ids[5]
    first = base.token_ids.index(target)
    got = _text(smol_llm, PROMPT, temperature=0, max_tokens=12, stop_token_ids=[target])
    assert got.finish_reason == "stop" and got.stop_reason == target
    assert got.token_ids == base.token_ids[: first + 1]
    # EOS suppressed until min_tokens
    eos = smol_llm.get_tokenizer().eos_token_id
    got = _text(smol_llm, "Say only: yes", temperature=0, max_tokens=30, min_tokens=20)
    assert len(got.token_ids) >= 20 and eos not in got.token_ids[:19]


def test_max_tokens_gives_length(smol_llm):
    got = _text(smol_llm, PROMPT, temperature=0, max_tokens=7, ignore_eos=True)
    assert len(got.token_ids) == 7 and got.finish_reason == "length" and got.stop_reason is None


def test_prompt_logprobs_match_hf(smol_llm, hf_smol):
    tok = smol_llm.get_tokenizer()
    ids = tok.encode(PROMPT)
    out = smol_llm.generate(
        [{"prompt_token_ids": ids}], SamplingParams(max_tokens=1, prompt_logprobs=3),
        use_tqdm=False,
    )[0]
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(ids)
    with torch.inference_mode():
        ref = torch.log_softmax(hf_smol(torch.tensor([ids])).logits[0].float(), -1)
    for j in range(1, len(ids)):
        entry = out.prompt_logprobs[j]
        assert ids[j] in entry
        assert abs(entry[ids[j]].logprob - ref[j - 1, ids[j]].item()) < 1e-3
        top = ref[j - 1].topk(3)
        for t, v in zip(top.indices.tolist(), top.values.tolist()):
            assert abs(entry[t].logprob - v) < 1e-3


def test_logprobs_have_ranks_and_tokens(smol_llm):
    got = _text(smol_llm, PROMPT, temperature=1.0, seed=3, max_tokens=6, logprobs=4)
    assert len(got.logprobs) == len(got.token_ids)
    for tid, lps in zip(got.token_ids, got.logprobs):
        assert tid in lps and lps[tid].rank >= 1 and lps[tid].decoded_token is not None
        assert len(lps) <= 5
    assert got.cumulative_logprob == pytest.approx(
        sum(lp[t].logprob for t, lp in zip(got.token_ids, got.logprobs)), abs=1e-4
    )


def test_delta_outputs_concatenate_to_final(smol_llm):
    engine = smol_llm.llm_engine
    params = SamplingParams(temperature=0, max_tokens=20, output_kind=RequestOutputKind.DELTA)
    engine.add_request("delta-1", PROMPT, params)
    pieces, tokens = [], []
    while engine.has_unfinished_requests():
        for o in engine.step():
            pieces.append(o.outputs[0].text)
            tokens.extend(o.outputs[0].token_ids)
    full = _greedy_tokens(smol_llm, PROMPT, 20)
    assert tokens == full.token_ids[: len(tokens)]
    assert "".join(pieces) == smol_llm.get_tokenizer().decode(tokens, skip_special_tokens=True)


def test_detokenizer_multibyte_never_emits_partial_characters(smol_llm):
    tok = smol_llm.get_tokenizer()
    text = "Grüße aus 東京 🎉 — naïve café"
    ids = tok.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, [1], SamplingParams())
    emitted = []
    for t in ids:
        detok.update([t])
        emitted.append(detok.get_next_output_text(finished=False, delta=True))
    assert all("\ufffd" not in e for e in emitted)
    assert "".join(emitted) == text


def test_invalid_requests_raise_value_error(smol_llm):
    with pytest.raises(ValueError, match="stop_token_ids"):
        smol_llm.generate(["hi"], SamplingParams(stop_token_ids=[10**7]), use_tqdm=False)
    with pytest.raises(ValueError, match="logprobs"):
        smol_llm.generate(["hi"], SamplingParams(logprobs=50), use_tqdm=False)
    with pytest.raises(ValueError, match="empty"):
        smol_llm.generate([{"prompt_token_ids": []}], SamplingParams(), use_tqdm=False)
    with pytest.raises(ValueError, match="priority scheduling is not enabled"):
        smol_llm.generate(["hi"], SamplingParams(max_tokens=1), use_tqdm=False, priority=[1])
    out = smol_llm.generate(["hi"], SamplingParams(max_tokens=1), use_tqdm=False, priority=[0])
    assert len(out[0].outputs[0].token_ids) == 1


def test_stop_string_with_multibyte_characters(smol_llm):
    tok = smol_llm.get_tokenizer()
    text = "Grüße aus 東京 🎉 und mehr"
    ids = tok.encode(text, add_special_tokens=False)
    for stop, include, expected in [("東京", False, "Grüße aus "), ("京 🎉", True, "Grüße aus 東京 🎉"),
                                    ("ße a", False, "Grü")]:
        params = SamplingParams(stop=[stop], include_stop_str_in_output=include)
        detok = IncrementalDetokenizer(tok, [1], params)
        hit, streamed = None, []
        for t in ids:
            hit = detok.update([t])
            streamed.append(detok.get_next_output_text(finished=hit is not None, delta=True))
            if hit is not None:
                break
        assert hit == stop
        assert detok.output_text == expected
        # nothing past (or, without include, inside) the stop string was ever streamed
        assert "".join(streamed) == expected


def test_priority_scheduling_policy(tmp_path):
    """--scheduling-policy priority: with one sequence at a time, requests run lowest
    priority value first (then arrival); LLM.generate takes one priority per prompt."""
    from transformers import LlamaConfig

    from pagedllm import LLM
    from pagedllm.model_executor.loader.testing import build_random_hf_model_dir

    config = LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=128, architectures=["LlamaForCausalLM"],
                         eos_token_id=None, bos_token_id=None)  # fmt: skip
    path = build_random_hf_model_dir(str(tmp_path / "tiny"), config, seed=0, std=0.2)
    llm = LLM(model=path, skip_tokenizer_init=True, dtype="float32", max_num_seqs=1,
              scheduling_policy="priority")  # fmt: skip
    engine = llm.llm_engine
    sp = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    for rid, prio in [("late", 2), ("first", -1), ("mid", 0), ("mid2", 0)]:
        engine.add_request(rid, {"prompt_token_ids": [5, 6, 7]}, sp, priority=prio)
    done = []
    while engine.has_unfinished_requests():
        done += [o.request_id for o in engine.step() if o.finished]
    assert done == ["first", "mid", "mid2", "late"]
    outs = llm.generate([{"prompt_token_ids": [9, 8]}] * 3, sp, use_tqdm=False,
                        priority=[3, 1, 2])  # fmt: skip
    assert [len(o.outputs[0].token_ids) for o in outs] == [3, 3, 3]
    with pytest.raises(ValueError, match="priority: got 1 values for 3 prompts"):
        llm.generate([{"prompt_token_ids": [9]}] * 3, sp, use_tqdm=False, priority=[1])
    with pytest.raises(ValueError, match="scheduling_policy must be"):
        LLM(model=path, skip_tokenizer_init=True, scheduling_policy="lifo")
