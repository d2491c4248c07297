"""Loader behaviour: resolution rules and the errors users see for broken inputs."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from pagedllm.model_executor.loader import ModelLoadError, resolve_model
from pagedllm.model_executor.loader.resolve import default_model_path
from pagedllm.model_executor.loader.testing import build_random_hf_model_dir
from pagedllm.model_executor.models import ModelRegistry
from tests.model_executor.conftest import load_ours, prefill_logits, tiny_config


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("llama")
    return build_random_hf_model_dir(str(path), tiny_config("LlamaForCausalLM"), seed=3)


def test_resolve_hf_dir(llama_dir: str) -> None:
    resolved = resolve_model(llama_dir)
    assert resolved.model_format == "hf"
    assert resolved.model_path == resolved.tokenizer_path == llama_dir
    assert resolved.hf_config.architectures == ["LlamaForCausalLM"]


def test_missing_path() -> None:
    with pytest.raises(ModelLoadError, match="no such file or directory.*Hugging Face cache"):
        resolve_model("/nonexistent/dir/model")


def test_hub_id_not_in_cache_offline(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="not found in the local Hugging Face cache"):
        resolve_model("no-such-org/no-such-model-xyz")


@pytest.mark.parametrize("fraction", [0.001, 0.5])
def test_truncated_gguf(tmp_path, fraction: float) -> None:
    src = default_model_path()
    size = os.path.getsize(src)
    dst = tmp_path / "truncated.gguf"
    with open(src, "rb") as f:
        dst.write_bytes(f.read(int(size * fraction)))
    with pytest.raises(ModelLoadError, match="corrupt or truncated GGUF"):
        resolve_model(str(dst))


def test_not_a_gguf(tmp_path) -> None:
    path = tmp_path / "fake.gguf"
    path.write_bytes(b"\x00" * 64)
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        resolve_model(str(path))


def _write_config(path, **fields) -> str:
    os.makedirs(path, exist_ok=True)
    config = tiny_config("LlamaForCausalLM").to_dict()
    config.update(fields)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    return str(path)


def test_unknown_architecture(tmp_path) -> None:
    path = _write_config(tmp_path / "foo", architectures=["FooForCausalLM"])
    with pytest.raises(ModelLoadError, match="FooForCausalLM.*not supported.*LlamaForCausalLM"):
        resolve_model(path)


def test_registry_error_lists_supported() -> None:
    with pytest.raises(ValueError, match="BarModel") as info:
        ModelRegistry.resolve(["BarModel"])
    for arch in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        assert arch in str(info.value)


def test_config_without_architectures(tmp_path) -> None:
    path = _write_config(tmp_path / "noarch", architectures=None)
    with pytest.raises(ModelLoadError, match="names no architectures"):
        resolve_model(path)


def test_missing_weight_files(tmp_path) -> None:
    path = _write_config(tmp_path / "noweights", architectures=["LlamaForCausalLM"])
    with pytest.raises(ModelLoadError, match="no weight files"):
        load_ours(path)


def test_missing_tensor(tmp_path, llama_dir: str) -> None:
    path = tmp_path / "partial"
    path.mkdir()
    for name in os.listdir(llama_dir):
        if name.endswith(".json"):
            (path / name).write_bytes(open(os.path.join(llama_dir, name), "rb").read())
    tensors = load_file(os.path.join(llama_dir, "model.safetensors"))
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    del tensors["model.norm.weight"]
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(ModelLoadError, match="model.layers.1.self_attn.qkv_proj.weight") as info:
        load_ours(str(path))
    assert "model.norm.weight" in str(info.value)


def test_sharded_checkpoint_loads_like_single_file(tmp_path, llama_dir: str) -> None:
    tensors = load_file(os.path.join(llama_dir, "model.safetensors"))
    path = tmp_path / "sharded"
    path.mkdir()
    (path / "config.json").write_bytes(open(os.path.join(llama_dir, "config.json"), "rb").read())
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2],
              "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for file, shard_names in shards.items():
        save_file({n: tensors[n] for n in shard_names}, str(path / file))
        weight_map.update({n: file for n in shard_names})
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    ids = torch.arange(20, dtype=torch.int64)
    single = prefill_logits(load_ours(llama_dir), ids)
    sharded = prefill_logits(load_ours(str(path)), ids)
    assert torch.equal(single, sharded)


def test_bf16_load(llama_dir: str) -> None:
    model = load_ours(llama_dir, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert not model.training
    logits = prefill_logits(model, torch.arange(10, dtype=torch.int64))
    reference = prefill_logits(load_ours(llama_dir), torch.arange(10, dtype=torch.int64))
    assert logits.dtype == torch.float32
    assert (logits - reference).abs().max().item() < 0.05
