"""The C++ CPU decode-step ops against the torch paths they replace (and an independent
float64 attention), in float32 and bfloat16, on the CPU's native kernel build (AVX-512 or
AVX2) and the portable one."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from pagedllm import cpu_ops
from pagedllm.model_executor.layers.layernorm import RMSNorm
from pagedllm.model_executor.layers.rotary_embedding import RotaryEmbedding

DTYPES = (torch.float32, torch.bfloat16)


@pytest.fixture(params=["native", "portable"], autouse=True)
def kernel_build(request):
    assert cpu_ops.enabled(), "the CPU ops must build on the test machine"
    # (a CPU with neither AVX-512 nor AVX2 runs the portable build under both names)
    cpu_ops.set_portable(request.param == "portable")
    yield request.param
    cpu_ops.set_portable(False)


def _close(dtype: torch.dtype) -> dict:
    # float32: a few ulp of summation order; bfloat16: one rounding of the output
    return {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-2,
                                                                          "rtol": 1.6e-2}


def _strided_rows(g: torch.Generator, rows: int, d: int, dtype: torch.dtype) -> torch.Tensor:
    """[rows, d] whose rows are `d + 3` apart (a slice of a wider tensor, as q of a QKV)."""
    return (torch.randn(rows, d + 3, generator=g) * 3).to(dtype)[:, 1 : d + 1]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,d", [(1, 576), (3, 64), (17, 577), (2, 1), (2, 5000)])
def test_rms_norm_and_fused_add(dtype, rows, d):
    g = torch.Generator().manual_seed(rows * 1000 + d)
    norm = RMSNorm(d, 1e-5, params_dtype=dtype)
    norm.weight.data.copy_(torch.randn(d, generator=g))
    x = _strided_rows(g, rows, d, dtype)
    # torch's mean of squares inside: torch's rms_norm (HF's arithmetic) bit for bit
    assert torch.equal(cpu_ops.rms_norm(x, norm.weight, 1e-5), norm._norm(x))
    residual0 = torch.randn(rows, d, generator=g).to(dtype)
    summed = x + residual0  # the torch path's sum, rounded to dtype
    ref = norm._norm(summed)
    residual = residual0.clone()
    out, res = cpu_ops.fused_add_rms_norm(x, residual, norm.weight, 1e-5)
    assert res is residual and torch.equal(residual, summed)  # in place, the same rounding
    assert torch.equal(out, ref)
    # the module takes the op on CPU: the same through forward
    residual = residual0.clone()
    out2, res2 = norm(x, residual)
    assert res2 is residual and torch.equal(res2, summed)
    assert torch.equal(out2, out)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,d", [(1, 1536), (5, 33), (2, 48), (3, 8960), (8, 5000)])
def test_silu_and_mul(dtype, rows, d, kernel_build):
    g = torch.Generator().manual_seed(d)
    x = (torch.randn(rows, 2 * d, generator=g) * 4).to(dtype)
    x[0, :4] = torch.tensor([-100.0, 100.0, 0.0, -20.0], dtype=dtype)
    ref = F.silu(x[:, :d]) * x[:, d:]
    # bit for bit: the one-pass kernel (torch's vectorised exp, its scalar tail past the last
    # 32) or, above torch's one-thread size or on the portable build, torch's SiLU inside
    assert torch.equal(cpu_ops.silu_and_mul(x), ref)
    if kernel_build == "native" and cpu_ops.isa() in ("avx512", "avx2"):
        # the decode widths take the one pass (this torch's SiLU is the one it reproduces)
        assert cpu_ops.silu_one_pass(d, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("neox", [True, False])
@pytest.mark.parametrize("head_size,rotary_dim", [(64, 64), (64, 32), (80, 40)])
def test_rope_matches_torch_path_bit_for_bit(dtype, neox, head_size, rotary_dim):
    g = torch.Generator().manual_seed(head_size + rotary_dim + neox)
    rope = RotaryEmbedding(head_size, rotary_dim, 512, 10000.0, is_neox_style=neox)
    nh, nkv, n = 6, 2, 7
    qkv = torch.randn(n, (nh + 2 * nkv) * head_size, generator=g).to(dtype)
    q, k, _ = qkv.split([nh * head_size, nkv * head_size, nkv * head_size], dim=-1)
    positions = torch.tensor([0, 1, 17, 100, 255, 511, 3])
    ref_q, ref_k = rope._forward_torch(positions, q, k)
    out_q, out_k = rope(positions, q, k)  # the op, in place on the views of qkv
    assert out_q.data_ptr() == q.data_ptr()
    assert torch.equal(out_q, ref_q) and torch.equal(out_k, ref_k)


def test_rope_position_out_of_range_raises():
    rope = RotaryEmbedding(64, 64, 16, 10000.0)
    q, k = torch.randn(1, 64), torch.randn(1, 64)
    with pytest.raises(RuntimeError, match="out of range"):
        cpu_ops.rope_(torch.tensor([16]), q, k, rope.cos_sin_cache, 64, True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_write_kv_skips_negative_slots(dtype):
    g = torch.Generator().manual_seed(1)
    cache = torch.zeros(2, 5, 4, 3, 8, dtype=dtype)
    kv = torch.randn(4, 2, 3 * 8 + 5, generator=g).to(dtype)  # strided token rows
    key, value = kv[:, 0, :24].view(4, 3, 8), kv[:, 1, 1:25].view(4, 3, 8)
    slots = torch.tensor([19, -1, 0, 7, 3])  # longer than the tokens, as the runner's buffer
    cpu_ops.write_kv(key, value, cache, slots)
    ref = torch.zeros_like(cache)
    flat = ref.view(2, 20, 3, 8)
    keep = torch.tensor([0, 2, 3])
    flat[0].index_copy_(0, slots[keep], key[keep])
    flat[1].index_copy_(0, slots[keep], value[keep])
    assert torch.equal(cache, ref)
    with pytest.raises(RuntimeError, match="out of range"):
        cpu_ops.write_kv(key, value, cache, torch.tensor([20, 0, 1, 2]))


def _reference_decode(q, cache, table, seq_len, scale, window, soft_cap):
    """[num_heads, head_dim] float64: dense attention over the request's gathered context."""
    bs = cache.shape[2]
    ids = torch.tensor(table[: (seq_len + bs - 1) // bs])
    k = cache[0].index_select(0, ids).flatten(0, 1)[:seq_len].double()
    v = cache[1].index_select(0, ids).flatten(0, 1)[:seq_len].double()
    start = max(0, seq_len - window) if window else 0
    k, v = k[start:], v[start:]
    nh, nkv = q.shape[0], k.shape[1]
    out = torch.empty(nh, q.shape[1], dtype=torch.float64)
    for h in range(nh):
        s = (k[:, h // (nh // nkv)] @ q[h].double()) * scale
        if soft_cap:
            s = soft_cap * torch.tanh(s / soft_cap)
        out[h] = torch.softmax(s, 0) @ v[:, h // (nh // nkv)]
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nh,nkv,hs", [(9, 3, 64), (4, 4, 40), (8, 2, 128)])
@pytest.mark.parametrize("window,soft_cap", [(None, None), (17, None), (None, 30.0), (5, 2.0)])
def test_decode_attention_reads_block_tables(dtype, nh, nkv, hs, window, soft_cap):
    g = torch.Generator().manual_seed(nh * hs + (window or 0))
    bs, num_blocks = 16, 40
    cache = torch.randn(2, num_blocks, bs, nkv, hs, generator=g).to(dtype)
    lens = [1, 15, 16, 17, 33, 100]  # block boundaries, odd lengths
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables = [[perm.pop() for _ in range((n + bs - 1) // bs)] for n in lens]
    max_blocks = max(len(t) for t in tables) + 2
    bt = torch.full((len(lens) + 1, max_blocks), -7, dtype=torch.int32)  # unused entries
    for i, t in enumerate(tables):
        bt[i + 1, : len(t)] = torch.tensor(t, dtype=torch.int32)
    seq_lens = torch.tensor([4] + lens, dtype=torch.int32)
    # query rows interleaved with rows that are not decodes (left untouched)
    query = torch.randn(2 * len(lens), nh, hs, generator=g).to(dtype)
    rows = torch.arange(len(lens)) * 2 + 1
    reqs = torch.arange(len(lens)) + 1
    out = torch.full_like(query, 5.0)
    scale = hs**-0.5
    cpu_ops.decode_attention(out, query, cache, bt, seq_lens, rows, reqs, scale, window,
                             soft_cap)
    assert torch.all(out[::2] == 5.0)
    for j, n in enumerate(lens):
        ref = _reference_decode(query[2 * j + 1].float(), cache.float(), tables[j], n, scale,
                                window, soft_cap)
        torch.testing.assert_close(out[2 * j + 1].double(), ref.to(dtype).double(),
                                   **_close(dtype))


def test_decode_attention_rejects_a_short_block_table():
    cache = torch.randn(2, 4, 16, 1, 64)
    bt = torch.zeros(1, 1, dtype=torch.int32)
    q = torch.randn(1, 1, 64)
    with pytest.raises(RuntimeError, match="does not fit the block table"):
        cpu_ops.decode_attention(torch.empty_like(q), q, cache, bt,
                                 torch.tensor([17], dtype=torch.int32), torch.tensor([0]),
                                 torch.tensor([0]), 0.125, None, None)


def test_long_context_splits_over_threads():
    # 2 threads over (request, KV head) pairs: the same result as one thread.
    g = torch.Generator().manual_seed(3)
    cache = torch.randn(2, 300, 16, 2, 64, generator=g)
    bt = torch.randperm(300, generator=g).to(torch.int32)[None]
    q = torch.randn(1, 8, 64, generator=g)
    args = (cache, bt, torch.tensor([4700], dtype=torch.int32), torch.tensor([0]),
            torch.tensor([0]), 0.125, None, None)
    threads = torch.get_num_threads()
    outs = []
    for n in (1, 2):
        torch.set_num_threads(n)
        outs.append(torch.empty_like(q))
        cpu_ops.decode_attention(outs[-1], q, *args)
    torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[1])
    ref = _reference_decode(q[0], cache, bt[0].tolist(), 4700, 0.125, None, None)
    torch.testing.assert_close(outs[0][0].double(), ref, atol=1e-5, rtol=1e-5)


def test_failed_build_warns_once_and_keeps_torch_ops(monkeypatch, caplog, kernel_build):
    if kernel_build != "native":
        return  # once is enough
    monkeypatch.setenv("PAGEDLLM_CPU_OPS_FAIL", "1")
    cpu_ops.reset_for_tests()
    try:
        with caplog.at_level(logging.WARNING):
            assert not cpu_ops.enabled() and not cpu_ops.enabled()
            norm = RMSNorm(8, 1e-6)
            norm.weight.data.fill_(2.0)
            x = torch.randn(2, 8)
            ref = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * 2.0
            torch.testing.assert_close(norm(x), ref)
        warnings = [r for r in caplog.records if "could not be built" in r.getMessage()]
        assert len(warnings) == 1
    finally:
        monkeypatch.delenv("PAGEDLLM_CPU_OPS_FAIL")
        cpu_ops.reset_for_tests()
    assert cpu_ops.enabled()
