"""The plain-torch paged attention backend against dense attention computed independently."""

import math

import pytest
import torch

from pagedllm import cpu_ops
from pagedllm.attention.backend import AttentionMetadata, get_attn_backend, kv_cache_shape


@pytest.fixture(params=["cpu_ops", "torch"], autouse=True)
def decode_path(request, monkeypatch):
    """Every test twice: decodes through the C++ paged decode kernel (and KV write), and
    through the plain torch paths (in-place runs, gathered length groups)."""
    if request.param == "cpu_ops":
        assert cpu_ops.enabled()
    else:
        monkeypatch.setattr(cpu_ops, "_enabled", False)
    return request.param


def _dense_reference(q, k, v, q_pos, scale, sliding_window=None, soft_cap=None):
    # q [q_len, nh, hd]; k, v [seq_len, nkv, hd]; float64, one head at a time.
    nh, nkv = q.shape[1], k.shape[1]
    out = torch.empty_like(q, dtype=torch.float64)
    for h in range(nh):
        kh = k[:, h // (nh // nkv)].double()
        vh = v[:, h // (nh // nkv)].double()
        for j in range(q.shape[0]):
            s = (kh @ q[j, h].double()) * scale
            if soft_cap is not None:
                s = soft_cap * torch.tanh(s / soft_cap)
            allowed = torch.arange(k.shape[0]) <= q_pos[j]
            if sliding_window is not None:
                allowed &= torch.arange(k.shape[0]) > q_pos[j] - sliding_window
            s[~allowed] = -math.inf
            out[j, h] = torch.softmax(s, 0) @ vh
    return out


def _run_mixed_batch(sliding_window=None, seed=0, reqs=None, soft_cap=None, run_len=1, nh=4):
    """`run_len` > 1: block ids come in runs of that many consecutive ids (as a block pool
    hands them out), so single decodes read several multi-block runs in place."""
    g = torch.Generator().manual_seed(seed)
    nkv, hd, bs, num_blocks = 2, 8, 4, 256
    # (cached prefix length, new tokens): prefill, chunk with prefix, decode, decode, prefill
    reqs = reqs or [(0, 7), (5, 6), (9, 1), (3, 1), (0, 1), (12, 4)]
    cache = torch.randn(kv_cache_shape(num_blocks, bs, nkv, hd), generator=g)
    starts = torch.randperm(num_blocks // run_len, generator=g).tolist()
    perm = [s * run_len + j for s in starts for j in reversed(range(run_len))]
    tables, slots, qs, ks, vs = [], [], [], [], []
    qsl, seq_lens = [0], []
    full_k, full_v = [], []
    for cached, new in reqs:
        seq_len = cached + new
        nblk = (seq_len + bs - 1) // bs
        table = [perm.pop() for _ in range(nblk)]
        tables.append(table)
        k_all = torch.randn(seq_len, nkv, hd, generator=g)
        v_all = torch.randn(seq_len, nkv, hd, generator=g)
        # the cached prefix is already in the cache
        for p in range(cached):
            cache[0, table[p // bs], p % bs] = k_all[p]
            cache[1, table[p // bs], p % bs] = v_all[p]
        for p in range(cached, seq_len):
            slots.append(table[p // bs] * bs + p % bs)
        q = torch.randn(new, nh, hd, generator=g)
        qs.append(q)
        ks.append(k_all[cached:])
        vs.append(v_all[cached:])
        full_k.append(k_all)
        full_v.append(v_all)
        qsl.append(qsl[-1] + new)
        seq_lens.append(seq_len)
    max_blocks = max(len(t) for t in tables)
    bt = torch.zeros(len(reqs), max_blocks, dtype=torch.int32)
    for i, t in enumerate(tables):
        bt[i, : len(t)] = torch.tensor(t)
    md = AttentionMetadata(
        num_reqs=len(reqs),
        num_actual_tokens=qsl[-1],
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        query_start_loc=torch.tensor(qsl, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_table=bt,
        max_query_len=max(n for _, n in reqs),
        max_seq_len=max(seq_lens),
        query_start_loc_cpu=torch.tensor(qsl, dtype=torch.int32),
        seq_lens_cpu=torch.tensor(seq_lens, dtype=torch.int32),
    )
    scale = hd**-0.5
    extra = {"logits_soft_cap": soft_cap} if soft_cap is not None else {}
    out = get_attn_backend("torch_ref").forward(
        torch.cat(qs), torch.cat(ks), torch.cat(vs), cache, md, scale, sliding_window, **extra
    )
    for i, (cached, new) in enumerate(reqs):
        ref = _dense_reference(
            qs[i], full_k[i], full_v[i], list(range(cached, cached + new)), scale, sliding_window,
            soft_cap,
        )
        torch.testing.assert_close(out[qsl[i] : qsl[i + 1]].double(), ref, atol=1e-5, rtol=1e-5)
        # the new K/V landed in their slots
        t = tables[i]
        for p in range(cached, cached + new):
            assert torch.equal(cache[0, t[p // bs], p % bs], full_k[i][p])
            assert torch.equal(cache[1, t[p // bs], p % bs], full_v[i][p])


def test_mixed_batch_matches_dense_attention():
    _run_mixed_batch()


def test_many_decodes_in_length_groups():
    # 40 decodes of very different lengths are split into several length groups
    lengths = [(L * 7) % 45 + 1 for L in range(40)]
    _run_mixed_batch(seed=2, reqs=[(L, 1) for L in lengths] + [(3, 5)])
    _run_mixed_batch(sliding_window=5, seed=3, reqs=[(L, 1) for L in lengths])


def test_sliding_window():
    _run_mixed_batch(sliding_window=3, seed=1)


def test_logits_soft_cap():
    # Prefills, prefix chunks and grouped decodes all cap their scores; with a window too.
    _run_mixed_batch(seed=4, soft_cap=0.7)
    lengths = [(L * 5) % 37 + 1 for L in range(20)]
    _run_mixed_batch(sliding_window=6, seed=5, soft_cap=0.7,
                     reqs=[(L, 1) for L in lengths] + [(0, 9), (4, 3)])


def test_single_decode_reads_runs_of_blocks_in_place():
    # One long decode alone in its step (its output is the layer output), its blocks in runs
    # of consecutive ids or all consecutive; with a window that starts mid-block; GQA 3:1.
    for seed, run_len in ((6, 3), (7, 64)):
        for window in (None, 9, 13):
            _run_mixed_batch(sliding_window=window, seed=seed, reqs=[(45, 1)], run_len=run_len,
                             nh=6)
    # Up to four decodes in place beside a prefill and a prefix chunk, block boundaries exact.
    _run_mixed_batch(seed=8, reqs=[(15, 1), (16, 1), (0, 5), (3, 4), (31, 1), (1, 1)],
                     run_len=4)


def test_inplace_decode_plan_splits_at_gaps():
    from pagedllm.attention.backends.inplace_decode import plan_inplace_decode

    # blocks 7 8 9 | 3 | 5 (3 -> 5 is a gap); 18 tokens of block size 4
    # runs are [start, end) flat slots, block id * 4 + offset
    plan = plan_inplace_decode(2, [7, 8, 9, 3, 5], 18, 4, None)
    assert plan.row == 2 and plan.runs == [(28, 40), (12, 16), (20, 22)]
    plan = plan_inplace_decode(0, [7, 8, 9, 3, 5], 18, 4, 10)  # tokens 8..17
    assert plan.runs == [(36, 40), (12, 16), (20, 22)]
    plan = plan_inplace_decode(0, [7, 8, 9, 10, 11], 18, 4, 11)  # tokens 7..17, one run
    assert plan.runs == [(35, 46)]


def test_negative_slots_are_not_written():
    cache = torch.zeros(kv_cache_shape(2, 4, 1, 2))
    md = AttentionMetadata(
        num_reqs=1,
        num_actual_tokens=2,
        slot_mapping=torch.tensor([1, -1]),
        query_start_loc=torch.tensor([0, 2], dtype=torch.int32),
        seq_lens=torch.tensor([2], dtype=torch.int32),
        block_table=torch.tensor([[0]], dtype=torch.int32),
        max_query_len=2,
        max_seq_len=2,
    )
    k = torch.ones(2, 1, 2)
    get_attn_backend("torch_ref").forward(torch.ones(2, 1, 2), k, k, cache, md, 1.0)
    assert cache[0, 0, 1].sum() == 2 and cache.sum() == 4
