"""HF checkpoint directories: stream tensors one at a time from (sharded) safetensors."""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Callable, Iterator

import torch

from pagedllm.model_executor.loader.errors import ModelLoadError

SAFE_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"


def _files_from_index(model_dir: str, index_name: str) -> list[str]:
    index_path = os.path.join(model_dir, index_name)
    try:
        with open(index_path) as f:
            weight_map = json.load(f)["weight_map"]
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(f"unreadable weight index {index_path}: {e}") from e
    files = sorted(set(weight_map.values()))
    missing = [f for f in files if not os.path.isfile(os.path.join(model_dir, f))]
    if missing:
        raise ModelLoadError(
            f"weight files listed in {index_path} are missing: {', '.join(missing)}"
        )
    return [os.path.join(model_dir, f) for f in files]


def find_weight_files(model_dir: str) -> tuple[list[str], str]:
    """(files, "safetensors" | "bin"); ModelLoadError when the directory has no weights."""
    if os.path.isfile(os.path.join(model_dir, SAFE_INDEX)):
        return _files_from_index(model_dir, SAFE_INDEX), "safetensors"
    files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    if files:
        return files, "safetensors"
    if os.path.isfile(os.path.join(model_dir, BIN_INDEX)):
        return _files_from_index(model_dir, BIN_INDEX), "bin"
    files = sorted(glob.glob(os.path.join(model_dir, "pytorch_model*.bin")))
    if files:
        return files, "bin"
    raise ModelLoadError(
        f"no weight files in {model_dir} (looked for model.safetensors, *.safetensors, "
        f"{SAFE_INDEX}, pytorch_model*.bin)"
    )


def iterate_hf_weights(
    model_dir: str, needed: Callable[[str], bool] | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """(checkpoint name, CPU tensor), one tensor in memory at a time for safetensors; names
    `needed` rejects are not read (the layers of other pipeline stages)."""
    from safetensors import safe_open

    files, kind = find_weight_files(model_dir)
    for path in files:
        if kind == "safetensors":
            try:
                handle = safe_open(path, framework="pt", device="cpu")
            except Exception as e:
                raise ModelLoadError(f"corrupt safetensors file {path}: {e}") from e
            with handle as f:
                for name in f.keys():  # noqa: SIM118 - safe_open is not a dict
                    if needed is None or needed(name):
                        yield name, f.get_tensor(name)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            yield from ((k, v) for k, v in state.items() if needed is None or needed(k))
            del state
