"""The CPU fast path of Llama-style layers (models/cpu_fast_path.py) against the module path:
identical logits over a prefill and decodes (float32 and bfloat16; Llama, Qwen2 biases,
Qwen3 QK-norm), close to the plain torch ops, and not taken where a hook is registered."""

from __future__ import annotations

import pytest
import torch

from pagedllm import cpu_ops
from pagedllm.model_executor.loader.testing import build_random_hf_model_dir
from pagedllm.model_executor.models import cpu_fast_path
from tests.model_executor.conftest import load_ours, new_kv_caches, run_step, tiny_config

ARCHS = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("cpu_fast_path")
    return {arch: build_random_hf_model_dir(str(root / arch), tiny_config(arch), seed=3, std=0.2)
            for arch in ARCHS}


def _logits(model: torch.nn.Module, ids: torch.Tensor, decodes: int) -> list[torch.Tensor]:
    """A prefill of ids[:-decodes] then one decode step per remaining id."""
    kv = new_kv_caches(model, ids.shape[0])
    n = ids.shape[0] - decodes
    out = [run_step(model, ids[:n], 0, kv)]
    for p in range(n, ids.shape[0]):
        out.append(run_step(model, ids[p : p + 1], p, kv))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("arch", ARCHS)
def test_fast_path_equals_module_path(model_dirs, arch, dtype, monkeypatch):
    model = load_ours(model_dirs[arch], dtype=dtype)
    inner = model.model
    ids = torch.randint(0, 256, (21,), generator=torch.Generator().manual_seed(0))
    fast = _logits(model, ids, decodes=4)
    plan = inner.__dict__["_cpu_fast_plan"][1]
    assert plan is not None and len(plan) == 2
    assert (plan[0].rope is None) == (arch == "Qwen3ForCausalLM")  # QK-norm: module path
    with monkeypatch.context() as m:
        m.setattr(cpu_fast_path, "usable", lambda hidden: False)
        modules = _logits(model, ids, decodes=4)
    for a, b in zip(fast, modules, strict=True):
        assert torch.equal(a, b)
    # the plain torch ops (no C++ ops at all): the same up to float rounding
    with monkeypatch.context() as m:
        m.setattr(cpu_ops, "_enabled", False)
        plain = _logits(model, ids, decodes=4)
    tol = 2e-4 if dtype == torch.float32 else 0.1
    for a, b in zip(fast, plain, strict=True):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)


def test_a_forward_hook_takes_the_module_path(model_dirs):
    model = load_ours(model_dirs["LlamaForCausalLM"])
    ids = torch.arange(5, 12)
    before = _logits(model, ids, decodes=2)
    seen = []
    handle = model.model.layers[1].mlp.register_forward_hook(lambda *a: seen.append(1))
    model.model.__dict__.pop("_cpu_fast_plan", None)  # plans are built once, after loading
    try:
        after = _logits(model, ids, decodes=2)
    finally:
        handle.remove()
    assert model.model.__dict__["_cpu_fast_plan"][1] is None
    assert len(seen) == 3  # the hook ran on every step
    for a, b in zip(before, after, strict=True):
        assert torch.equal(a, b)
