"""The quantization registry and method resolution (flag vs checkpoint)."""

from types import SimpleNamespace

import pytest
import torch

from pagedllm.model_executor.layers.linear import (
    ColumnParallelLinear,
    LinearMethod,
    QKVParallelLinear,
    UnquantizedLinearMethod,
)
from pagedllm.model_executor.layers.quantization import (
    get_quantization_config_cls,
    resolve_quantization,
)
from pagedllm.model_executor.layers.quantization.base_config import (
    checkpoint_module_names,
    is_layer_skipped,
)


def test_unknown_method_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="unknown quantization method 'int3'.*fp8, awq"):
        get_quantization_config_cls("int3")


def test_no_flag_no_checkpoint_config_is_unquantized():
    assert resolve_quantization(None, SimpleNamespace()) is None


def test_checkpoint_without_quant_method_is_refused():
    cfg = SimpleNamespace(quantization_config={"bits": 4})
    with pytest.raises(ValueError, match="no quant_method"):
        resolve_quantization(None, cfg)


def test_fused_layer_names_and_ignore_lists():
    assert checkpoint_module_names("model.layers.0.self_attn.qkv_proj") == [
        "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj",
        "model.layers.0.self_attn.v_proj"]
    assert is_layer_skipped("model.layers.3.mlp.down_proj", ["down_proj"])
    assert is_layer_skipped("model.layers.3.mlp.gate_up_proj", ["re:.*mlp.*"])
    assert not is_layer_skipped("model.layers.3.mlp.down_proj", ["lm_head"])
    with pytest.raises(ValueError, match="fuses"):
        is_layer_skipped("model.layers.0.self_attn.qkv_proj", ["model.layers.0.self_attn.q_proj"])


class _HalfWidthMethod(LinearMethod):
    """A stand-in method that stores the weight in another tensor name."""

    def create_weights(self, layer, input_size_per_partition, output_partition_sizes,
                       input_size, output_size, params_dtype):
        w = torch.nn.Parameter(torch.zeros(sum(output_partition_sizes), input_size_per_partition),
                               requires_grad=False)
        w.output_dim, w.input_dim = 0, 1
        layer.register_parameter("qweight", w)

    def apply(self, layer, x, bias=None):
        return torch.nn.functional.linear(x, layer.qweight, bias)


def test_replace_linear_method_recreates_weights_and_keeps_the_bias():
    layer = ColumnParallelLinear(8, 6, bias=True)
    layer.replace_linear_method(_HalfWidthMethod())
    names = {n for n, _ in layer.named_parameters()}
    assert names == {"qweight", "bias"}
    assert layer.qweight.weight_loader == layer.weight_loader
    layer.weight_loader(layer.qweight, torch.ones(6, 8))
    layer.bias.data.zero_()
    assert torch.equal(layer(torch.ones(1, 8)), torch.full((1, 6), 8.0))
    qkv = QKVParallelLinear(16, 4, 4, 2)
    assert isinstance(qkv.linear_method, UnquantizedLinearMethod)
    qkv.replace_linear_method(_HalfWidthMethod())
    assert tuple(qkv.qweight.shape) == (32, 16)
