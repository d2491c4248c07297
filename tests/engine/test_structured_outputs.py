"""Structured outputs in the engine (offline `LLM`, the real SmolLM2 model): validity under
sampling and n > 1, grammar termination, stop strings, logprobs, prefix caching, a mixed
batch, async scheduling, requests waiting on a compile, and matcher rollback under forced
preemption."""

from __future__ import annotations

import json
import re
import threading

import pytest

from pagedllm import LLM, SamplingParams, StructuredOutputsParams
from pagedllm.sampling_params import StructuredOutputsParams as SOFromModule
from tests.engine.conftest import smollm2_path

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 10},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "pets": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 2}},
    "required": ["name", "age", "pets"]}
PROMPTS = ["Describe a person as JSON.", "Give me a user record.", "A JSON object please:",
           "Write JSON for a pet owner."]


def _json(max_tokens: int = 90, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=kw.pop("temperature", 0),
                          structured_outputs=StructuredOutputsParams(json=SCHEMA), **kw)


def _valid(text: str) -> dict:
    obj = json.loads(text)
    assert set(obj) == {"name", "age", "pets"} and 0 <= obj["age"] <= 120
    assert len(obj["name"]) <= 10 and len(obj["pets"]) <= 2
    assert ": " not in text and ", " not in re.sub(r'"(?:[^"\\]|\\.)*"', '""', text)
    return obj


def _texts(llm: LLM, prompts, params) -> list[str]:
    return [o.outputs[0].text for o in llm.generate(prompts, params, use_tqdm=False)]


def test_exported_like_vllm():
    assert StructuredOutputsParams is SOFromModule
    with pytest.raises(ValueError, match="exactly one of .*got json and regex"):
        StructuredOutputsParams(json=SCHEMA, regex="a+")
    with pytest.raises(ValueError, match="got none"):
        StructuredOutputsParams()


def test_json_under_sampling_n3_ends_with_stop(smol_llm):
    out = smol_llm.generate(PROMPTS[:2], _json(120, temperature=1.3, n=3, seed=5),
                            use_tqdm=False)
    texts = set()
    for o in out:
        for c in o.outputs:
            assert c.finish_reason == "stop", c.text
            _valid(c.text)
            texts.add(c.text)
    assert len(texts) > 3


def test_choice_regex_grammar_and_ignore_eos(smol_llm):
    choice = SamplingParams(max_tokens=10, temperature=1.0, n=4, seed=1, structured_outputs=(
        StructuredOutputsParams(choice=["red", "green", "blue \"sky\""])))
    got = [c.text for c in smol_llm.generate(["Colour:"], choice, use_tqdm=False)[0].outputs]
    assert set(got) <= {"red", "green", "blue \"sky\""}
    regex = SamplingParams(max_tokens=20, temperature=1.0, ignore_eos=True,
                           structured_outputs=StructuredOutputsParams(regex=r"[A-Z]{2}-\d{3}"))
    out = smol_llm.generate(["Code:"], regex, use_tqdm=False)[0].outputs[0]
    # The grammar's end is the request's end, even with ignore_eos.
    assert re.fullmatch(r"[A-Z]{2}-\d{3}", out.text) and out.finish_reason == "stop"
    ebnf = 'root ::= "(" [0-9] [0-9]? " + " [0-9] ")"'
    grammar = SamplingParams(max_tokens=20, temperature=0.8, seed=2,
                             structured_outputs=StructuredOutputsParams(grammar=ebnf))
    assert re.fullmatch(r"\(\d{1,2} \+ \d\)", _texts(smol_llm, ["Sum:"], grammar)[0])


def test_stop_strings_logprobs_and_prefix_cache(smol_llm):
    stopped = smol_llm.generate(PROMPTS[:1], _json(stop=['"age"']), use_tqdm=False)[0].outputs[0]
    assert stopped.finish_reason == "stop" and stopped.stop_reason == '"age"'
    assert stopped.text.startswith('{"name":') and '"age"' not in stopped.text
    # Logprobs are of the unconstrained distribution: a forced word is not the model's top
    # choice at every position.
    forced = SamplingParams(max_tokens=24, temperature=0, logprobs=1, structured_outputs=(
        StructuredOutputsParams(choice=["xylophone zebra quartz"])))
    c = smol_llm.generate(["Hello"], forced, use_tqdm=False)[0].outputs[0]
    assert c.text == "xylophone zebra quartz"
    ranks = [lp[t].rank for t, lp in zip(c.token_ids, c.logprobs)]
    assert max(ranks) > 1
    # Same prompt again: a prefix-cache hit, the same constrained answer.
    smol_llm.reset_prefix_cache()
    long_prompt = "Describe, as a JSON object, one person with a name, an age and pets. " * 3
    first = _texts(smol_llm, [long_prompt], _json())[0]
    hits = smol_llm.llm_engine.total_prefix_cache_hits
    assert _texts(smol_llm, [long_prompt], _json())[0] == first
    assert smol_llm.llm_engine.total_prefix_cache_hits > hits
    _valid(first)


def test_mixed_batch_leaves_unconstrained_outputs_unchanged(smol_llm):
    plain = SamplingParams(max_tokens=24, temperature=0)
    prompts = ["The ocean is", "My favourite food is"]
    alone = _texts(smol_llm, prompts, plain)
    mixed = _texts(smol_llm, prompts + PROMPTS[:3], [plain, plain] + [_json()] * 3)
    assert mixed[:2] == alone
    for t in mixed[2:]:
        _valid(t)


def test_async_scheduling_and_forced_preemption_roll_back_nothing(smol_llm):
    prompts = [f"{p} Number {i}." for i, p in enumerate(PROMPTS * 2)]
    want = _texts(smol_llm, prompts, _json())
    for t in want:
        _valid(t)
    # 8 requests of ~40 tokens in 10 blocks of 16: running requests are preempted and
    # recomputed; their matchers must stay exactly at their output tokens.
    for async_scheduling in (False, True):
        llm = LLM(model=smollm2_path(), dtype="float32", num_gpu_blocks_override=10,
                  async_scheduling=async_scheduling)
        assert _texts(llm, prompts, _json()) == want
        assert llm.llm_engine.total_num_preemptions > 0
        del llm


def test_a_request_waits_for_its_grammar_without_holding_others(smol_llm):
    core = smol_llm.llm_engine.engine_core
    mgr = core.structured_output_manager
    release = threading.Event()
    real_compile = mgr._compile

    def slow_compile(spec):
        if "slow_field" in spec.spec:
            release.wait(60)
        return real_compile(spec)

    mgr._compile = slow_compile
    try:
        slow_schema = {"type": "object", "properties": {"slow_field": {"type": "integer"}},
                       "required": ["slow_field"]}
        engine = smol_llm.llm_engine
        engine.add_request("slow", "JSON:", SamplingParams(
            max_tokens=20, temperature=0,
            structured_outputs=StructuredOutputsParams(json=slow_schema)))
        engine.add_request("fast", "Hello there", SamplingParams(max_tokens=4, temperature=0))
        done: dict[str, str] = {}
        for _ in range(50):
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = out.outputs[0].text
            if "fast" in done:
                break
        assert "fast" in done and "slow" not in done
        assert core.scheduler.num_waiting == 1  # still compiling, not scheduled
        release.set()
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = out.outputs[0].text
        assert set(json.loads(done["slow"])) == {"slow_field"}
    finally:
        release.set()
        mgr._compile = real_compile


def test_compile_is_cached_by_spec(smol_llm):
    mgr = smol_llm.llm_engine.engine_core.structured_output_manager
    schema = {"type": "object", "properties": {"k": {"type": "boolean"}}, "required": ["k"]}
    before = mgr.num_compiles
    smol_llm.generate(["a", "b"], SamplingParams(max_tokens=10, n=2, structured_outputs=(
        StructuredOutputsParams(json=schema))), use_tqdm=False)
    smol_llm.generate(["c"], SamplingParams(max_tokens=10, structured_outputs=(
        StructuredOutputsParams(json=json.dumps(schema)))), use_tqdm=False)
    assert mgr.num_compiles == before + 1


def test_bad_constraints_are_value_errors_naming_the_field(smol_llm):
    for so, field in ((StructuredOutputsParams(regex="a(b"), "structured_outputs.regex"),
                      (StructuredOutputsParams(grammar="root ::= nope"),
                       "structured_outputs.grammar"),
                      (StructuredOutputsParams(json={"type": "objekt"}), "structured_outputs.json"),
                      (StructuredOutputsParams(json="{not json"), "structured_outputs.json")):
        with pytest.raises(ValueError, match=re.escape(field)):
            smol_llm.generate(["x"], SamplingParams(structured_outputs=so), use_tqdm=False)
    assert _texts(smol_llm, ["Hi"], SamplingParams(max_tokens=2, temperature=0))[0]


def test_structural_tag_vllm_form(smol_llm):
    # vLLM's original form: JSON between begin/end once a trigger appears; free text around.
    tag = {"type": "structural_tag", "triggers": ["<fn="], "structures": [{
        "begin": "<fn=add>", "end": "</fn>",
        "schema": {"type": "object", "properties": {"a": {"type": "integer", "maximum": 99}},
                   "required": ["a"]}}]}
    params = SamplingParams(max_tokens=40, temperature=0, structured_outputs=(
        StructuredOutputsParams(structural_tag=json.dumps(tag))))
    prompt = "".join(f'<fn=add>{{"a":{i}}}</fn>\n' for i in range(3))
    text = _texts(smol_llm, [prompt], params)[0]
    bodies = re.findall(r"<fn=add>(.*?)</fn>", text)
    assert len(bodies) >= 2
    for body in bodies:
        assert set(json.loads(body)) == {"a"} and ": " not in body
