"""Loading the tokenizer of a model: an HF directory or the vocabulary inside a GGUF file.

Converting a GGUF vocabulary takes seconds, so the converted tokenizer is cached in-process
and on disk (keyed by the file's path, size and mtime); later loads take a fraction of a
second. The chat template of a GGUF model comes from its `tokenizer.chat_template` metadata.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import threading
from typing import Any

logger = logging.getLogger(__name__)

_CACHE: dict[tuple[str, int, float], Any] = {}
_LOCK = threading.Lock()


def _disk_cache_root() -> str:
    from pagedllm import envs

    return os.path.join(envs.cache_root(), "gguf_tokenizers")


def _resolve_args(path_or_model_config: Any, model_format: str | None) -> tuple[str, str]:
    if isinstance(path_or_model_config, str):
        path = path_or_model_config
    else:
        config = path_or_model_config
        path = getattr(config, "tokenizer", None) or config.model_path
        model_format = model_format or getattr(config, "model_format", None)
    if path.endswith(".gguf"):
        model_format = "gguf"
    return path, model_format or "hf"


def _gguf_chat_template(path: str) -> str | None:
    from pagedllm.model_executor.loader.gguf_file import open_gguf

    template = open_gguf(path).metadata.get("tokenizer.chat_template")
    return str(template) if template else None


def _convert_gguf_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        os.path.dirname(os.path.abspath(path)), gguf_file=os.path.basename(path)
    )
    if not getattr(tokenizer, "chat_template", None):
        template = _gguf_chat_template(path)
        if template:
            tokenizer.chat_template = template
    return tokenizer


def _load_gguf_tokenizer(path: str, use_disk_cache: bool) -> Any:
    from transformers import AutoTokenizer

    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime)
    digest = hashlib.sha256(repr(key).encode()).hexdigest()[:24]
    cache_dir = os.path.join(_disk_cache_root(), digest)
    if use_disk_cache and os.path.isfile(os.path.join(cache_dir, "tokenizer.json")):
        try:
            return AutoTokenizer.from_pretrained(cache_dir)
        except Exception as e:  # a stale or partial cache entry: rebuild it
            logger.warning("ignoring unreadable tokenizer cache %s: %s", cache_dir, e)
    tokenizer = _convert_gguf_tokenizer(path)
    if use_disk_cache:
        try:
            os.makedirs(os.path.dirname(cache_dir), exist_ok=True)
            tmp = tempfile.mkdtemp(dir=os.path.dirname(cache_dir))
            tokenizer.save_pretrained(tmp)
            try:
                os.replace(tmp, cache_dir)
            except OSError:  # another process won the race
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError as e:
            logger.warning("could not cache the converted tokenizer: %s", e)
    return tokenizer


def _disable_builtin_padding(tokenizer: Any) -> None:
    """Turns off padding and truncation baked into a tokenizer.json (sentence-transformers
    models such as all-MiniLM-L6-v2 ship "pad to 128" and "truncate at 128"): a prompt is
    tokenized whole, and length limits are the engine's to enforce."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return
    if getattr(backend, "padding", None) is not None:
        backend.no_padding()
    if getattr(backend, "truncation", None) is not None:
        backend.no_truncation()


def get_tokenizer(
    path_or_model_config: Any,
    model_format: str | None = None,
    trust_remote_code: bool = False,
    use_disk_cache: bool = True,
) -> Any:
    """A transformers tokenizer for a model directory, a .gguf file or a ModelConfig.

    The same object is returned for repeated calls with the same source; treat it as
    read-only.
    """
    from pagedllm.model_executor.loader.errors import ModelLoadError

    path, model_format = _resolve_args(path_or_model_config, model_format)
    if not os.path.exists(path):
        raise ModelLoadError(f"tokenizer source not found: {path}")
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime)
    with _LOCK:
        cached = _CACHE.get(key)
        if cached is not None:
            return cached
        try:
            if model_format == "gguf":
                tokenizer = _load_gguf_tokenizer(path, use_disk_cache)
            else:
                from transformers import AutoTokenizer

                tokenizer = AutoTokenizer.from_pretrained(
                    path, trust_remote_code=trust_remote_code
                )
                _disable_builtin_padding(tokenizer)
        except ModelLoadError:
            raise
        except Exception as e:
            raise ModelLoadError(f"cannot load the tokenizer of {path}: {e}") from e
        _CACHE[key] = tokenizer
        return tokenizer
