"""LLM.embed end to end: all-MiniLM-L6-v2 against sentence-transformers, tiny random encoders
and a decoder (last-token pooling) against transformers."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from pagedllm import LLM
from pagedllm.model_executor.loader import resolve_model
from pagedllm.model_executor.loader.testing import build_random_hf_model_dir
from pagedllm.tokenizer import get_tokenizer
from pagedllm.worker.pooling import pooling_num_blocks

from .conftest import build_random_encoder_dir, tiny_encoder_config

LONG = " ".join(f"sentence {i} about embeddings and paged attention" for i in range(18))
TEXTS = {
    "short": "The quick brown fox jumps over the lazy dog.",
    "long": LONG,  # ~200 tokens: past the 128 baked into tokenizer.json, under 256
    "empty": "",
    "non_ascii": "Ünïcödé — 日本語のテキスト, emojis 🚀🔥 and Ελληνικά.",
}


@pytest.fixture(scope="module")
def minilm_llm(minilm_path: str) -> LLM:
    return LLM(model=minilm_path, max_num_seqs=8)


def _cos(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_minilm_task_is_auto_detected(minilm_llm: LLM, minilm_path: str) -> None:
    cfg = minilm_llm.llm_engine.model_config
    assert cfg.task == "embed"
    assert resolve_model(minilm_path).max_model_len == 256  # sentence_bert_config.json
    # Pooling requests finish in one step, so the cache holds one step's worth of blocks.
    assert minilm_llm.llm_engine.engine_core.num_blocks == pooling_num_blocks(
        minilm_llm.llm_engine.config
    )


def test_minilm_matches_sentence_transformers(minilm_llm: LLM, st_model) -> None:
    names = list(TEXTS)
    outs = minilm_llm.embed([TEXTS[n] for n in names], use_tqdm=False)
    refs = st_model.encode([TEXTS[n] for n in names])
    lens = {n: len(o.prompt_token_ids) for n, o in zip(names, outs)}
    assert lens["empty"] == 2  # [CLS] [SEP]: an empty string is a valid input
    assert 128 < lens["long"] <= 256  # no truncation at tokenizer.json's 128
    for name, out, ref in zip(names, outs, refs):
        emb = out.outputs.embedding
        assert len(emb) == 384
        assert abs(np.linalg.norm(emb) - 1.0) < 1e-5, name
        assert _cos(emb, ref) >= 0.999, name


def test_minilm_batch_equals_single(minilm_llm: LLM) -> None:
    texts = [TEXTS["short"], TEXTS["non_ascii"], "a", TEXTS["long"]] * 3
    batch = minilm_llm.embed(texts, use_tqdm=False)
    single = minilm_llm.embed(texts[1], use_tqdm=False)[0]
    assert [o.prompt_token_ids for o in batch[:4]] == [o.prompt_token_ids for o in batch[4:8]]
    np.testing.assert_allclose(batch[1].outputs.embedding, single.outputs.embedding, atol=1e-5)
    np.testing.assert_allclose(batch[9].outputs.embedding, single.outputs.embedding, atol=1e-5)


def test_minilm_errors(minilm_llm: LLM) -> None:
    too_long = " ".join(["word"] * 600)
    with pytest.raises(ValueError, match="longer than the maximum model length"):
        minilm_llm.embed(too_long, use_tqdm=False)
    with pytest.raises(ValueError, match="embedding model"):
        minilm_llm.generate("hello", use_tqdm=False)
    assert not minilm_llm.llm_engine.has_unfinished_requests()


def test_minilm_tokenizer_has_no_builtin_padding(minilm_path: str) -> None:
    tok = get_tokenizer(minilm_path)
    assert tok.backend_tokenizer.padding is None
    assert tok.backend_tokenizer.truncation is None
    assert len(tok.backend_tokenizer.encode("hi").ids) == 3


def _hf_hidden(path: str, ids: list[int]) -> torch.Tensor:
    from transformers import AutoModel

    hf = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(input_ids=torch.tensor([ids])).last_hidden_state[0]


def test_tiny_bert_default_cls_and_st_mean(tmp_path) -> None:
    path = build_random_encoder_dir(str(tmp_path / "bert"), tiny_encoder_config(), seed=3)
    prompts = [[5, 9, 17, 4], [7], list(range(10, 50))]
    # Many requests over several steps: 45 tokens with a 32-token step budget.
    llm = LLM(model=path, skip_tokenizer_init=True, max_num_batched_tokens=48, max_num_seqs=4)
    assert llm.llm_engine.model_config.task == "embed"
    outs = llm.embed([{"prompt_token_ids": p} for p in prompts], use_tqdm=False)
    for p, o in zip(prompts, outs):
        ref = torch.nn.functional.normalize(_hf_hidden(path, p)[0], dim=0)
        np.testing.assert_allclose(o.outputs.embedding, ref.numpy(), atol=1e-4)
    del llm
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling",
                "type": "sentence_transformers.models.Pooling"}]
    with open(os.path.join(path, "modules.json"), "w") as f:
        json.dump(modules, f)
    os.makedirs(os.path.join(path, "1_Pooling"))
    with open(os.path.join(path, "1_Pooling", "config.json"), "w") as f:
        json.dump({"pooling_mode_mean_tokens": True}, f)
    llm = LLM(model=path, skip_tokenizer_init=True)
    outs = llm.embed(prompts, use_tqdm=False)
    for p, o in zip(prompts, outs):
        ref = _hf_hidden(path, p).mean(dim=0)  # no Normalize module: not normalized
        np.testing.assert_allclose(o.outputs.embedding, ref.numpy(), atol=1e-4)


def test_decoder_embed_is_normalized_last_hidden_state(tmp_path) -> None:
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    config.architectures = ["LlamaForCausalLM"]
    path = build_random_hf_model_dir(str(tmp_path / "llama"), config, seed=4)
    llm = LLM(model=path, task="embed", skip_tokenizer_init=True)
    prompts = [[1, 2, 3, 4, 5], [9], list(range(20, 60))]
    outs = llm.embed(prompts, use_tqdm=False)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    for p, o in zip(prompts, outs):
        with torch.no_grad():
            last = hf.model(input_ids=torch.tensor([p])).last_hidden_state[0, -1]
        ref = torch.nn.functional.normalize(last, dim=0)
        assert len(o.outputs.embedding) == 64
        np.testing.assert_allclose(o.outputs.embedding, ref.numpy(), atol=1e-4)
    with pytest.raises(ValueError, match="task='generate'"):
        LLM(model=path, skip_tokenizer_init=True).embed([[1, 2]], use_tqdm=False)
