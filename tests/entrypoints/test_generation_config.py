"""--generation-config: which file is read, which fields become defaults, bad values refused."""

from __future__ import annotations

import json

import pytest

from pagedllm.entrypoints.openai.generation_config import (
    apply_sampling_defaults,
    load_sampling_defaults,
)
from pagedllm.entrypoints.openai.protocol import ChatCompletionRequest, CompletionRequest

HF_FILE = {"temperature": 0.6, "top_p": 0.9, "top_k": 20, "repetition_penalty": 1.1,
           "bos_token_id": 1, "eos_token_id": [2, 3], "do_sample": True}
EXPECTED = {"temperature": 0.6, "top_p": 0.9, "top_k": 20, "repetition_penalty": 1.1}


@pytest.fixture
def model_dir(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps(HF_FILE))
    return tmp_path


def test_auto_reads_the_model_directory_and_a_gguf_neighbour(model_dir, caplog):
    with caplog.at_level("INFO"):
        assert load_sampling_defaults("auto", str(model_dir)) == EXPECTED
    assert "default sampling parameters" in caplog.text and "0.6" in caplog.text
    assert load_sampling_defaults("auto", str(model_dir / "model.Q4.gguf")) == EXPECTED


def test_vllm_and_a_model_without_the_file_mean_no_defaults(model_dir, tmp_path_factory):
    assert load_sampling_defaults("vllm", str(model_dir)) == {}
    assert load_sampling_defaults("auto", str(tmp_path_factory.mktemp("bare"))) == {}


def test_path_value_reads_that_directory(model_dir, tmp_path_factory):
    other = tmp_path_factory.mktemp("model")
    assert load_sampling_defaults(str(model_dir), str(other)) == EXPECTED


@pytest.mark.parametrize(("content", "match"), [
    (None, "not auto, vllm or a directory"),
    ("", "has no generation_config.json"),
    ("{not json", "cannot read"),
    ('{"temperature": "hot"}', "temperature must be a number"),
    ("[1, 2]", "not a JSON object"),
])
def test_bad_values_are_value_errors(tmp_path, content, match):
    if content is None:
        value = str(tmp_path / "missing")
    else:
        value = str(tmp_path)
        if content:
            (tmp_path / "generation_config.json").write_text(content)
    with pytest.raises(ValueError, match=match):
        load_sampling_defaults(value, str(tmp_path))


def test_defaults_fill_only_unset_fields():
    req = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], temperature=1.3)
    apply_sampling_defaults(req, EXPECTED)
    params = req.to_sampling_params(None)
    assert params.temperature == 1.3  # set by the request: kept
    assert (params.top_p, params.top_k, params.repetition_penalty) == (0.9, 20, 1.1)
    req = CompletionRequest(prompt="x")
    apply_sampling_defaults(req, {})
    params = req.to_sampling_params(None)
    assert (params.temperature, params.top_p, params.top_k) == (1.0, 1.0, 0)
