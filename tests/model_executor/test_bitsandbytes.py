"""bitsandbytes: 4-bit and 8-bit checkpoints written by transformers' own bnb integration, and
in-flight 4-bit quantization of an fp32 checkpoint, loaded through the normal loader and checked
against fp32 models that hold the same weights dequantized by bitsandbytes itself (8-bit, whose
activations are quantized too: against transformers' own 8-bit model)."""

from __future__ import annotations

import json
import os
import shutil
from types import SimpleNamespace

import bitsandbytes.functional as bnb_functional
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from pagedllm import LLM, SamplingParams
from pagedllm.attention.backend import get_attn_backend
from pagedllm.config import ModelConfig
from pagedllm.model_executor.layers.linear import LinearBase
from pagedllm.model_executor.layers.quantization import resolve_quantization
from pagedllm.model_executor.layers.quantization.bitsandbytes import BitsAndBytesConfig
from pagedllm.model_executor.layers.quantization.bnb_4bit import split_bnb_name
from pagedllm.model_executor.loader import ModelLoadError, load_model, resolve_model
from pagedllm.model_executor.loader.testing import build_random_hf_model_dir
from tests.model_executor.conftest import prefill_logits, tiny_config

VOCAB = 256
# name -> (architecture, bnb_4bit_quant_type, bnb_4bit_use_double_quant, llm_int8_skip_modules)
VARIANTS = {
    "nf4-double": ("LlamaForCausalLM", "nf4", True, None),
    "nf4-qwen2-bias": ("Qwen2ForCausalLM", "nf4", False, None),
    "fp4-double": ("LlamaForCausalLM", "fp4", True, None),
    "fp4-skip-down": ("LlamaForCausalLM", "fp4", False, ["lm_head", "down_proj"]),
}
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def _load(path: str, flag: str | None = None) -> torch.nn.Module:
    """The model at `path` through the normal loader (quantization resolved as EngineArgs
    does), fp32 on the CPU."""
    resolved = resolve_model(path)
    hf_config = resolved.hf_config
    model_config = ModelConfig(
        model=path, model_path=resolved.model_path, model_format=resolved.model_format,
        hf_config=hf_config, architecture=hf_config.architectures[0], dtype=torch.float32,
        tokenizer=resolved.tokenizer_path, quantization=resolve_quantization(flag, hf_config),
    )
    return load_model(model_config, torch.device("cpu"), get_attn_backend("torch_ref"))


def _save_with_transformers(src: str, dst: str, quant_type: str, double: bool, skip) -> str:
    """A bnb 4-bit checkpoint exactly as transformers writes one (Linear4bit on the CPU)."""
    from transformers import AutoModelForCausalLM
    from transformers import BitsAndBytesConfig as HFBnbConfig

    qc = HFBnbConfig(
        load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=double,
        bnb_4bit_compute_dtype=torch.float32, llm_int8_skip_modules=skip,
    )
    model = AutoModelForCausalLM.from_pretrained(
        src, quantization_config=qc, device_map="cpu", dtype=torch.float32
    )
    model.save_pretrained(dst, safe_serialization=True)
    return dst


def _write_fp32_dir(dst: str, config_src: str, tensors: dict[str, torch.Tensor]) -> str:
    """An unquantized HF dir: `tensors` and config_src's config.json less quantization_config."""
    os.makedirs(dst, exist_ok=True)
    with open(os.path.join(config_src, "config.json")) as f:
        config = json.load(f)
    config.pop("quantization_config", None)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f)
    save_file({k: v.contiguous() for k, v in tensors.items()},
              os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    return dst


def _dequantized_reference(bnb_dir: str, dst: str) -> str:
    """The checkpoint with every 4-bit weight replaced by bitsandbytes' dequantize_4bit of it."""
    sd = load_file(os.path.join(bnb_dir, "model.safetensors"))
    out = {}
    for name, tensor in sd.items():
        if ".weight." in name:
            continue
        side = {k[len(name) + 1:]: v for k, v in sd.items() if k.startswith(name + ".")}
        if side:
            state = bnb_functional.QuantState.from_dict(side, device=torch.device("cpu"))
            tensor = bnb_functional.dequantize_4bit(tensor, state).float()
        out[name] = tensor
    return _write_fp32_dir(dst, bnb_dir, out)


def _random_fp32_dir(root, arch: str) -> str:
    config = tiny_config(arch, vocab_size=VOCAB, eos_token_id=None, bos_token_id=None)
    return build_random_hf_model_dir(str(root), config, seed=3, std=0.2)


@pytest.fixture(scope="module")
def fp32_dir(tmp_path_factory) -> str:
    return _random_fp32_dir(tmp_path_factory.mktemp("fp32"), "LlamaForCausalLM")


@pytest.fixture(scope="module")
def bnb_dirs(fp32_dir, tmp_path_factory):
    """variant -> (bnb checkpoint dir, its dequantized fp32 reference dir), built on demand."""
    cache: dict[str, tuple[str, str]] = {}

    def get(variant: str) -> tuple[str, str]:
        if variant not in cache:
            root = tmp_path_factory.mktemp(variant)
            arch, *quant = VARIANTS[variant]
            src = fp32_dir if arch == "LlamaForCausalLM" else _random_fp32_dir(root / "fp32", arch)
            qdir = _save_with_transformers(src, str(root / "bnb"), *quant)
            cache[variant] = (qdir, _dequantized_reference(qdir, str(root / "ref")))
        return cache[variant]

    return get


def _greedy(path: str, **kwargs):
    """Greedy tokens and top-5 logprobs of three prompts through LLM."""
    llm = LLM(model=path, skip_tokenizer_init=True, dtype="float32", kv_cache_space=0.05,
              **kwargs)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, VOCAB, size=n).tolist() for n in (3, 17, 40)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=5)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in outs]


def _assert_same_generation(ours, ref, atol: float = 1e-4) -> None:
    for (tokens, lps), (ref_tokens, ref_lps) in zip(ours, ref):
        assert tokens == ref_tokens
        for step, ref_step in zip(lps, ref_lps):
            for tok, lp in ref_step.items():
                assert abs(step[tok].logprob - lp.logprob) < atol


def _linear_layers(model: torch.nn.Module) -> dict[str, LinearBase]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LinearBase)}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_prequantized_checkpoint_matches_dequantized_reference(variant, bnb_dirs):
    arch, quant_type, double, skip = VARIANTS[variant]
    qdir, ref_dir = bnb_dirs(variant)
    model = _load(qdir)
    assert type(model).__name__ == arch
    if arch == "Qwen2ForCausalLM":
        assert model.model.layers[0].self_attn.qkv_proj.bias is not None
    for name, layer in _linear_layers(model).items():
        if skip and name.endswith("down_proj"):
            assert not hasattr(layer, "bnb_parts") and layer.weight.dtype == torch.float32
            continue
        last = name.rsplit(".", 1)[-1]
        assert len(layer.bnb_parts) == len(FUSED.get(last, (last,)))
        for part in layer.bnb_parts:
            assert part.qweight.dtype == torch.uint8
            assert part.state.quant_type == quant_type and part.state.nested == double
    ids = torch.tensor([1, 5, 9, 33, 100, 7, 250, 3])
    ours, ref = prefill_logits(model, ids), prefill_logits(_load(ref_dir), ids)
    assert ref.abs().max() > 1.0
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
    _assert_same_generation(_greedy(qdir), _greedy(ref_dir))


def _inflight_reference(model: torch.nn.Module, fp32_dir: str, dst: str) -> str:
    """The fp32 checkpoint with each linear weight replaced by dequantize_4bit of what the
    in-flight model holds, split back into the checkpoint's q/k/v and gate/up."""
    sd = load_file(os.path.join(fp32_dir, "model.safetensors"))
    for name, layer in _linear_layers(model).items():
        (part,) = layer.bnb_parts  # a fused layer is quantized as one matrix
        dense = bnb_functional.dequantize_4bit(part.qweight, part.state)
        head, last = name.rsplit(".", 1)
        parts = FUSED.get(last, (last,))
        sizes = [sd[f"{head}.{p}.weight"].shape[0] for p in parts]
        for p, chunk in zip(parts, dense.split(sizes, dim=0)):
            sd[f"{head}.{p}.weight"] = chunk.float()
    return _write_fp32_dir(dst, fp32_dir, sd)


def test_inflight_quantization_matches_its_dequantized_weights(fp32_dir, tmp_path):
    model = _load(fp32_dir, "bitsandbytes")
    original = load_file(os.path.join(fp32_dir, "model.safetensors"))
    qkv = model.model.layers[0].self_attn.qkv_proj
    (part,) = qkv.bnb_parts
    assert part.state.quant_type == "nf4" and part.state.nested and part.state.blocksize == 64
    # The library's own quantization of the fused matrix, byte for byte.
    fused = torch.cat([original[f"model.layers.0.self_attn.{p}.weight"]
                       for p in FUSED["qkv_proj"]])
    expected, _ = bnb_functional.quantize_4bit(fused, blocksize=64, compress_statistics=True,
                                               quant_type="nf4")
    assert torch.equal(part.qweight, expected)
    assert part.qweight.numel() == fused.numel() // 2
    ref_dir = _inflight_reference(model, fp32_dir, str(tmp_path / "ref"))
    ref = load_file(os.path.join(ref_dir, "model.safetensors"))
    error = (ref["model.layers.0.mlp.down_proj.weight"]
             - original["model.layers.0.mlp.down_proj.weight"]).abs()
    assert 0 < error.max() < 0.2  # really 4-bit, with nf4's error at std 0.2
    ids = torch.tensor([2, 8, 19, 77, 140, 255])
    torch.testing.assert_close(prefill_logits(model, ids), prefill_logits(_load(ref_dir), ids),
                               atol=1e-4, rtol=1e-4)
    _assert_same_generation(_greedy(fp32_dir, quantization="bitsandbytes"), _greedy(ref_dir))


def _without(src: str, dst: str, drop: str) -> str:
    shutil.copytree(src, dst)
    path = os.path.join(dst, "model.safetensors")
    sd = load_file(path)
    del sd[drop]
    save_file(sd, path, metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize("drop, message", [
    ("model.layers.1.self_attn.k_proj.weight.absmax",
     "lacks tensor model.layers.1.self_attn.k_proj.weight.absmax"),
    ("model.layers.0.mlp.up_proj.weight.nested_absmax",
     "lacks tensor model.layers.0.mlp.up_proj.weight.nested_absmax"),
    ("model.layers.0.mlp.down_proj.weight.quant_state.bitsandbytes__nf4",
     "model.layers.0.mlp.down_proj.weight has no quant state"),
    ("model.layers.1.self_attn.o_proj.weight",
     "lacks tensor model.layers.1.self_attn.o_proj.weight$"),
])
def test_bad_checkpoint_names_the_tensor(bnb_dirs, tmp_path, drop, message):
    qdir, _ = bnb_dirs("nf4-double")
    bad = _without(qdir, str(tmp_path / "bad"), drop)
    with pytest.raises(ModelLoadError, match=message):
        _load(bad)


def test_quant_state_of_another_shape_is_refused(bnb_dirs, tmp_path):
    qdir, _ = bnb_dirs("fp4-double")
    bad = str(tmp_path / "bad")
    shutil.copytree(qdir, bad)
    path = os.path.join(bad, "model.safetensors")
    sd = load_file(path)
    # k_proj's weight and state where v_proj's belong fit; o_proj's (64 x 64) do not.
    for key in [k for k in sd if k.startswith("model.layers.0.self_attn.o_proj.weight")]:
        sd[key.replace("o_proj", "k_proj")] = sd[key].clone()
    save_file(sd, path, metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"k_proj.weight: its quant state says shape "
                                             r"\[64, 64\], the model expects \[32, 64\]"):
        _load(bad)


def _save_8bit_with_transformers(src: str, dst: str) -> str:
    from transformers import AutoModelForCausalLM
    from transformers import BitsAndBytesConfig as HFBnbConfig

    model = AutoModelForCausalLM.from_pretrained(
        src, quantization_config=HFBnbConfig(load_in_8bit=True), device_map="cpu",
        dtype=torch.float32,
    )
    model.save_pretrained(dst, safe_serialization=True)
    return dst


@pytest.fixture(scope="module")
def int8_dir(fp32_dir, tmp_path_factory) -> str:
    return _save_8bit_with_transformers(fp32_dir, str(tmp_path_factory.mktemp("int8") / "q"))


def test_8bit_checkpoint_matches_transformers_int8(int8_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    model = _load(int8_dir)
    down = model.model.layers[0].mlp.down_proj
    assert down.weight.dtype == torch.int8 and down.SCB.dtype == torch.float32
    qkv = model.model.layers[1].self_attn.qkv_proj
    assert tuple(qkv.weight.shape) == (128, 64) and tuple(qkv.SCB.shape) == (128,)
    ids = torch.tensor([1, 5, 9, 33, 100, 7, 250, 3, 64, 12])
    ours = prefill_logits(model, ids)
    # LLM.int8() split out activation columns above llm_int8_threshold (6.0) here.
    assert down.bnb_int8_state.idx.numel() > 0
    hf = AutoModelForCausalLM.from_pretrained(int8_dir, device_map="cpu", dtype=torch.float32)
    with torch.no_grad():
        theirs = hf(ids[None]).logits[0]
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    # Near the model with the dequantized int8 weights (activations are int8 too: not equal).
    sd = load_file(os.path.join(int8_dir, "model.safetensors"))
    dense = {k: (bnb_functional.int8_vectorwise_dequant(v, sd[k[:-len("weight")] + "SCB"])
                 if v.dtype == torch.int8 else v)
             for k, v in sd.items() if not k.endswith(("SCB", "weight_format"))}
    ref = prefill_logits(_load(_write_fp32_dir(str(tmp_path / "ref"), int8_dir, dense)), ids)
    assert (ours - ref).abs().max() < 0.05 * ref.abs().max()
    # Greedy tokens as transformers generates them (one request: LLM.int8() picks outlier
    # columns over the whole batch, so a batch's composition changes its numbers).
    prompt = np.random.default_rng(1).integers(0, VOCAB, size=17).tolist()
    llm = LLM(model=int8_dir, skip_tokenizer_init=True, dtype="float32", kv_cache_space=0.05)
    (out,) = llm.generate([{"prompt_token_ids": prompt}], SamplingParams(
        temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)
    with torch.no_grad():
        hf_ids = hf.generate(torch.tensor([prompt]), max_new_tokens=12, min_new_tokens=12,
                             do_sample=False, pad_token_id=0)[0, len(prompt):].tolist()
    assert out.outputs[0].token_ids == hf_ids


def test_8bit_outlier_decomposition_runs_eagerly(int8_dir, bnb_dirs):
    from pagedllm.engine.arg_utils import EngineArgs

    assert EngineArgs(model=int8_dir).create_engine_config().enforce_eager
    qdir, _ = bnb_dirs("fp4-double")
    assert not EngineArgs(model=qdir).create_engine_config().enforce_eager


def test_8bit_checkpoint_in_another_layout_is_refused(int8_dir, tmp_path):
    bad = str(tmp_path / "col")
    shutil.copytree(int8_dir, bad)
    path = os.path.join(bad, "model.safetensors")
    sd = load_file(path)
    sd["model.layers.0.mlp.up_proj.weight_format"] = torch.tensor(2, dtype=torch.uint8)
    save_file(sd, path, metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="up_proj.weight_format is 2, not 0"):
        _load(bad)
    missing = _without(int8_dir, str(tmp_path / "noscb"), "model.layers.1.mlp.down_proj.SCB")
    with pytest.raises(ModelLoadError, match=r"lacks tensors .*model\.layers\.1\.mlp\.down_proj\.SCB"):
        _load(missing)
    with pytest.raises(ValueError, match="llm_int8_has_fp16_weight"):
        BitsAndBytesConfig.from_config({"load_in_8bit": True, "llm_int8_has_fp16_weight": True})


def test_tensor_parallel_shards_need_whole_blocks():
    from pagedllm.model_executor.layers.quantization.bnb_4bit import Packed4bit, shard_for_rank

    packed, state = bnb_functional.quantize_4bit(torch.randn(64, 96), blocksize=64)
    layer = SimpleNamespace(tp_size=2)
    with pytest.raises(ModelLoadError, match="48 of 96 input features .* block size 64"):
        shard_for_rank(layer, "model.layers.0.mlp.down_proj", [Packed4bit(packed, state, 64)],
                       48, 64, torch.device("cpu"))


def test_checkpoint_names():
    assert split_bnb_name("model.layers.0.mlp.up_proj.weight") == (
        "model.layers.0.mlp.up_proj", "weight")
    assert split_bnb_name("a.q_proj.weight.nested_quant_map") == (
        "a.q_proj", "weight.nested_quant_map")
    assert split_bnb_name("a.q_proj.weight.quant_state.bitsandbytes__fp4") == (
        "a.q_proj", "weight.quant_state.bitsandbytes__fp4")
    assert split_bnb_name("a.q_proj.bias") is None
    assert split_bnb_name("model.norm.weight_scale") is None
