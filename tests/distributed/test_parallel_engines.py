"""Tensor and pipeline parallelism end to end on CPU (gloo): the same greedy tokens as one
process and logprobs within 1e-4 (fp32), for tiny random Llama and Qwen3, BERT embeddings,
and the default SmolLM2 under pipeline parallelism. Each engine starts once per module."""

from __future__ import annotations

import json

import pytest

from pagedllm import LLM, SamplingParams, StructuredOutputsParams
from pagedllm.model_executor.loader.testing import build_random_hf_model_dir
from tests.model_executor.conftest import tiny_config

PROMPTS = [
    {"prompt_token_ids": [1, 5, 9, 33, 7]},
    {"prompt_token_ids": list(range(3, 40))},  # past two blocks: chunked over block edges
    {"prompt_token_ids": [200, 17, 4] * 6},
]
GREEDY = SamplingParams(temperature=0.0, max_tokens=8, logprobs=2)
KV_GIB = 0.02


def _generate(path: str, **kwargs) -> tuple[list[list[int]], list[list[float]], int]:
    """(tokens, sampled-token logprobs, KV blocks) of PROMPTS; the engine is shut down after."""
    llm = LLM(path, skip_tokenizer_init=True, kv_cache_space=KV_GIB, **kwargs)
    try:
        outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
        num_blocks = llm.llm_engine.engine_core.num_blocks
    finally:
        llm.llm_engine.engine_core.shutdown()
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    logprobs = [
        [lp[tok].logprob for tok, lp in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)]
        for o in outs
    ]
    return tokens, logprobs, num_blocks


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tp-models")
    # 4 layers (2 per stage under PP=2); 4 heads over 2 KV heads (1 each under TP=2).
    return {
        arch: build_random_hf_model_dir(str(root / arch), tiny_config(arch, num_hidden_layers=4))
        for arch in ("LlamaForCausalLM", "Qwen3ForCausalLM")
    }


@pytest.fixture(scope="module")
def references(models) -> dict[str, tuple]:
    return {arch: _generate(path) for arch, path in models.items()}


@pytest.mark.parametrize(
    ("arch", "tp", "pp", "async_scheduling"),
    [
        ("LlamaForCausalLM", 2, 1, False),
        ("LlamaForCausalLM", 1, 2, True),
        ("LlamaForCausalLM", 2, 2, False),
        ("Qwen3ForCausalLM", 2, 1, True),
        ("Qwen3ForCausalLM", 1, 2, False),
    ],
)
def test_parallel_layout_matches_one_process(models, references, arch, tp, pp, async_scheduling):
    ref_tokens, ref_logprobs, ref_blocks = references[arch]
    tokens, logprobs, num_blocks = _generate(
        models[arch], tensor_parallel_size=tp, pipeline_parallel_size=pp,
        async_scheduling=async_scheduling,
    )
    assert tokens == ref_tokens
    for got, want in zip(logprobs, ref_logprobs):
        assert got == pytest.approx(want, abs=1e-4)
    # Each rank sizes its cache from its own share (1/tp of the KV heads, 1/pp of the
    # layers) in the same budget, and the engine takes the minimum over ranks.
    assert ref_blocks * tp * pp <= num_blocks <= (ref_blocks + 1) * tp * pp


def test_bert_embeddings_tensor_parallel(minilm_path):
    texts = ["A sentence to embed.", "Tensor parallel encoders give the same vectors."]

    def embed(**kwargs) -> list[list[float]]:
        llm = LLM(minilm_path, kv_cache_space=KV_GIB, **kwargs)
        try:
            return [o.outputs.embedding for o in llm.embed(texts, use_tqdm=False)]
        finally:
            llm.llm_engine.engine_core.shutdown()

    ref, got = embed(), embed(tensor_parallel_size=2)
    assert len(got) == len(ref) == 2
    for a, b in zip(got, ref):
        assert len(a) == 384
        assert a == pytest.approx(b, abs=1e-4)


def test_smollm2_pipeline_parallel_matches_one_process():
    """The default model (9 heads, 3 KV heads, 30 layers, tied embeddings: the last stage
    holds its own copy of the embedding as LM head) split into two stages of 15 layers; a
    JSON-constrained request in the batch gets the step's bitmask through the broadcast."""
    prompts = ["The capital of France is", "def fibonacci(n):", "Describe a cat as JSON:"]
    schema = {"type": "object", "properties": {"name": {"type": "string"}},
              "required": ["name"], "additionalProperties": False}
    sp = [SamplingParams(temperature=0.0, max_tokens=6)] * 2 + [SamplingParams(
        temperature=0.0, max_tokens=24, structured_outputs=StructuredOutputsParams(json=schema))]

    def run(**kwargs) -> list[list[int]]:
        llm = LLM(kv_cache_space=KV_GIB, max_model_len=256, **kwargs)
        try:
            outs = llm.generate(prompts, sp, use_tqdm=False)
            return [list(o.outputs[0].token_ids) for o in outs], outs[2].outputs[0].text
        finally:
            llm.llm_engine.engine_core.shutdown()

    ref, ref_json = run()
    tokens, text = run(pipeline_parallel_size=2)
    assert tokens == ref
    assert all(len(t) == 6 for t in ref[:2])
    assert text == ref_json and set(json.loads(ref_json)) == {"name"}


@pytest.mark.parametrize(("family", "tp", "pp"), [("gemma2", 1, 2), ("mixtral", 2, 1)])
def test_model_families_under_parallelism(tmp_path, family, tp, pp):
    """Gemma 2 (its own norms, scaled embeddings, soft-capping) split into pipeline stages,
    and Mixtral's experts sharded over tensor-parallel ranks, give one process's tokens."""
    import transformers

    common = dict(vocab_size=512, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                  eos_token_id=None, bos_token_id=None, pad_token_id=0)
    if family == "gemma2":
        config = transformers.Gemma2Config(
            **common, intermediate_size=128, architectures=["Gemma2ForCausalLM"],
            sliding_window=16, query_pre_attn_scalar=24, attn_logit_softcapping=5.0,
            final_logit_softcapping=3.0, layer_types=["sliding_attention", "full_attention"] * 2,
        )
    else:
        config = transformers.MixtralConfig(
            **common, intermediate_size=96, num_experts_per_tok=2, num_local_experts=4,
            architectures=["MixtralForCausalLM"],
        )
    path = build_random_hf_model_dir(str(tmp_path / family), config, seed=1, std=0.2)
    ref_tokens, ref_logprobs, _ = _generate(path)
    tokens, logprobs, _ = _generate(path, tensor_parallel_size=tp, pipeline_parallel_size=pp)
    assert tokens == ref_tokens
    for got, want in zip(logprobs, ref_logprobs):
        assert got == pytest.approx(want, abs=1e-4)
