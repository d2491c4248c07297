"""Grammar backends on the real SmolLM2 tokenizer: both libraries give the same masks'
meaning (the same accepted strings), the bitmask the sampler applies matches a reference,
and the manager's bookkeeping (cache, reasoning end, rollback)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pagedllm.sample.logits_processors import apply_token_bitmask, unpack_bitmask_torch
from pagedllm.sample.metadata import SamplingMetadata
from pagedllm.sampling_params import StructuredOutputsParams
from pagedllm.structured_output import StructuredOutputManager, grammar_spec
from pagedllm.structured_output.backend import backend_class
from tests.engine.conftest import smollm2_path


@pytest.fixture(scope="module")
def model_config():
    from pagedllm.engine.arg_utils import EngineArgs

    return EngineArgs(model=smollm2_path(), device="cpu").create_engine_config().model_config


@pytest.fixture(scope="module")
def tokenizer(model_config):
    from pagedllm.tokenizer import get_tokenizer

    return get_tokenizer(model_config)


def _walk(backend, tokenizer, spec, text: str, stop: int) -> tuple[bool, bool]:
    """Feeds `text` token by token, checking each token is allowed by the mask first;
    returns (all accepted, terminated after the stop token)."""
    matcher = backend.new_matcher(backend.compile(spec), [stop])
    words = -(-backend.vocab_size // 32)
    for tok in tokenizer.encode(text, add_special_tokens=False) + [stop]:
        mask = np.full((1, words), -1, dtype=np.int32)
        backend.fill_bitmask([matcher], mask)
        if not (int(mask[0, tok // 32]) >> (tok % 32)) & 1:
            return False, False
        if not matcher.accept_token(tok):
            return False, False
    return True, matcher.is_terminated()


@pytest.mark.parametrize("name", ["xgrammar", "guidance"])
def test_backend_accepts_exactly_the_language(name, model_config, tokenizer):
    backend = backend_class(name)(tokenizer, model_config.vocab_size)
    eos = tokenizer.eos_token_id
    schema = {"type": "object", "properties": {"a": {"type": "integer"},
                                               "b": {"type": "string"}}, "required": ["a", "b"]}
    spec = grammar_spec(StructuredOutputsParams(json=schema))
    assert _walk(backend, tokenizer, spec, '{"a":12,"b":"x y"}', eos) == (True, True)
    assert _walk(backend, tokenizer, spec, '{"a": 12, "b": "x"}', eos)[0] is False  # no spaces
    assert _walk(backend, tokenizer, spec, '{"a":1,"b":"x","c":2}', eos)[0] is False
    regex = grammar_spec(StructuredOutputsParams(regex=r"[a-c]{2}\d"))
    assert _walk(backend, tokenizer, regex, "ab7", eos) == (True, True)
    assert _walk(backend, tokenizer, regex, "ad7", eos)[0] is False
    with pytest.raises(ValueError):
        backend.validate(grammar_spec(StructuredOutputsParams(regex="a(b")))


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="must be one of auto, xgrammar, guidance"):
        backend_class("outlines")


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_token_bitmask_matches_a_reference(device):
    gen = torch.Generator().manual_seed(0)
    num_reqs, vocab = 5, 100  # vocab not a multiple of 32: the last word is partly padding
    logits = torch.randn(num_reqs, vocab, generator=gen)
    allowed = torch.rand(3, vocab, generator=gen) < 0.3
    rows = [4, 0, 2]
    words = -(-vocab // 32)
    packed = np.zeros((3, words), dtype=np.int64)
    for i in range(3):
        for t in range(vocab):
            if allowed[i, t]:
                packed[i, t // 32] |= 1 << (t % 32)
    bitmask = torch.from_numpy(packed.astype(np.uint32).view(np.int32))
    md = SamplingMetadata(temperature=torch.zeros(num_reqs), all_greedy=True, all_random=False,
                          top_p=None, top_k=None, min_p=None,
                          grammar_rows=torch.tensor(rows, device=device),
                          grammar_bitmask=bitmask.to(device))
    got = apply_token_bitmask(logits.clone().to(device), md).cpu()
    want = logits.clone()
    for i, r in enumerate(rows):
        want[r][~allowed[i]] = float("-inf")
    assert torch.equal(got, want)
    assert torch.equal(unpack_bitmask_torch(bitmask, vocab), allowed)  # the GPU path, on CPU
    # Every row in order: rows None.
    md.grammar_rows, md.grammar_bitmask = None, bitmask.to(device)
    got = apply_token_bitmask(logits[:3].clone().to(device), md).cpu()
    assert torch.equal(got, logits[:3].masked_fill(~allowed, float("-inf")))


def test_manager_caches_and_reasoning_end_defers_the_constraint(model_config, tokenizer):
    mgr = StructuredOutputManager(model_config)
    try:
        so = StructuredOutputsParams(choice=["yes", "no"])
        eos = tokenizer.eos_token_id
        a = mgr.new_request_grammar(so, [eos])
        b = mgr.new_request_grammar(StructuredOutputsParams(choice=["yes", "no"]), [eos])
        assert a.future is b.future and mgr.num_compiles == 1
        end = tokenizer.encode("</think>", add_special_tokens=False)
        think = StructuredOutputsParams(choice=["yes", "no"], reasoning_end=end)
        g = mgr.new_request_grammar(think, [eos])
        g.future.result(timeout=60)
        assert mgr.is_ready(g) and g.in_reasoning
        # While reasoning, anything goes and no bitmask row is made.
        for tok in tokenizer.encode("I think so", add_special_tokens=False) + end:
            assert g.accept(tok)
        assert not g.in_reasoning
        bm = mgr.grammar_bitmask(["r"], [g])
        allowed = {t for t in range(model_config.vocab_size)
                   if (int(bm.bitmask[0, t // 32]) >> (t % 32)) & 1}
        first = {tokenizer.encode(w, add_special_tokens=False)[0] for w in ("yes", "no")}
        assert first <= allowed and len(allowed) < 50
        toks = tokenizer.encode("yes", add_special_tokens=False)
        for t in toks:
            assert g.accept(t)
        n_out = g.num_reasoning + len(toks)
        # A matcher ahead of the request's output rolls back to it.
        g.sync_to(n_out - len(toks))
        assert g.num_accepted == 0
        assert not g.accept(tokenizer.encode("maybe", add_special_tokens=False)[0])
        assert all(g.accept(t) for t in toks) and g.accept(eos) and g.is_terminated
        bad = mgr.new_request_grammar(StructuredOutputsParams(grammar="root ::= nope"), [eos])
        bad.future.exception(timeout=60)
        assert mgr.is_ready(bad) and "failed to compile" in bad.error
    finally:
        mgr.shutdown()


def test_disable_additional_properties_closes_every_object():
    schema = {"type": "object", "properties": {"inner": {"type": "object", "properties": {}}},
              "additionalProperties": True}
    spec = grammar_spec(StructuredOutputsParams(json=schema, disable_additional_properties=True))
    closed = json.loads(spec.spec)
    assert closed["additionalProperties"] is True  # the schema's own choice stays
    assert closed["properties"]["inner"]["additionalProperties"] is False
