"""TritonAttentionBackend end to end (cache write + attention) against torch references.

Runs on CPU under TRITON_INTERPRET=1 (set below when no GPU is present) at tiny sizes.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton", reason="triton is not installed: Triton kernels are not tested")

from pagedllm.attention.backend import AttentionMetadata, get_attn_backend  # noqa: E402
from pagedllm.attention.backends.triton import TritonAttentionBackend  # noqa: E402
from pagedllm.attention.ops.paged_attention import paged_attention_ref  # noqa: E402
from pagedllm.attention.ops.reshape_and_cache import reshape_and_cache_ref  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BLOCK_SIZE = 16


def _step(reqs: list[tuple[int, int]], num_heads: int, num_kv_heads: int, head_dim: int,
          dtype: torch.dtype, seed: int, num_pad: int = 2):  # fmt: skip
    """A step's tensors and metadata: cached tokens are in the cache, new ones in key/value."""
    gen = torch.Generator().manual_seed(seed)
    seq_lens = [c + q for c, q in reqs]
    nblocks = [math.ceil(s / BLOCK_SIZE) for s in seq_lens]
    num_blocks = sum(nblocks) + 4
    perm = torch.randperm(num_blocks, generator=gen)
    block_table = torch.full((len(reqs), max(nblocks)), -1, dtype=torch.int32)
    qsl, slots, used = [0], [], 0
    for i, ((cached, q_len), n) in enumerate(zip(reqs, nblocks)):
        block_table[i, :n] = perm[used : used + n].to(torch.int32)
        used += n
        qsl.append(qsl[-1] + q_len)
        for pos in range(cached, cached + q_len):
            slots.append(int(block_table[i, pos // BLOCK_SIZE]) * BLOCK_SIZE + pos % BLOCK_SIZE)
    num_actual = qsl[-1]
    num_tokens = num_actual + num_pad
    slots += [-1] * num_pad

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(dtype).to(DEVICE)

    meta = AttentionMetadata(
        num_reqs=len(reqs),
        num_actual_tokens=num_actual,
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=DEVICE),
        query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=DEVICE),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
        block_table=block_table.to(DEVICE),
        max_query_len=max(q for _, q in reqs),
        max_seq_len=max(seq_lens),
    )
    return (
        rand(num_tokens, num_heads, head_dim),
        rand(num_tokens, num_kv_heads, head_dim),
        rand(num_tokens, num_kv_heads, head_dim),
        rand(2, num_blocks, BLOCK_SIZE, num_kv_heads, head_dim),
        meta,
    )


def _run(backend, reqs, dtype, tol, seed, sliding_window=None, heads=(4, 2), **meta_fields):
    query, key, value, cache, meta = _step(reqs, heads[0], heads[1], 64, dtype, seed)
    for k, v in meta_fields.items():
        setattr(meta, k, v)
    ref_cache = cache.clone()
    out = backend.forward(query, key, value, cache, meta, 0.125, sliding_window)
    n = meta.num_actual_tokens
    reshape_and_cache_ref(key[:n], value[:n], ref_cache, meta.slot_mapping)
    torch.testing.assert_close(cache.float(), ref_cache.float(), rtol=1e-2, atol=1e-2)
    ref = paged_attention_ref(query, ref_cache, meta.query_start_loc, meta.seq_lens,
                              meta.block_table, 0.125, sliding_window,
                              compute_dtype=torch.float64)  # fmt: skip
    err = ((out[:n].double() - ref[:n]).norm() / ref[:n].norm()).item()
    assert err < tol, f"relative error {err:.2e}"
    assert torch.all(out[n:] == 0)


def test_registered_and_mixed_batch():
    backend = get_attn_backend("triton")
    assert isinstance(backend, TritonAttentionBackend) and backend.name == "triton"
    # Prefill, chunk with a cached prefix, decodes: the new tokens must be read back from the
    # cache the backend just wrote.
    _run(backend, [(0, 20), (18, 7), (33, 1), (0, 1)], torch.float32, 1e-4, seed=0)


@pytest.fixture
def split_calls(monkeypatch) -> list[int]:
    """The num_splits of every paged_attention launch the backend makes."""
    import pagedllm.attention.backends.triton as mod

    calls: list[int] = []
    real = mod.paged_attention

    def spy(*args, **kwargs):
        calls.append(kwargs["num_splits"])
        return real(*args, **kwargs)

    monkeypatch.setattr(mod, "paged_attention", spy)
    return calls


def test_decode_only_takes_split_kv_path(split_calls):
    calls = split_calls
    backend = TritonAttentionBackend(num_sms=16)  # pretend a GPU with 16 SMs
    _run(backend, [(600, 1), (250, 1)], torch.bfloat16, 1e-2, seed=1, sliding_window=300)
    assert calls[-1] > 1
    _run(backend, [(10, 5), (250, 1)], torch.float32, 1e-4, seed=2, sliding_window=40)
    assert calls[-1] == 1


def test_one_long_context_among_short_ones_splits(split_calls):
    """Enough programs for the SMs, but one context far past an SM's share of the keys: split
    when the host knows the total (eager steps), and a caller's fixed count wins (graphs)."""
    calls = split_calls
    backend = TritonAttentionBackend(num_sms=8)
    reqs = [(20, 1)] * 8 + [(900, 1)]  # 18 programs >= 8 SMs; an SM's share ~270 keys
    total = 8 * 21 + 901
    _run(backend, reqs, torch.float32, 1e-4, seed=3)
    assert calls[-1] == 1  # total unknown: no basis to split
    _run(backend, reqs, torch.float32, 1e-4, seed=3, total_seq_len=total)
    assert calls[-1] > 1
    _run(backend, [(300, 1)] * 6, torch.float32, 1e-4, seed=4, total_seq_len=6 * 301)
    assert calls[-1] == 1  # balanced
    _run(backend, [(300, 1)] * 6, torch.float32, 1e-4, seed=4, num_splits=5)
    assert calls[-1] == 5


def test_decode_graph_variants_and_pick():
    backend = TritonAttentionBackend(num_sms=132)
    cpu = torch.device("cpu")
    # Few requests: split by occupancy, one graph. Mid-sized: unsplit + split graphs.
    # Past the cap: one unsplit graph.
    assert backend.decode_graph_variants(4, 8, 4096, cpu) == (16,)  # capped by length
    assert backend.decode_graph_variants(24, 8, 4096, cpu) == (1, 8)
    assert backend.decode_graph_variants(512, 8, 4096, cpu) == (1,)
    variants = (1, 8)
    skewed = 19 * 600 + 2 * 3000
    assert backend.pick_decode_graph_variant(variants, 21, 8, 3000, skewed, cpu) == 8
    assert backend.pick_decode_graph_variant(variants, 64, 8, 620, 64 * 600, cpu) == 1
    assert backend.pick_decode_graph_variant((16,), 4, 8, 3000, 4 * 3000, cpu) == 16
