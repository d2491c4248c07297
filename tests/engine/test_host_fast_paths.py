"""The host fast paths of the engine loop equal the general paths they shortcut (issue #16):
deferred detokenization vs token by token, the output processor's FINAL_ONLY path vs
`_process_one`, the scheduler's one-token update (`update_one`) vs `update_generation`."""

from __future__ import annotations

import random

import pytest

from pagedllm.engine.detokenizer import IncrementalDetokenizer
from pagedllm.engine.output_processor import OutputProcessor
from pagedllm.engine.protocol import EngineCoreOutput, FinishReason
from pagedllm.sampling_params import RequestOutputKind, SamplingParams


@pytest.fixture(scope="module")
def tokenizer():
    from pagedllm.model_executor.loader.resolve import default_model_path
    from pagedllm.tokenizer import get_tokenizer

    return get_tokenizer(default_model_path())


def _token_pool(tokenizer) -> list[int]:
    """Ordinary tokens, byte tokens (parts of multi-byte characters), special tokens."""
    vocab = tokenizer.get_vocab()
    byte_ids = [i for t, i in vocab.items() if t.startswith("Ã") or t.startswith("â")][:200]
    special = list(tokenizer.all_special_ids)
    return list(range(100, 3000)) + byte_ids * 5 + special * 3


@pytest.mark.parametrize("skip_special", [True, False])
def test_deferred_detokenization_equals_token_by_token(tokenizer, skip_special):
    rng = random.Random(7)
    pool = _token_pool(tokenizer)
    for trial in range(150):
        params = SamplingParams(max_tokens=64, skip_special_tokens=skip_special)
        prompt = [rng.choice(pool) for _ in range(rng.randint(1, 12))]
        out = [rng.choice(pool) for _ in range(rng.randint(1, 40))]
        if trial % 5 == 0:  # end inside a multi-byte character
            out += tokenizer.encode("é日本", add_special_tokens=False)[:-1]
        eager = IncrementalDetokenizer(tokenizer, prompt, params)
        deferred = IncrementalDetokenizer(tokenizer, prompt, params, defer=True)
        for i in range(0, len(out), 3):
            eager.update(out[i : i + 3])
            deferred.update(out[i : i + 3])
        assert deferred.output_text == ""  # nothing decoded yet
        assert deferred.get_next_output_text(True, False) == eager.get_next_output_text(
            True, False
        ), (prompt, out)
        assert deferred.token_ids == eager.token_ids == out


def test_stop_strings_are_never_deferred(tokenizer):
    params = SamplingParams(max_tokens=64, stop=["lo"])
    ids = tokenizer.encode("hello world", add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, [1], params, defer=True)
    hit = None
    for t in ids:
        hit = hit or detok.update([t])
    assert hit == "lo" and detok.output_text == "hel"


def _run(tokenizer, kind, fast: bool, seed: int):
    """Feeds the same random engine outputs (n=1 and n=2 requests, some finishing early,
    one aborted midway) to an output processor; returns what it emitted."""
    rng = random.Random(seed)
    proc = OutputProcessor(tokenizer)
    from pagedllm.engine.output_processor import ParentRequest

    ids = []
    for r in range(6):
        params = SamplingParams(max_tokens=20, output_kind=kind, n=2 if r % 3 == 0 else 1)
        prompt = [rng.randrange(100, 3000) for _ in range(5)]
        if params.n == 1:
            proc.add_request(str(r), str(r), None, prompt, params, 0.0)
            ids.append(str(r))
        else:
            parent = ParentRequest(str(r), 2, kind)
            for i in range(2):
                cid = parent.child_id(i)
                child = ParentRequest.child_params(params, i)
                proc.add_request(cid, str(r), None, prompt, child, 0.0, parent=parent, index=i)
                ids.append(cid)
    if not fast:
        for state in proc.requests.values():
            state.final_only_plain = False
            state.detokenizer._deferred = None
    emitted = []
    live = list(ids)
    for step in range(20):
        outs = []
        for rid in list(live):
            tok = rng.randrange(100, 3000)
            done = step == 19 or rng.random() < 0.08
            reason = FinishReason.LENGTH if done else None
            outs.append(EngineCoreOutput(rid, [tok], None, None, reason, None, 3))
            if done:
                live.remove(rid)
        if step == 10 and live:
            proc.abort_requests([live[0].split("_")[-1]])
        res = proc.process_outputs(outs, now=float(step))
        emitted.extend(
            (o.request_id, o.finished, [(c.index, c.text, list(c.token_ids), c.finish_reason)
                                        for c in o.outputs], o.num_cached_tokens,
             o.metrics.first_token_time, o.metrics.last_token_time)
            for o in res.request_outputs
        )
    return emitted


@pytest.mark.parametrize("kind", [RequestOutputKind.FINAL_ONLY, RequestOutputKind.DELTA,
                                  RequestOutputKind.CUMULATIVE])
def test_output_processor_fast_path_equals_general_path(tokenizer, kind):
    for seed in range(3):
        fast = _run(tokenizer, kind, True, seed)
        assert fast == _run(tokenizer, kind, False, seed)
        assert any(finished for _, finished, *_ in fast)


def test_scheduler_one_token_update_equals_the_general_update():
    """`update_one` (one token, no grammar or logprobs) and `update_generation` give the
    same output, status and stop reason, step by step, over random requests that end by
    max_tokens, the context end, EOS (after min_tokens, or never under ignore_eos) and stop
    token ids."""
    from pagedllm.core.output_update import update_generation, update_one
    from pagedllm.core.request import Request, RequestStatus
    from pagedllm.core.scheduler_output import ModelRunnerOutput

    rng = random.Random(3)
    mro = ModelRunnerOutput(req_ids=[], sampled_token_ids=[])
    reasons = set()
    for trial in range(300):
        eos = rng.choice([None, 2])
        params = SamplingParams(
            max_tokens=rng.randint(3, 30), min_tokens=rng.choice([0, 0, 3]),
            ignore_eos=rng.random() < 0.2, stop_token_ids=rng.choice([[], [5], [5, 7]]),
        )  # fmt: skip
        prompt = [rng.randrange(10, 50) for _ in range(rng.randint(1, 6))]
        max_len = len(prompt) + rng.randint(1, 40)
        pair = []
        for _ in range(2):
            req = Request(str(trial), list(prompt), params, eos, 0.0, block_size=4)
            req.max_tokens = params.max_tokens
            req.status = RequestStatus.RUNNING
            pair.append(req)
        fast, general = pair
        while fast.status is RequestStatus.RUNNING:
            tok = rng.choice([2, 5, 7] + list(range(10, 20)))
            for r in pair:
                r.num_computed_tokens = len(r.all_token_ids)
            got = update_one(fast, tok, max_len)
            want = update_generation(general, [tok], mro, max_len)
            assert got == want
            assert (fast.status, fast.stop_reason) == (general.status, general.stop_reason)
            assert fast.all_token_ids == general.all_token_ids
            assert fast.block_hashes == general.block_hashes
        reasons.add((fast.status, fast.stop_reason is not None))
    assert reasons >= {(RequestStatus.FINISHED_LENGTH_CAPPED, False),
                       (RequestStatus.FINISHED_STOPPED, False),
                       (RequestStatus.FINISHED_STOPPED, True)}  # fmt: skip
