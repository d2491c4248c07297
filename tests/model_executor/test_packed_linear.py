"""Packed (GPTQ / AWQ) weights through the linear layers' loaders, at TP=1 and faked TP>1.

Layers are built under a patched tensor-parallel rank/size, so each rank's slice of the
packed checkpoint tensors is proven without processes: every rank's dequantized weight must
be exactly its slice of the full dequantized weight.
"""

from __future__ import annotations

from contextlib import contextmanager
from unittest import mock

import numpy as np
import pytest
import torch

from pagedllm.model_executor.layers import linear
from pagedllm.model_executor.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from pagedllm.model_executor.layers.quantization.awq import AWQLinearMethod
from pagedllm.model_executor.layers.quantization.gptq import GPTQLayerSpec, GPTQLinearMethod
from tests.model_executor.quant_formats import (
    QuantSpec,
    _awq_tensors,
    _gptq_tensors,
    quantize_weight,
)


@contextmanager
def fake_tp(rank: int, size: int):
    with mock.patch.object(linear, "get_tensor_model_parallel_rank", return_value=rank), \
            mock.patch.object(linear, "get_tensor_model_parallel_world_size", return_value=size):
        yield


def _quantized(n: int, k: int, spec: QuantSpec, seed: int, perm=None):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    bits = spec.bits if spec.method == "gptq" else 4
    qw = quantize_weight(w, bits, spec.group_size, spec.sym, perm,
                         1 if spec.checkpoint_format == "gptq" else 0)
    tensors = _gptq_tensors(qw, spec) if spec.method == "gptq" else _awq_tensors(qw, spec)
    return tensors, qw.dequant  # dequant: [N, K]


def _method(spec: QuantSpec):
    if spec.method == "awq":
        return AWQLinearMethod(spec.group_size, spec.zero_point)
    return GPTQLinearMethod(GPTQLayerSpec(spec.bits, spec.group_size, spec.desc_act, spec.sym,
                                          spec.checkpoint_format == "gptq"))


def _load(layer, tensors, shard_id=None):
    params = dict(layer.named_parameters())
    for name, t in tensors.items():
        layer.weight_loader(params[name], t, shard_id)
    layer.linear_method.process_weights_after_loading(layer)
    return layer.weight  # [N_partition, K_partition]: dequantized at load on CPU


QKV_SPECS = [
    QuantSpec("gptq", bits=4, group_size=32, sym=False, checkpoint_format="gptq_v2"),
    QuantSpec("gptq", bits=3, group_size=-1, sym=False),
    QuantSpec("gptq", bits=8, group_size=16, desc_act=True),
    QuantSpec("awq", group_size=32, sym=False),
]


@pytest.mark.parametrize("spec", QKV_SPECS, ids=lambda s: f"{s.method}{s.bits}g{s.group_size}")
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_qkv_shards_match_the_full_weight(spec: QuantSpec, tp: int) -> None:
    hidden, head, heads, kv_heads = 64, 32, 4, 2
    perm = np.random.default_rng(0).permutation(hidden) if spec.desc_act else None
    parts = {sid: _quantized(n, hidden, spec, seed, perm) for sid, n, seed in
             (("q", heads * head, 1), ("k", kv_heads * head, 2), ("v", kv_heads * head, 3))}
    for rank in range(tp):
        with fake_tp(rank, tp):
            layer = QKVParallelLinear(hidden, head, heads, kv_heads)
            layer.replace_linear_method(_method(spec))
        params = dict(layer.named_parameters())
        for sid, (tensors, _) in parts.items():
            for name, t in tensors.items():
                layer.weight_loader(params[name], t, sid)
        layer.linear_method.process_weights_after_loading(layer)
        q_rows = heads * head // tp
        kv_rank = rank // max(1, tp // kv_heads)
        kv_rows = max(1, kv_heads // tp) * head
        expected = torch.cat([
            parts["q"][1][rank * q_rows:(rank + 1) * q_rows],
            parts["k"][1][kv_rank * kv_rows:(kv_rank + 1) * kv_rows],
            parts["v"][1][kv_rank * kv_rows:(kv_rank + 1) * kv_rows],
        ])
        assert torch.equal(layer.weight, expected), rank


@pytest.mark.parametrize("spec", [
    QuantSpec("gptq", bits=4, group_size=32, sym=False),
    QuantSpec("gptq", bits=4, group_size=32, desc_act=True, checkpoint_format="gptq_v2"),
    QuantSpec("gptq", bits=2, group_size=-1),
    QuantSpec("awq", group_size=64, sym=False),
    QuantSpec("awq", group_size=32, sym=True, zero_point=False),  # no qzeros: offset 8
], ids=lambda s: f"{s.method}{s.bits}g{s.group_size}{'act' if s.desc_act else ''}"
                 f"{'' if s.zero_point else 'nozp'}")
def test_row_parallel_shards_sum_to_the_full_product(spec: QuantSpec) -> None:
    k, n, tp = 256, 48, 2
    perm = np.random.default_rng(1).permutation(k) if spec.desc_act else None
    tensors, full = _quantized(n, k, spec, 5, perm)
    x = torch.randn(3, k, generator=torch.Generator().manual_seed(6))
    total = torch.zeros(3, n)
    for rank in range(tp):
        with fake_tp(rank, tp):
            layer = RowParallelLinear(k, n)
            layer.replace_linear_method(_method(spec))
        # Groups split with the rows, except under act order (all groups on every rank).
        groups = {-1: 1}.get(spec.group_size, k // spec.group_size)
        assert layer.scales.shape[0] == (groups if spec.desc_act or spec.group_size == -1
                                         else groups // tp)
        w = _load(layer, tensors)
        assert torch.equal(w, full[:, rank * k // tp:(rank + 1) * k // tp])
        total += layer(x[:, rank * k // tp:(rank + 1) * k // tp])
    torch.testing.assert_close(total, x @ full.t(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_merged_column_parallel_split_and_pre_merged(method: str) -> None:
    spec = QuantSpec(method, bits=4, group_size=32, sym=False, checkpoint_format="gptq_v2")
    hidden, inter, tp = 64, 96, 2
    gate, gate_w = _quantized(inter, hidden, spec, 7)
    up, up_w = _quantized(inter, hidden, spec, 8)
    for rank in range(tp):
        with fake_tp(rank, tp):
            split = MergedColumnParallelLinear(hidden, [inter, inter])
            merged = MergedColumnParallelLinear(hidden, [inter, inter])
        for layer in (split, merged):
            layer.replace_linear_method(_method(spec))
        params = dict(split.named_parameters())
        for sid, tensors in ((0, gate), (1, up)):
            for name, t in tensors.items():
                split.weight_loader(params[name], t, sid)
        split.linear_method.process_weights_after_loading(split)
        # A checkpoint that stores gate and up already fused along the output.
        fused = {name: torch.cat([gate[name], up[name]], dim=-1 if name != "g_idx" else 0)
                 for name in gate if name != "g_idx"}
        if "g_idx" in gate:
            fused["g_idx"] = gate["g_idx"]
        _load(merged, fused)
        half = inter // tp
        expected = torch.cat([gate_w[rank * half:(rank + 1) * half],
                              up_w[rank * half:(rank + 1) * half]])
        assert torch.equal(split.weight, expected)
        assert torch.equal(merged.weight, expected)


def test_fused_parts_with_different_act_order_are_refused() -> None:
    spec = QuantSpec("gptq", bits=4, group_size=16, desc_act=True, checkpoint_format="gptq_v2")
    rng = np.random.default_rng(3)
    gate, _ = _quantized(32, 64, spec, 1, rng.permutation(64))
    up, _ = _quantized(32, 64, spec, 2, rng.permutation(64))
    layer = MergedColumnParallelLinear(64, [32, 32])
    layer.replace_linear_method(_method(spec))
    params = dict(layer.named_parameters())
    layer.weight_loader(params["g_idx"], gate["g_idx"], 0)
    with pytest.raises(ValueError, match="disagree.*g_idx"):
        layer.weight_loader(params["g_idx"], up["g_idx"], 1)


def test_partition_not_holding_whole_groups_is_refused() -> None:
    with fake_tp(0, 2):
        layer = RowParallelLinear(128, 64)
    with pytest.raises(ValueError, match="group_size 128 does not divide this rank's input "
                                         "partition 64"):
        layer.replace_linear_method(_method(QuantSpec("gptq", group_size=128)))
    with pytest.raises(ValueError, match="AWQ group_size 128 does not divide this rank's"):
        layer.replace_linear_method(_method(QuantSpec("awq", group_size=128)))


def test_three_bit_shard_not_filling_whole_words_is_refused() -> None:
    # 3-bit packs 32 values to 3 words: a 16-wide KV partition cannot be split out of qzeros.
    with fake_tp(0, 4):
        layer = QKVParallelLinear(64, 16, 4, 2)
    with pytest.raises(ValueError, match="do not fill whole int32 words"):
        layer.replace_linear_method(_method(QuantSpec("gptq", bits=3, group_size=-1)))


def test_packed_offsets_convert_logical_features() -> None:
    layer = MergedColumnParallelLinear(32, [16, 24])
    param = torch.nn.Parameter(torch.zeros(4, 5, dtype=torch.int32), requires_grad=False)
    param.output_dim, param.packed_dim, param.packed_factor = 1, 1, 8
    with pytest.raises(ValueError, match="do not fill whole packed words"):
        linear._packed(param, 1, 12)
    assert linear._packed(param, 1, 16) == 2 and linear._packed(param, 0, 16) == 16
    part = torch.arange(12, dtype=torch.int32).reshape(4, 3)
    layer.weight_loader(param, part, 1)
    assert torch.equal(param.data[:, 2:], part) and not param.data[:, :2].any()
