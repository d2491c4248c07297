"""Layer units: norms, activations, RoPE variants, and weight sharding by tensor-parallel rank."""

from __future__ import annotations

import math

import pytest
import torch

import pagedllm.model_executor.layers.linear as linear_mod
import pagedllm.model_executor.layers.vocab_parallel_embedding as embed_mod
from pagedllm.model_executor.layers.activation import SiluAndMul
from pagedllm.model_executor.layers.layernorm import RMSNorm
from pagedllm.model_executor.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)
from pagedllm.model_executor.layers.rotary_embedding import get_rope, rope_params_from_config
from pagedllm.model_executor.layers.vocab_parallel_embedding import (
    ParallelLMHead,
    VocabParallelEmbedding,
    compute_logits,
)

gen = torch.Generator().manual_seed(0)


def randn(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen)


def test_rmsnorm_plain_and_fused_residual() -> None:
    norm = RMSNorm(8, eps=1e-5)
    norm.weight.data.copy_(randn(8))
    x, residual = randn(3, 8), randn(3, 8)
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight
    torch.testing.assert_close(norm(x), expected)
    # torch's fused rms_norm is HF's arithmetic bit for bit (fp32)
    assert torch.equal(norm(x), norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True)
                                                                + 1e-5)))
    # CPU (the C++ op) and CUDA write x + residual into `residual` in place
    normed, new_residual = norm(x, residual.clone())
    torch.testing.assert_close(new_residual, x + residual)
    torch.testing.assert_close(normed, norm(x + residual))


def test_silu_and_mul() -> None:
    x = randn(5, 12)
    out = SiluAndMul()(x)
    assert out.shape == (5, 6)
    torch.testing.assert_close(out, torch.nn.functional.silu(x[:, :6]) * x[:, 6:])


def _reference_rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
                    rotary_dim: int) -> torch.Tensor:
    # x: [num_tokens, num_heads, head_dim]; neox style on the first rotary_dim dims
    freqs = positions.float()[:, None] * inv_freq[None, :]
    cos, sin = freqs.cos()[:, None, :], freqs.sin()[:, None, :]
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    x1, x2 = rot.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], dim=-1)


@pytest.mark.parametrize("rotary_dim", [16, 8])
def test_rope_default_and_partial(rotary_dim: int) -> None:
    rope = get_rope(16, rotary_dim, 64, 10000.0, None)
    positions = torch.tensor([0, 5, 63, 1])
    q, k = randn(4, 3 * 16), randn(4, 1 * 16)
    q_out, k_out = rope(positions, q.clone(), k.clone())  # rotated in place, as on CUDA
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim)
    torch.testing.assert_close(
        q_out.view(4, 3, 16), _reference_rope(q.view(4, 3, 16), positions, inv_freq, rotary_dim)
    )
    torch.testing.assert_close(
        k_out.view(4, 1, 16), _reference_rope(k.view(4, 1, 16), positions, inv_freq, rotary_dim)
    )
    # Position 0 is the identity.
    torch.testing.assert_close(q_out[0], q[0])


def test_rope_fused_cpu_form_is_bitwise_the_formula_and_cached_per_step() -> None:
    # x * [cos, cos] + roll(x) * [-sin, sin] is x1 cos - x2 sin, x2 cos + x1 sin exactly.
    rope = get_rope(16, 16, 64, 10000.0, None)
    positions = torch.tensor([0, 5, 63, 1])
    q, k = randn(4, 3 * 16), randn(4, 1 * 16)
    cos, sin = rope.cos_sin_cache[positions].chunk(2, dim=-1)
    cos, sin = cos[:, None], sin[:, None]
    x1, x2 = q.view(4, 3, 16).chunk(2, dim=-1)
    expected = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    assert torch.equal(rope(positions, q.clone(), k.clone())[0].view(4, 3, 16), expected)
    # The cos/sin rows are reused by the step's other layers, and recomputed when the
    # positions buffer is rewritten in place (a new step in the same tensor).
    other_layer = get_rope(16, 16, 64, 10000.0, None)
    assert torch.equal(other_layer(positions, q.clone(), k.clone())[0],
                       rope(positions, q.clone(), k.clone())[0])
    positions[:] = torch.tensor([0, 0, 0, 0])
    torch.testing.assert_close(rope(positions, q.clone(), k.clone())[0], q)  # position 0


def test_rmsnorm_bf16_rounds_before_the_weight() -> None:
    # Below fp32 the normed x is rounded to the input dtype before the weight, as HF does.
    norm = RMSNorm(8, eps=1e-5, params_dtype=torch.bfloat16)
    norm.weight.data.copy_(randn(8))
    x = randn(3, 8).bfloat16()
    x32 = x.float()
    expected = norm.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-5)).to(
        torch.bfloat16)
    assert norm(x).dtype == torch.bfloat16 and torch.equal(norm(x), expected)


def test_rope_gptj_style_is_interleaved_neox() -> None:
    neox = get_rope(8, 8, 32, 10000.0, None, is_neox_style=True)
    gptj = get_rope(8, 8, 32, 10000.0, None, is_neox_style=False)
    positions = torch.tensor([3, 7])
    q, k = randn(2, 8), randn(2, 8)
    # GPT-J pairs (0,1),(2,3)...; neox pairs (0,4),(1,5)...: the same rotation up to a
    # permutation of the head dims.
    perm = torch.tensor([0, 2, 4, 6, 1, 3, 5, 7])
    q_gptj, _ = gptj(positions, q.clone(), k.clone())
    q_neox, _ = neox(positions, q[:, perm], k[:, perm])
    torch.testing.assert_close(q_gptj[:, perm], q_neox)


def test_rope_scaling_variants() -> None:
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
    config = LlamaConfig(hidden_size=64, num_attention_heads=2, head_dim=32,
                         max_position_embeddings=256,
                         rope_parameters={**scaling, "rope_theta": 500000.0})
    hf_inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    ours = get_rope(32, 32, 256, 500000.0, scaling)
    torch.testing.assert_close(ours._compute_inv_freq(), hf_inv_freq.float())

    linear = get_rope(16, 16, 64, 10000.0, {"type": "linear", "factor": 4.0})
    plain = get_rope(16, 16, 64, 10000.0, {"rope_type": "default"})
    torch.testing.assert_close(linear._compute_inv_freq() * 4.0, plain._compute_inv_freq())
    with pytest.raises(ValueError, match="unsupported rope_type 'yarnx'"):
        get_rope(16, 16, 64, 10000.0, {"rope_type": "yarnx"})


@pytest.mark.parametrize(
    "scaling",
    [
        # Qwen2.5's long-context setting (factor over the pretraining length)
        {"factor": 4.0, "original_max_position_embeddings": 64},
        # DeepSeek-style: attention factor from mscale / mscale_all_dim, custom betas
        {"factor": 8.0, "original_max_position_embeddings": 32, "mscale": 1.0,
         "mscale_all_dim": 0.5, "beta_fast": 16, "beta_slow": 2},
        # an explicit attention factor, no truncation of the correction range
        {"factor": 2.0, "original_max_position_embeddings": 48, "attention_factor": 0.9,
         "truncate": False},
    ],
)
def test_rope_yarn_matches_transformers(scaling: dict) -> None:
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = {"rope_type": "yarn", **scaling}
    config = LlamaConfig(hidden_size=64, num_attention_heads=2, head_dim=32,
                         max_position_embeddings=64,
                         rope_parameters={**scaling, "rope_theta": 10000.0})  # fmt: skip
    hf_inv_freq, hf_attention_factor = ROPE_INIT_FUNCTIONS["yarn"](config, "cpu")
    ours = get_rope(32, 32, 64, 10000.0, scaling)
    torch.testing.assert_close(ours._compute_inv_freq(), hf_inv_freq.float())
    assert ours._attention_scaling() == pytest.approx(hf_attention_factor)
    # The table covers the extended context, with cos/sin scaled by the attention factor.
    length = int(scaling["original_max_position_embeddings"] * scaling["factor"])
    assert ours.cos_sin_cache.shape[0] == max(64, length)
    cos0 = ours.cos_sin_cache[0, :16]
    torch.testing.assert_close(cos0, torch.full_like(cos0, hf_attention_factor))


@pytest.mark.parametrize("explicit", [{}, {"attention_factor": 1.3}])
def test_rope_longrope_matches_transformers(explicit: dict) -> None:
    from transformers import Phi3Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = {"rope_type": "longrope", "short_factor": [1.0 + 0.5 * i for i in range(8)],
               "long_factor": [2.0 + i for i in range(8)], **explicit}  # fmt: skip
    config = Phi3Config(hidden_size=64, num_attention_heads=4, max_position_embeddings=256,
                        original_max_position_embeddings=64, rope_scaling=scaling)
    hf = ROPE_INIT_FUNCTIONS["longrope"]
    short_inv, factor = hf(config, "cpu")
    long_inv, _ = hf(config, "cpu", seq_len=65)  # past the pretraining length
    _, scaling = rope_params_from_config(config)
    ours = get_rope(16, 16, 256, 10000.0, scaling)
    assert factor == pytest.approx(explicit.get("attention_factor",
                                                math.sqrt(1 + math.log(4) / math.log(64))))
    # Positions below 64 use the short factors, 64 on the long ones; cos/sin scaled by factor.
    t = torch.arange(256, dtype=torch.float32)[:, None]
    angles = torch.where(t < 64, t * short_inv.float(), t * long_inv.float())
    want = torch.cat([angles.cos(), angles.sin()], dim=-1) * factor
    torch.testing.assert_close(ours.cos_sin_cache, want)
    with pytest.raises(ValueError, match="rotary_dim / 2"):
        get_rope(32, 32, 256, 10000.0, scaling)


def test_rope_cache_recomputed_after_meta() -> None:
    with torch.device("meta"):
        rope = get_rope(16, 16, 64, 10000.0, None)
    assert rope.cos_sin_cache.is_meta
    rope.to_empty(device="cpu")
    rope.init_cache()
    reference = get_rope(16, 16, 64, 10000.0, None)
    torch.testing.assert_close(rope.cos_sin_cache, reference.cos_sin_cache)


class _FakeTP:
    """Patches the layer modules to see a given rank and world size."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.monkeypatch = monkeypatch

    def set(self, rank: int, world: int) -> None:
        for mod in (linear_mod, embed_mod):
            self.monkeypatch.setattr(mod, "get_tensor_model_parallel_rank", lambda r=rank: r)
            self.monkeypatch.setattr(
                mod, "get_tensor_model_parallel_world_size", lambda w=world: w
            )


@pytest.fixture
def fake_tp(monkeypatch) -> _FakeTP:
    return _FakeTP(monkeypatch)


def test_replicated_and_column_tp1() -> None:
    w, b = randn(6, 4), randn(6)
    x = randn(3, 4)
    for layer in (ReplicatedLinear(4, 6, bias=True), ColumnParallelLinear(4, 6, bias=True)):
        layer.weight.weight_loader(layer.weight, w)
        layer.bias.weight_loader(layer.bias, b)
        torch.testing.assert_close(layer(x), x @ w.T + b)


@pytest.mark.parametrize("world", [1, 2])
def test_column_and_row_parallel_shards(fake_tp: _FakeTP, world: int) -> None:
    w_up, w_down, b_down = randn(8, 4), randn(4, 8), randn(4)
    x = randn(3, 4)
    partials = []
    for rank in range(world):
        fake_tp.set(rank, world)
        up = ColumnParallelLinear(4, 8)
        down = RowParallelLinear(8, 4, bias=True)
        up.weight.weight_loader(up.weight, w_up)
        down.weight.weight_loader(down.weight, w_down)
        down.bias.weight_loader(down.bias, b_down)
        assert up.weight.shape == (8 // world, 4) and down.weight.shape == (4, 8 // world)
        partials.append(down(up(x)) - b_down)  # bias is added once after the reduction
    torch.testing.assert_close(sum(partials) + b_down, (x @ w_up.T) @ w_down.T + b_down)


@pytest.mark.parametrize("world", [1, 2])
def test_merged_column_shards(fake_tp: _FakeTP, world: int) -> None:
    gate, up = randn(6, 4), randn(6, 4)
    x = randn(2, 4)
    outs = []
    for rank in range(world):
        fake_tp.set(rank, world)
        layer = MergedColumnParallelLinear(4, [6, 6])
        layer.weight.weight_loader(layer.weight, gate, 0)
        layer.weight.weight_loader(layer.weight, up, 1)
        g, u = layer(x).chunk(2, dim=-1)
        outs.append((g, u))
    torch.testing.assert_close(torch.cat([g for g, _ in outs], -1), x @ gate.T)
    torch.testing.assert_close(torch.cat([u for _, u in outs], -1), x @ up.T)


@pytest.mark.parametrize("world,kv_heads", [(1, 2), (2, 2), (4, 2)])
def test_qkv_shards_with_kv_replication(fake_tp: _FakeTP, world: int, kv_heads: int) -> None:
    head, heads = 4, 4
    wq, wk, wv = randn(heads * head, 8), randn(kv_heads * head, 8), randn(kv_heads * head, 8)
    bq, bk, bv = randn(heads * head), randn(kv_heads * head), randn(kv_heads * head)
    x = randn(2, 8)
    for rank in range(world):
        fake_tp.set(rank, world)
        layer = QKVParallelLinear(8, head, heads, kv_heads, bias=True)
        for sid, w, b in (("q", wq, bq), ("k", wk, bk), ("v", wv, bv)):
            layer.weight.weight_loader(layer.weight, w, sid)
            layer.bias.weight_loader(layer.bias, b, sid)
        q, k, v = layer(x).split([layer.q_size, layer.kv_size, layer.kv_size], dim=-1)
        q_rows = slice(rank * layer.q_size, (rank + 1) * layer.q_size)
        kv_rank = rank // layer.num_kv_head_replicas
        kv_rows = slice(kv_rank * layer.kv_size, (kv_rank + 1) * layer.kv_size)
        torch.testing.assert_close(q, x @ wq[q_rows].T + bq[q_rows])
        torch.testing.assert_close(k, x @ wk[kv_rows].T + bk[kv_rows])
        torch.testing.assert_close(v, x @ wv[kv_rows].T + bv[kv_rows])


def test_qkv_prefused_checkpoint_tensor() -> None:
    layer = QKVParallelLinear(8, 4, 4, 2)
    fused = randn(4 * 4 + 2 * 2 * 4, 8)
    layer.weight.weight_loader(layer.weight, fused)
    torch.testing.assert_close(layer.weight.data, fused)


def test_shape_mismatch_is_reported() -> None:
    layer = ColumnParallelLinear(4, 6)
    with pytest.raises(ValueError, match="shape mismatch"):
        layer.weight.weight_loader(layer.weight, randn(5, 4))


@pytest.mark.parametrize("world", [1, 2, 3])
def test_vocab_parallel_embedding_and_logits(fake_tp: _FakeTP, world: int) -> None:
    vocab, dim = 10, 4  # 10 is not a multiple of 3: padded rows
    table = randn(vocab, dim)
    ids = torch.tensor([0, 9, 4, 5, 3])
    hidden = randn(2, dim)
    embeds, logits = [], []
    for rank in range(world):
        fake_tp.set(rank, world)
        emb = VocabParallelEmbedding(vocab, dim)
        head = ParallelLMHead(vocab, dim)
        emb.weight.weight_loader(emb.weight, table)
        head.weight.weight_loader(head.weight, table)
        assert emb.weight.shape[0] == math.ceil(vocab / world)
        embeds.append(emb(ids))  # all_reduce is the identity here: sum by hand
        logits.append(torch.nn.functional.linear(hidden, head.weight))
    torch.testing.assert_close(sum(embeds), table[ids])
    full = torch.cat(logits, dim=-1)[:, :vocab]
    torch.testing.assert_close(full, hidden @ table.T)
    if world == 1:
        out = compute_logits(head, hidden)
        assert out.dtype == torch.float32 and out.shape == (2, vocab)
        torch.testing.assert_close(out, hidden @ table.T)
