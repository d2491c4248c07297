"""compressed-tensors FP8 checkpoints written by the `compressed-tensors` library itself
(apply its scheme, set scales with its own qparam helper, compress, save), loaded through
the normal loader and checked against a transformers reference whose weights come from the
library's own `dequantize`, with the scheme's activation rounding simulated."""

from __future__ import annotations

import pytest
import torch

from pagedllm import LLM, SamplingParams
from pagedllm.model_executor.loader.errors import ModelLoadError
from pagedllm.model_executor.loader.testing import build_random_hf_model_dir
from tests.model_executor.conftest import load_ours, prefill_logits, tiny_config
from tests.model_executor.quant_reference import (
    ReferenceModel,
    calibrate_input_scales,
    fused_max,
    linear_names,
    rewrite_checkpoint,
)

IDS = torch.tensor([5, 80, 13, 201, 44, 9, 160, 77, 3, 120])
TOL = 2e-3
IGNORED = "model.layers.1.mlp.down_proj"


def _scheme(name: str) -> dict:
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES

    if name == "FP8_W8A16":  # fp8 channel weights, 16-bit activations
        return {"weights": QuantizationArgs(num_bits=8, type="float", strategy="channel",
                                            symmetric=True, dynamic=False)}
    return dict(PRESET_SCHEMES[name])


def write_ct_checkpoint(base: str, dst: str, scheme: str) -> tuple[str, ReferenceModel]:
    """`base` quantized with the library's `scheme` preset into `dst`, and its reference."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationConfig,
        QuantizationScheme,
        apply_quantization_config,
    )
    from compressed_tensors.quantization.lifecycle.forward import dequantize
    from compressed_tensors.quantization.utils import calculate_qparams
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    names = [n for n in linear_names(2) if n != IGNORED]
    amax = {n: s * 448.0 for n, s in calibrate_input_scales(model, names, IDS).items()}
    config = QuantizationConfig(
        config_groups={"group_0": QuantizationScheme(targets=["Linear"], **_scheme(scheme))},
        ignore=["lm_head", r"re:.*layers\.1\.mlp\.down_proj$"],
    )
    apply_quantization_config(model, config)
    modules = dict(model.named_modules())
    act: dict[str, str | float] = {}
    scales: dict[str, float] = {}
    for i, n in enumerate(names):
        mod, args = modules[n], modules[n].quantization_scheme
        w = mod.weight.data
        dims = dict(dim=1, keepdim=True) if args.weights.strategy == "channel" else {}
        scale, _ = calculate_qparams(w.amin(**dims).reshape(mod.weight_scale.shape),
                                     w.amax(**dims).reshape(mod.weight_scale.shape),
                                     args.weights)
        mod.weight_scale.data.copy_(scale)
        a = args.input_activations
        if a is not None and not a.dynamic:
            # Fused shards get different scales, as separate observers would give them.
            m = torch.tensor([amax[n] * (1.0 + 0.25 * (i % 3))])
            s, _ = calculate_qparams(-m, m, a)
            mod.input_scale.data.copy_(s)
            scales[n] = s.item()
        elif a is not None:
            act[n] = "dynamic"
    act.update(fused_max(scales))
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format="float-quantized")
    compressor.compress_model(model)
    deq = {n: dequantize(modules[n].weight, modules[n].weight_scale,
                         args=modules[n].quantization_scheme.weights, dtype=torch.float32)
           for n in names}
    model.save_pretrained(dst)
    compressor.update_config(dst)
    return dst, ReferenceModel(base, deq, act)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("ct") / "llama")
    return build_random_hf_model_dir(path, tiny_config("LlamaForCausalLM"), seed=5, std=0.1)


@pytest.mark.parametrize("scheme", ["FP8", "FP8_DYNAMIC", "FP8_W8A16"])
def test_library_checkpoint_matches_reference(base_dir, tmp_path, scheme):
    path, ref = write_ct_checkpoint(base_dir, str(tmp_path / scheme), scheme)
    ours = load_ours(path)
    assert ours.model.layers[1].mlp.down_proj.weight.dtype == torch.float32  # re: ignore
    gate_up = ours.model.layers[0].mlp.gate_up_proj
    assert gate_up.weight.dtype == torch.float8_e4m3fn
    assert hasattr(gate_up, "input_scale") == (scheme == "FP8")  # static activations
    # Per-tensor scales (FP8) stay one per fused part; per-channel ones one per row.
    assert len(torch.unique(gate_up.weight_scale)) == (2 if scheme == "FP8" else 256)
    got, want = prefill_logits(ours, IDS), ref.logits(IDS)
    assert (got - want).abs().max() < TOL


def test_qwen2_dynamic_greedy_through_llm(tmp_path):
    base = build_random_hf_model_dir(str(tmp_path / "qwen"), tiny_config("Qwen2ForCausalLM"),
                                     seed=6, std=0.1)
    path, ref = write_ct_checkpoint(base, str(tmp_path / "ct"), "FP8_DYNAMIC")
    llm = LLM(model=path, skip_tokenizer_init=True, dtype="float32", kv_cache_space=0.05)
    assert llm.llm_engine.model_config.quantization == "compressed-tensors"
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    prompts = [IDS[:4].tolist(), IDS.tolist()]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for p, o in zip(prompts, outs):
        assert list(o.outputs[0].token_ids) == ref.greedy(p, 6)


def test_flag_contradicting_the_checkpoint_is_refused(base_dir, tmp_path):
    path, _ = write_ct_checkpoint(base_dir, str(tmp_path / "ct"), "FP8_DYNAMIC")
    with pytest.raises(ValueError, match="--quantization fp8 contradicts.*compressed-tensors"):
        LLM(model=path, skip_tokenizer_init=True, quantization="fp8")


def test_unsupported_scheme_is_refused_by_name(base_dir, tmp_path):
    qc = {"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {
        "group_0": {"targets": ["Linear"], "weights": {
            "num_bits": 4, "type": "int", "strategy": "group", "group_size": 128,
            "symmetric": True, "dynamic": False}}}, "ignore": ["lm_head"]}
    path = rewrite_checkpoint(base_dir, str(tmp_path / "w4"), lambda t: t, qc)
    with pytest.raises(ModelLoadError, match=r"scheme W4A16 \(weights int4 group group_size "
                       r"128.*format pack-quantized.*layer model\.layers\.0\.self_attn\.qkv_proj"):
        load_ours(path)


def test_missing_input_scale_names_the_tensor(base_dir, tmp_path):
    path, _ = write_ct_checkpoint(base_dir, str(tmp_path / "ct"), "FP8")

    def drop(tensors):
        del tensors["model.layers.1.mlp.up_proj.input_scale"]
        return tensors

    bad = rewrite_checkpoint(path, str(tmp_path / "bad"), drop, None)
    with pytest.raises(ModelLoadError, match=r"compressed-tensors checkpoint lacks tensors.*"
                       r"model\.layers\.1\.mlp\.gate_up_proj\.input_scale.*"
                       r"model\.layers\.1\.mlp\.up_proj\.input_scale"):
        load_ours(bad)
