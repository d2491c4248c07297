"""Start-up refusals of impossible layouts (naming the flag) and --load-format dummy."""

from __future__ import annotations

import pytest
import torch

from pagedllm.config import ParallelConfig
from pagedllm.engine.arg_utils import EngineArgs
from pagedllm.engine.parallel_checks import check_parallel_layout
from pagedllm.model_executor.loader import ModelLoadError
from pagedllm.model_executor.loader.testing import build_random_hf_model_dir
from tests.embed.conftest import build_random_encoder_dir, tiny_encoder_config
from tests.model_executor.conftest import tiny_config


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("layout") / "llama"
    return build_random_hf_model_dir(str(path), tiny_config("LlamaForCausalLM"))


def _config(path: str, **kwargs):
    return EngineArgs(model=path, skip_tokenizer_init=True, **kwargs).create_engine_config()


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"tensor_parallel_size": 3}, ValueError,
         "--tensor-parallel-size 3 does not divide the model's 4 attention heads"),
        ({"pipeline_parallel_size": 3}, ValueError,
         "--pipeline-parallel-size 3 exceeds the model's 2 layers"),
        ({"tensor_parallel_size": 0}, ValueError, "--tensor-parallel-size must be a positive"),
        ({"tensor_parallel_size": 2, "distributed_executor_backend": "uni"}, ValueError,
         "--distributed-executor-backend uni runs one worker"),
        ({"load_format": "pt"}, ValueError, "--load-format must be one of"),
        ({"load_format": "gguf"}, ModelLoadError, "--load-format gguf does not fit"),
    ],
)
def test_impossible_layouts_are_refused(llama_dir, kwargs, error, match):
    with pytest.raises(error, match=match):
        _config(llama_dir, **kwargs)


def test_load_format_must_fit_the_checkpoint(llama_dir, tmp_path):
    assert _config(llama_dir, load_format="safetensors").model_config.load_format == "safetensors"
    import shutil

    from safetensors.torch import load_file

    (tmp_path / "bin").mkdir()
    shutil.copy(f"{llama_dir}/config.json", tmp_path / "bin" / "config.json")
    torch.save(load_file(f"{llama_dir}/model.safetensors"), tmp_path / "bin" / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="--load-format safetensors: .* PyTorch .bin"):
        _config(str(tmp_path / "bin"), load_format="safetensors")
    assert _config(str(tmp_path / "bin")).model_config.load_format == "auto"


def test_kv_heads_must_divide_or_be_divided(tmp_path):
    cfg = tiny_config("LlamaForCausalLM", hidden_size=96, num_attention_heads=6,
                      num_key_value_heads=4, head_dim=16, intermediate_size=192)
    path = build_random_hf_model_dir(str(tmp_path / "m"), cfg)
    with pytest.raises(ValueError, match="--tensor-parallel-size 3 and the model's 4 KV heads"):
        _config(path, tensor_parallel_size=3)
    # 2 ranks over 4 KV heads, 6 heads: a valid layout.
    assert _config(path, tensor_parallel_size=2).parallel_config.world_size == 2


def test_more_ranks_than_gpus_is_refused(llama_dir, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    model_config = _config(llama_dir).model_config
    with pytest.raises(ValueError, match=r"--tensor-parallel-size 2 x --pipeline-parallel-size "
                                         r"1 = 2 GPUs, but this machine has 1"):
        check_parallel_layout(2, 1, model_config, "cuda")


def test_pipeline_parallel_refuses_encoders(tmp_path):
    path = build_random_encoder_dir(str(tmp_path / "bert"), tiny_encoder_config())
    with pytest.raises(ValueError, match="--pipeline-parallel-size > 1 supports generative"):
        _config(path, pipeline_parallel_size=2)


def test_ray_backend_is_registered():
    from pagedllm.executor.base import available_executor_backends, get_executor_class
    from pagedllm.executor.ray_executor import RayExecutor

    assert "ray" in available_executor_backends()
    parallel = ParallelConfig(tensor_parallel_size=2, distributed_executor_backend="ray")
    assert get_executor_class(parallel) is RayExecutor


def test_dummy_load_format_reads_no_weights(tmp_path):
    """A directory with only config.json: `auto` fails (no weights), `dummy` makes them in
    place: norms at 1, matrices ~ normal(0, initializer_range), the same every load."""
    from pagedllm import LLM, SamplingParams
    from pagedllm.attention.backend import get_attn_backend
    from pagedllm.model_executor.loader import load_model

    cfg = tiny_config("LlamaForCausalLM", initializer_range=0.05)
    cfg.save_pretrained(str(tmp_path))
    with pytest.raises(ModelLoadError, match="no weight files"):
        LLM(str(tmp_path), skip_tokenizer_init=True)
    mc = _config(str(tmp_path), load_format="dummy").model_config
    models = [load_model(mc, torch.device("cpu"), get_attn_backend("torch_ref")) for _ in "ab"]
    params = dict(models[0].named_parameters())
    assert torch.equal(params["model.norm.weight"], torch.ones(64))
    down = params["model.layers.1.mlp.down_proj.weight"]
    assert abs(down.std().item() - 0.05) < 0.005 and abs(down.mean().item()) < 0.005
    for name, p in models[1].named_parameters():
        assert torch.equal(p, params[name]), name
    llm = LLM(str(tmp_path), skip_tokenizer_init=True, load_format="dummy", kv_cache_space=0.02)
    out = llm.generate([{"prompt_token_ids": [1, 2, 3]}],
                       SamplingParams(temperature=0, max_tokens=4, ignore_eos=True),
                       use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4


def test_dummy_load_format_with_fp8_quantized_on_the_fly(tmp_path):
    """`--load-format dummy --quantization fp8`: the random 16-bit values go through the
    method's quantize-at-load path (e4m3 weights, positive per-channel scales)."""
    from pagedllm import LLM, SamplingParams

    tiny_config("LlamaForCausalLM", initializer_range=0.05).save_pretrained(str(tmp_path))
    llm = LLM(str(tmp_path), skip_tokenizer_init=True, load_format="dummy", quantization="fp8",
              kv_cache_space=0.02)
    model = llm.llm_engine.engine_core.executor.worker.model_runner.model
    qkv = model.model.layers[0].self_attn.qkv_proj
    assert qkv.weight.dtype == torch.float8_e4m3fn
    assert bool((qkv.weight_scale > 0).all()) and qkv.weight.float().abs().max() > 0
    # per-channel scale x e4m3 values ~ normal(0, 0.05)
    assert abs((qkv.weight.float() * qkv.weight_scale[:, None]).std().item() - 0.05) < 0.01
    out = llm.generate([{"prompt_token_ids": [1, 2, 3]}],
                       SamplingParams(temperature=0, max_tokens=4, ignore_eos=True),
                       use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4


def test_dummy_load_format_with_gptq_takes_the_plain_kernel_path(tmp_path, monkeypatch):
    """`--load-format dummy` on a GPTQ config: g_idx holds row // group_size (a checkpoint
    without act order), so the kernel layout has no row permutation and no g_idx (zeros in
    g_idx would look like act order: a gather of x per call and the slower g_idx kernel)."""
    from pagedllm import LLM, SamplingParams
    from pagedllm.model_executor.layers.quantization import int_linear

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(int_linear, "KERNEL_ON_CPU", True)
    cfg = tiny_config("LlamaForCausalLM", initializer_range=0.05)
    cfg.quantization_config = {"quant_method": "gptq", "bits": 4, "group_size": 32,
                               "desc_act": False, "sym": True}
    cfg.save_pretrained(str(tmp_path))
    llm = LLM(str(tmp_path), skip_tokenizer_init=True, load_format="dummy", kv_cache_space=0.02)
    model = llm.llm_engine.engine_core.executor.worker.model_runner.model
    for name, layer in model.named_modules():
        if hasattr(layer, "int_qweight"):
            assert "int_perm" not in layer._parameters, name
            assert "int_g_idx" not in layer._parameters, name
    assert hasattr(model.model.layers[0].mlp.down_proj, "int_qweight")
    out = llm.generate([{"prompt_token_ids": [1, 2, 3]}],
                       SamplingParams(temperature=0, max_tokens=4, ignore_eos=True),
                       use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4
