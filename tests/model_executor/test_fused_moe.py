"""The MoE layer: routing, the CPU path grouped by expert and the fused Triton kernel against a
per-token reference (uneven expert loads, an expert with no tokens, top-1 and top-2), the
per-expert alignment, and tensor-parallel sharding of the expert weights.

The Triton kernel runs on CPU under TRITON_INTERPRET=1 (set below when no GPU is present).
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pagedllm.model_executor.layers.fused_moe.layer as moe_layer  # noqa: E402
from pagedllm.model_executor.layers.fused_moe import FusedMoE, select_experts  # noqa: E402
from pagedllm.model_executor.layers.fused_moe.torch_moe import (  # noqa: E402
    experts_ref,
    grouped_experts_torch,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
E, H, INTER = 5, 32, 40  # intermediate not a multiple of the tiles: masked edges


def _weights(gen: torch.Generator, dtype=torch.float32):
    w13 = (torch.randn(E, 2 * INTER, H, generator=gen) * 0.2).to(dtype)
    w2 = (torch.randn(E, H, INTER, generator=gen) * 0.2).to(dtype)
    return w13, w2


def _routing(num_tokens: int, top_k: int, gen: torch.Generator):
    """Skewed routing: expert 0 gets most pairs, expert 3 none."""
    logits = torch.randn(num_tokens, E, generator=gen)
    logits[:, 0] += 2.0
    logits[:, 3] = -1e4
    return select_experts(logits, top_k, renormalize=top_k > 1)


def test_select_experts_softmax_topk_renormalize():
    logits = torch.tensor([[0.0, 1.0, 2.0, -1.0], [3.0, 0.0, 0.0, 0.0]])
    w, ids = select_experts(logits, 2, renormalize=False)
    probs = torch.softmax(logits, -1)
    assert ids[0].tolist() == [2, 1] and int(ids[1, 0]) == 0  # row 1 ties after expert 0
    torch.testing.assert_close(w, probs.gather(1, ids))
    w_n, ids_n = select_experts(logits, 2, renormalize=True)
    assert torch.equal(ids_n, ids)
    torch.testing.assert_close(w_n.sum(-1), torch.ones(2))
    with pytest.raises(ValueError, match="top_k"):
        select_experts(logits, 5, renormalize=True)


@pytest.mark.parametrize("top_k", [1, 2])
def test_grouped_torch_path_matches_reference(top_k):
    gen = torch.Generator().manual_seed(top_k)
    w13, w2 = _weights(gen)
    x = torch.randn(23, H, generator=gen)
    weights, ids = _routing(23, top_k, gen)
    assert 3 not in ids.tolist()[0] and int((ids == 3).sum()) == 0
    out = grouped_experts_torch(x, w13, w2, weights, ids)
    torch.testing.assert_close(out.double(), experts_ref(x, w13, w2, weights, ids),
                               atol=1e-5, rtol=1e-5)  # fmt: skip


def test_align_block_size_groups_pairs_per_expert():
    from pagedllm.model_executor.layers.fused_moe.triton_moe import moe_align_block_size

    ids = torch.tensor([[2, 0], [2, 1], [0, 2], [4, 2], [2, 0]])  # expert 3: none
    sorted_ids, expert_ids, num_padded = moe_align_block_size(ids, 4, E)
    n = int(num_padded)
    counts = torch.bincount(ids.flatten(), minlength=E)
    assert n == int(((counts + 3) // 4 * 4).sum())
    real = sorted_ids[:n]
    assert sorted(real[real < 10].tolist()) == list(range(10))  # every pair exactly once
    assert bool((sorted_ids[n:] == 10).all())
    for tile in range(n // 4):
        pairs = sorted_ids[tile * 4 : tile * 4 + 4]
        pairs = pairs[pairs < 10]
        assert len(pairs) > 0  # no tile is all padding
        assert bool((ids.flatten()[pairs.long()] == expert_ids[tile]).all())
    assert 3 not in expert_ids[: n // 4].tolist()


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("num_tokens", [1, 37])
def test_fused_triton_kernel_matches_reference(top_k, num_tokens):
    from pagedllm.model_executor.layers.fused_moe.triton_moe import (
        MoELaunchConfig,
        fused_experts_triton,
    )

    gen = torch.Generator().manual_seed(10 * top_k + num_tokens)
    w13, w2 = _weights(gen)
    x = torch.randn(num_tokens, H, generator=gen)
    weights, ids = _routing(num_tokens, top_k, gen)
    ref = experts_ref(x, w13, w2, weights, ids)
    # Small tiles: several N tiles per expert, K in two steps, several M tiles for expert 0.
    cfg = MoELaunchConfig(block_m=16, block_n=16, block_k=16)
    args = [t.to(DEVICE) for t in (x, w13, w2, weights, ids)]
    out = fused_experts_triton(*args, config=cfg)
    torch.testing.assert_close(out.double().cpu(), ref, atol=1e-4, rtol=1e-4)
    out_default = fused_experts_triton(*args)
    torch.testing.assert_close(out_default.double().cpu(), ref, atol=1e-4, rtol=1e-4)


def test_fused_triton_kernel_bf16():
    from pagedllm.model_executor.layers.fused_moe.triton_moe import fused_experts_triton

    gen = torch.Generator().manual_seed(5)
    w13, w2 = _weights(gen, torch.bfloat16)
    x = torch.randn(9, H, generator=gen).to(torch.bfloat16)
    weights, ids = _routing(9, 2, gen)
    ref = experts_ref(x, w13, w2, weights, ids)
    args = [t.to(DEVICE) for t in (x, w13, w2, weights, ids)]
    out = fused_experts_triton(*args).double().cpu()
    assert ((out - ref).norm() / ref.norm()).item() < 2e-2


@pytest.mark.parametrize(("top_k", "num_tokens"), [(1, 1), (2, 3)])
def test_moe_gemv_kernel_matches_reference(top_k, num_tokens):
    from pagedllm.model_executor.layers.fused_moe.moe_gemv import GemvConfig, fused_experts_gemv

    gen = torch.Generator().manual_seed(7 * top_k + num_tokens)
    w13, w2 = _weights(gen)
    x = torch.randn(num_tokens, H, generator=gen)
    weights, ids = _routing(num_tokens, top_k, gen)
    ids[-1, -1] = ids[0, 0]  # two pairs share an expert
    ref = experts_ref(x, w13, w2, weights, ids)
    # Tiles smaller than N and K: several N programs, K in several steps with a masked tail.
    cfg = GemvConfig(block_n=16, block_k=16)
    args = [t.to(DEVICE) for t in (x, w13, w2, weights, ids)]
    out = fused_experts_gemv(*args, gate_up=cfg, down=cfg)
    torch.testing.assert_close(out.double().cpu(), ref, atol=1e-4, rtol=1e-4)


def test_layer_takes_the_gemv_path_for_few_tokens(monkeypatch):
    from pagedllm.model_executor.layers.fused_moe import moe_gemv

    def fake(*args, **kwargs):
        return args[0]

    monkeypatch.setattr(moe_gemv, "fused_experts_gemv", fake)
    assert moe_layer.pick_fused_experts(torch.empty(1, 4)) is fake
    assert moe_layer.pick_fused_experts(torch.empty(moe_gemv.MOE_GEMV_MAX_TOKENS, 4)) is fake
    big = moe_layer.pick_fused_experts(torch.empty(moe_gemv.MOE_GEMV_MAX_TOKENS + 1, 4))
    assert big.__name__ == "fused_experts_triton"


@pytest.mark.parametrize("world", [1, 2])
def test_layer_loads_experts_and_shards_intermediate(monkeypatch, world):
    gen = torch.Generator().manual_seed(3)
    w13, w2 = _weights(gen)
    x = torch.randn(11, H, generator=gen)
    logits = torch.randn(11, E, generator=gen)
    weights, ids = select_experts(logits, 2, renormalize=True)
    ref = experts_ref(x, w13, w2, weights, ids)
    partial_sum = torch.zeros(11, H, dtype=torch.float64)
    for rank in range(world):
        monkeypatch.setattr(moe_layer, "get_tensor_model_parallel_rank", lambda r=rank: r)
        monkeypatch.setattr(moe_layer, "get_tensor_model_parallel_world_size", lambda: world)
        layer = FusedMoE(E, 2, H, INTER, renormalize=True, reduce_results=False)
        assert layer.w13_weight.shape == (E, 2 * INTER // world, H)
        for e in range(E):
            layer.w13_weight.weight_loader(layer.w13_weight, w13[e, :INTER], (e, "gate"))
            layer.w13_weight.weight_loader(layer.w13_weight, w13[e, INTER:], (e, "up"))
            layer.w2_weight.weight_loader(layer.w2_weight, w2[e], (e, "down"))
        partial_sum += layer(x, logits).double()
    torch.testing.assert_close(partial_sum, ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="expected"):
        layer.w2_weight.weight_loader(layer.w2_weight, w2[0].t(), (0, "down"))
    with pytest.raises(ValueError, match="shard_id"):
        layer.w2_weight.weight_loader(layer.w2_weight, w2[0], None)
