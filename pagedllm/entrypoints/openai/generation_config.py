"""`--generation-config auto|vllm|PATH`: sampling defaults from a model's generation_config.json.

`auto` reads the model directory's file (for a .gguf file, the file beside it); `vllm` uses
none (pagedllm's own defaults, as vLLM's value means); any other value is a directory holding a
generation_config.json. Only the sampling fields below become defaults, and only for requests
that leave them unset; the defaults are logged at start-up.
"""

from __future__ import annotations

import json
import logging
import os

logger = logging.getLogger(__name__)

FILE_NAME = "generation_config.json"
# generation_config.json key -> request field
DEFAULT_FIELDS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "repetition_penalty": "repetition_penalty",
}


def _config_dir(value: str, model_path: str) -> str | None:
    if value == "vllm":
        return None
    if value == "auto":
        return model_path if os.path.isdir(model_path) else os.path.dirname(model_path)
    if not os.path.isdir(value):
        raise ValueError(f"--generation-config {value!r}: not auto, vllm or a directory")
    if not os.path.isfile(os.path.join(value, FILE_NAME)):
        raise ValueError(f"--generation-config {value!r}: the directory has no {FILE_NAME}")
    return value


def load_sampling_defaults(value: str, model_path: str) -> dict[str, float | int]:
    """The request defaults `value` selects; {} when there are none. ValueError for a bad
    flag value or an unreadable file."""
    directory = _config_dir(value, model_path)
    if directory is None:
        return {}
    path = os.path.join(directory, FILE_NAME)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"--generation-config: cannot read {path}: {e}") from e
    if not isinstance(raw, dict):
        raise ValueError(f"--generation-config: {path} is not a JSON object")
    defaults: dict[str, float | int] = {}
    for key, field_name in DEFAULT_FIELDS.items():
        value_ = raw.get(key)
        if value_ is None:
            continue
        if isinstance(value_, bool) or not isinstance(value_, int | float):
            raise ValueError(f"--generation-config: {path}: {key} must be a number; got {value_!r}")
        defaults[field_name] = int(value_) if field_name == "top_k" else float(value_)
    if defaults:
        logger.info("default sampling parameters from %s (for requests that do not set them): %s",
                    path, defaults)
    return defaults


def apply_sampling_defaults(req, defaults: dict[str, float | int]) -> None:
    """Fills the fields `req` (a chat or completion request) left unset with `defaults`."""
    for field_name, value in defaults.items():
        if getattr(req, field_name, None) is None:
            setattr(req, field_name, value)
