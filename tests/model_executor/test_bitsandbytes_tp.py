"""Pre-quantized bitsandbytes 4-bit under tensor parallelism: two gloo ranks each cut their
slice of column-, fused- and row-parallel layers out of full checkpoint matrices (double
quant, nested absmax), and multiply as the unsharded dequantized weights do."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

HIDDEN, HEAD, HEADS, KV_HEADS, INTER = 128, 16, 4, 2, 256


def _checkpoint() -> dict[str, torch.Tensor]:
    """Full fp32 matrices of one layer's checkpoint modules (same on every rank)."""
    g = torch.Generator().manual_seed(0)
    shapes = {
        "q_proj": (HEADS * HEAD, HIDDEN), "k_proj": (KV_HEADS * HEAD, HIDDEN),
        "v_proj": (KV_HEADS * HEAD, HIDDEN), "gate_proj": (INTER, HIDDEN),
        "up_proj": (INTER, HIDDEN), "down_proj": (HIDDEN, INTER),
    }
    return {name: 0.1 * torch.randn(shape, generator=g) for name, shape in shapes.items()}


def _worker(rank: int, world: int, port: int, results: dict) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    from pagedllm.distributed import parallel_state as ps

    dist.init_process_group("gloo", rank=rank, world_size=world)
    ps.initialize_model_parallel(world, 1)  # the layers shard over the TP group
    try:
        results[rank] = _run_rank(rank, world)
    finally:
        ps.destroy_model_parallel()  # also destroys the default group


def _run_rank(rank: int, world: int) -> dict[str, float]:
    import bitsandbytes.functional as F

    from pagedllm.distributed.parallel_state import tensor_model_parallel_all_reduce
    from pagedllm.model_executor.layers.linear import (
        MergedColumnParallelLinear,
        QKVParallelLinear,
        RowParallelLinear,
    )
    from pagedllm.model_executor.layers.quantization.bitsandbytes import BitsAndBytesConfig

    dense = _checkpoint()
    weights, dequantized = [], {}
    for name, w in dense.items():
        packed, state = F.quantize_4bit(w, blocksize=64, compress_statistics=True,
                                        quant_type="nf4")
        dequantized[name] = F.dequantize_4bit(packed, state)
        block = "self_attn" if name in ("q_proj", "k_proj", "v_proj") else "mlp"
        prefix = f"model.layers.0.{block}"
        weights.append((f"{prefix}.{name}.weight", packed))
        weights += [(f"{prefix}.{name}.weight.{k}", v) for k, v in state.as_dict(True).items()]
    config = BitsAndBytesConfig.from_config({"load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
                                             "bnb_4bit_use_double_quant": True})
    config.check_device(torch.device("cpu"), torch.float32)
    layers = {
        "model.layers.0.self_attn.qkv_proj": QKVParallelLinear(HIDDEN, HEAD, HEADS, KV_HEADS),
        "model.layers.0.mlp.gate_up_proj": MergedColumnParallelLinear(HIDDEN, [INTER, INTER]),
        "model.layers.0.mlp.down_proj": RowParallelLinear(INTER, HIDDEN),
    }
    for prefix, layer in layers.items():
        layer.replace_linear_method(config.get_linear_method(layer, prefix))
    assert list(config.intercept_weights(weights)) == []  # every tensor kept for the layers
    assert config.checkpoint_tensors.hold_on_host
    for layer in layers.values():
        layer.linear_method.process_weights_after_loading(layer)
    x = torch.randn(5, INTER, generator=torch.Generator().manual_seed(1))
    xh = x[:, :HIDDEN]
    q, kv = HEADS * HEAD // world, KV_HEADS * HEAD // world
    rows = lambda name, n: dequantized[name][rank * n:(rank + 1) * n]  # noqa: E731
    expected = {
        "qkv": xh @ torch.cat([rows("q_proj", q), rows("k_proj", kv), rows("v_proj", kv)]).T,
        "gate_up": xh @ torch.cat([rows("gate_proj", INTER // world),
                                   rows("up_proj", INTER // world)]).T,
        "down": x @ dequantized["down_proj"].T,
    }
    qkv, gate_up, down = layers.values()
    local = INTER // world
    got = {
        "qkv": qkv(xh), "gate_up": gate_up(xh),
        "down": tensor_model_parallel_all_reduce(
            down.linear_method.apply(down, x[:, rank * local:(rank + 1) * local])),
    }
    return {k: (got[k] - expected[k]).abs().max().item() for k in expected} | {
        "parts": float(len(qkv.bnb_parts)), "nested": float(qkv.bnb_parts[0].state.nested)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_match_the_unsharded_dequantized_layers() -> None:
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_worker, args=(2, _free_port(), results), nprocs=2, join=True)
        results = dict(results)
    for rank in range(2):
        r = results[rank]
        # One merged matrix per rank, its double-quant scales expanded to float32.
        assert r.pop("parts") == 1 and r.pop("nested") == 0
        assert max(r.values()) < 1e-5, (rank, r)
