"""fp8 W8A8 through the normal loader: on-the-fly (`quantization="fp8"` on a 16-bit
checkpoint) and pre-quantized `quant_method: fp8` checkpoints (per-tensor scales, static or
dynamic activations), against a transformers reference holding the same dequantized weights
in fp32 with the same activation rounding (tests/model_executor/quant_reference.py)."""

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
    dequant_per_block,
    fused_max,
    linear_names,
    quant_per_block,
    quant_per_channel,
    quant_per_tensor,
    rewrite_checkpoint,
)

IDS = torch.tensor([3, 17, 250, 9, 41, 100, 7, 7, 199, 64, 2, 31])
# Our logits vs the reference's: both round the same e4m3 values, so only fp32 summation
# order differs. Without the activation rounding simulated the gap is ~2e-2 (checked below).
TOL = 2e-3
IGNORED = "model.layers.1.mlp.down_proj"


@pytest.fixture(scope="module", params=["LlamaForCausalLM", "Qwen2ForCausalLM"])
def base_dir(request, tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("fp8") / request.param)
    return build_random_hf_model_dir(path, tiny_config(request.param), seed=3, std=0.1)


def _fp8_checkpoint(base: str, dst: str, static: bool) -> tuple[str, ReferenceModel]:
    """A `quant_method: fp8` checkpoint of `base` (per-tensor weight scales, one layer left
    16-bit) and its reference."""
    from transformers import AutoModelForCausalLM

    names = [n for n in linear_names(2) if n != IGNORED]
    hf = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    # Shards of a fused layer get different input scales, as calibration would give them.
    scales = {n: s * (1.0 + 0.25 * (i % 3))
              for i, (n, s) in enumerate(calibrate_input_scales(hf, names, IDS).items())}
    deq: dict[str, torch.Tensor] = {}

    def transform(tensors):
        for n in names:
            q, s = quant_per_tensor(tensors[f"{n}.weight"])
            deq[n] = q.float() * s
            tensors[f"{n}.weight"] = q
            tensors[f"{n}.weight_scale"] = s.reshape(())  # AutoFP8 writes 0-d scales
            if static:
                tensors[f"{n}.input_scale"] = torch.tensor(scales[n], dtype=torch.float32)
        return tensors

    qc = {"quant_method": "fp8", "activation_scheme": "static" if static else "dynamic",
          "ignored_layers": [IGNORED]}
    path = rewrite_checkpoint(base, dst, transform, qc)
    act = fused_max(scales) if static else dict.fromkeys(names, "dynamic")
    return path, ReferenceModel(base, deq, act)


def test_on_the_fly_fp8_matches_reference(base_dir):
    names = linear_names(2)
    hf_weights = ReferenceModel(base_dir, {}, {}).model.state_dict()
    deq = {}
    for n in names:
        q, s = quant_per_channel(hf_weights[f"{n}.weight"])
        deq[n] = q.float() * s
    ref = ReferenceModel(base_dir, deq, dict.fromkeys(names, "dynamic"))
    ours = load_ours(base_dir, quantization="fp8")
    layer = ours.model.layers[0].self_attn.qkv_proj
    assert layer.weight.dtype == torch.float8_e4m3fn
    assert layer.weight_scale.shape == (layer.weight.shape[0],)
    got, want = prefill_logits(ours, IDS), ref.logits(IDS)
    assert (got - want).abs().max() < TOL
    # The simulated rounding matters: the unrounded model is much further away.
    unrounded = ReferenceModel(base_dir, deq, {}).logits(IDS)
    assert (got - unrounded).abs().max() > 5 * TOL


@pytest.mark.parametrize("static", [True, False], ids=["static", "dynamic"])
def test_fp8_checkpoint_matches_reference(base_dir, tmp_path, static):
    path, ref = _fp8_checkpoint(base_dir, str(tmp_path / "ckpt"), static)
    ours = load_ours(path)
    assert ours.model.layers[1].mlp.down_proj.weight.dtype == torch.float32  # ignored
    qkv = ours.model.layers[0].self_attn.qkv_proj
    assert qkv.weight.dtype == torch.float8_e4m3fn
    # Per-shard scales kept for their own rows: q, k and v rows differ.
    assert len(torch.unique(qkv.weight_scale)) == 3
    if static:
        assert qkv.input_scale.shape == (1,)
    got, want = prefill_logits(ours, IDS), ref.logits(IDS)
    assert (got - want).abs().max() < TOL


def test_fp8_checkpoint_greedy_through_llm(base_dir, tmp_path):
    path, ref = _fp8_checkpoint(base_dir, str(tmp_path / "ckpt"), static=True)
    llm = LLM(model=path, skip_tokenizer_init=True, dtype="float32", kv_cache_space=0.05)
    assert llm.llm_engine.model_config.quantization == "fp8"
    prompts = [IDS[:5].tolist(), IDS.tolist()]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for p, o in zip(prompts, outs):
        assert list(o.outputs[0].token_ids) == ref.greedy(p, 6)


def test_flag_contradicting_the_checkpoint_is_refused(base_dir, tmp_path):
    path, _ = _fp8_checkpoint(base_dir, str(tmp_path / "ckpt"), static=False)
    with pytest.raises(ValueError, match="contradicts the checkpoint.*'fp8'"):
        LLM(model=path, skip_tokenizer_init=True, quantization="compressed-tensors")


def test_missing_weight_scale_names_the_tensor_and_quantization(base_dir, tmp_path):
    def drop(tensors):
        for n in linear_names(2):
            q, s = quant_per_tensor(tensors[f"{n}.weight"])
            tensors[f"{n}.weight"], tensors[f"{n}.weight_scale"] = q, s
        del tensors["model.layers.0.self_attn.k_proj.weight_scale"]
        return tensors

    path = rewrite_checkpoint(base_dir, str(tmp_path / "bad"), drop,
                              {"quant_method": "fp8", "activation_scheme": "dynamic"})
    with pytest.raises(ModelLoadError, match=r"fp8 checkpoint lacks tensors.*"
                       r"model\.layers\.0\.self_attn\.qkv_proj\.weight_scale.*"
                       r"model\.layers\.0\.self_attn\.k_proj\.weight_scale"):
        load_ours(path)


def test_16_bit_weights_under_an_fp8_config_are_refused(base_dir, tmp_path):
    path = rewrite_checkpoint(base_dir, str(tmp_path / "fake"), lambda t: t,
                              {"quant_method": "fp8", "activation_scheme": "dynamic"})
    with pytest.raises(ModelLoadError, match=r"fp8 checkpoint does not fit the model: tensor "
                       r"model\.layers\.0\.mlp\.down_proj\.weight: an fp8 weight in the "
                       r"checkpoint has dtype float32, expected float8_e4m3fn"):
        load_ours(path)


def test_block_wise_fp8_checkpoint_matches_reference(base_dir, tmp_path):
    """`weight_block_size` checkpoints (`weight_scale_inv` per block, dynamic per-token-group
    activations), fused q/k/v and gate/up parts each with their own rows of blocks."""
    bn, bk = 16, 32
    names = linear_names(2)
    deq = {}

    def transform(tensors):
        for n in names:
            q, s = quant_per_block(tensors[f"{n}.weight"], bn, bk)
            deq[n] = dequant_per_block(q, s, bn, bk)
            tensors[f"{n}.weight"], tensors[f"{n}.weight_scale_inv"] = q, s
        return tensors

    path = rewrite_checkpoint(base_dir, str(tmp_path / "block"), transform, {
        "quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [bn, bk]})
    ref = ReferenceModel(base_dir, deq, dict.fromkeys(names, ("group", bk)))
    ours = load_ours(path)
    assert ours.model.layers[0].self_attn.qkv_proj.weight_scale_inv.shape == (128 // bn, 2)
    got, want = prefill_logits(ours, IDS), ref.logits(IDS)
    assert (got - want).abs().max() < TOL


def test_block_wise_fp8_that_does_not_tile_is_refused(base_dir, tmp_path):
    path = rewrite_checkpoint(base_dir, str(tmp_path / "block"), lambda t: t, {
        "quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [24, 32]})
    with pytest.raises(ModelLoadError, match=r"weight_block_size \[24, 32\] does not tile"):
        load_ours(path)


def test_unknown_activation_scheme_is_refused():
    from pagedllm.model_executor.layers.quantization.fp8 import Fp8Config

    with pytest.raises(ValueError, match="activation_scheme 'per_group'"):
        Fp8Config.from_config({"quant_method": "fp8", "activation_scheme": "per_group"})


def test_on_the_fly_quantizes_each_layer_once_its_parts_are_in():
    """The 16-bit staging copy lives only until the last part of a fused layer arrives."""
    from pagedllm.model_executor.layers.linear import QKVParallelLinear
    from pagedllm.model_executor.layers.quantization.fp8 import Fp8Config

    layer = QKVParallelLinear(32, 8, 4, 2)  # q 32 rows, k 16, v 16
    layer.replace_linear_method(Fp8Config.for_on_the_fly().get_linear_method(layer, "qkv_proj"))
    layer.weight.data.zero_()
    loader = layer.weight.weight_loader
    g = torch.Generator().manual_seed(0)
    parts = {sid: torch.randn(rows, 32, generator=g) for sid, rows in
             (("q", 32), ("k", 16), ("v", 16))}
    loader(layer.weight, parts["q"], "q")
    loader(layer.weight, parts["k"], "k")
    assert loader.staging is not None and not layer.weight.float().any()
    loader(layer.weight, parts["v"], "v")
    assert loader.staging is None
    layer.linear_method.process_weights_after_loading(layer)
    q, s = quant_per_channel(torch.cat([parts["q"], parts["k"], parts["v"]]))
    assert torch.equal(layer.weight.float(), q.float())
    torch.testing.assert_close(layer.weight_scale, s.view(-1), rtol=0, atol=0)
