"""The split-KV decode's workspace: reserved once, reused by every launch, same results.

Runs on CPU under TRITON_INTERPRET=1 (set below when no GPU is present) at tiny sizes.
"""

from __future__ import annotations

import itertools
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton", reason="triton is not installed: Triton kernels are not tested")

from pagedllm.attention.backends.triton import TritonAttentionBackend  # noqa: E402
from pagedllm.attention.ops.paged_attention import (  # noqa: E402
    AttentionLaunchConfig,
    SplitKVWorkspace,
    choose_num_splits,
    max_num_splits,
    paged_attention,
)
from tests.attention.test_triton_backend import _step  # noqa: E402
from tests.attention.test_triton_paged_attention import DEVICE, _make_batch  # noqa: E402

SMALL_SPLITS = AttentionLaunchConfig(block_n=16, min_split_keys=16)
REQS = [(130, 1), (3, 1), (70, 1)]  # num_reqs 3
HEADS, KV_HEADS, HEAD_DIM, SPLITS = 4, 2, 64, 3


@pytest.fixture(scope="module")
def batch():
    gen = torch.Generator().manual_seed(21)
    return _make_batch(REQS, HEADS, KV_HEADS, HEAD_DIM, torch.float32, gen)


@pytest.fixture(scope="module")
def fresh(batch):
    """The output with partials allocated for the call (no workspace)."""
    return _decode(batch, None)


def _decode(batch, workspace):
    query, kv_cache, meta, _ = batch
    out = torch.full_like(query, float("nan"))
    paged_attention(query, kv_cache, scale=HEAD_DIM**-0.5, out=out, num_splits=SPLITS,
                    config=SMALL_SPLITS, workspace=workspace, **meta)  # fmt: skip
    return out


def test_repeated_launches_reuse_the_workspace(batch, fresh):
    rows = len(REQS) * HEADS * SPLITS
    ws = SplitKVWorkspace(rows + 5, HEAD_DIM, DEVICE)
    ws.part_out.fill_(float("nan"))
    ws.part_lse.fill_(float("nan"))
    addresses = (ws.part_out.data_ptr(), ws.part_lse.data_ptr())
    first = _decode(batch, ws)
    # The partials were written into the reserved buffers (the unused tail is untouched) ...
    assert not ws.part_out[: rows * HEAD_DIM].isnan().any()
    assert ws.part_out[rows * HEAD_DIM :].isnan().all()
    assert not ws.part_lse[:rows].isnan().any()
    second = _decode(batch, ws)
    # ... and stayed there: same addresses, nothing allocated, bit-identical outputs.
    assert (ws.part_out.data_ptr(), ws.part_lse.data_ptr()) == addresses
    part_out, part_lse = ws.buffers(len(REQS), HEADS, SPLITS, HEAD_DIM)
    assert (part_out.data_ptr(), part_lse.data_ptr()) == addresses
    assert tuple(part_out.shape) == (len(REQS), HEADS, SPLITS, HEAD_DIM)
    assert ws.num_overflows == 0
    n = len(REQS)
    assert not first[:n].isnan().any()
    assert torch.equal(first[:n], second[:n]) and torch.equal(first[:n], fresh[:n])


def test_a_launch_past_the_reservation_gets_fresh_buffers(batch, fresh):
    ws = SplitKVWorkspace(4, HEAD_DIM, DEVICE)  # fewer rows than 3 requests x 4 heads x 3
    ws.part_out.fill_(float("nan"))
    out = _decode(batch, ws)
    assert ws.num_overflows == 1
    assert ws.part_out.isnan().all()  # not written past its size
    assert torch.equal(out[: len(REQS)], fresh[: len(REQS)])


def test_max_num_splits_bounds_every_choice():
    for n, kv, max_len, sms in itertools.product(
        (1, 2, 5, 16, 33, 200), (1, 2, 8), (100, 700, 4096, 40000), (8, 132)
    ):
        bound = max_num_splits(n, kv, max_len, sms)
        for total in (None, n * 10, n * max_len // 4, n * max_len):
            if total is not None and total < max_len:
                continue
            assert choose_num_splits(n, kv, 1, max_len, sms, total) <= bound


def test_backend_reserves_once_and_every_step_reuses_it():
    backend = TritonAttentionBackend(num_sms=16)
    cpu = torch.device(DEVICE)
    backend.reserve_workspace(4, HEADS, KV_HEADS, HEAD_DIM, 1024, cpu)
    ws = backend.workspace
    # Sized for the largest eager choice and the graph variants of every batch up to 4.
    need = max(n * max(max_num_splits(n, KV_HEADS, 1024, 16), *backend.decode_graph_variants(
        n, KV_HEADS, 1024, cpu)) for n in range(1, 5))  # fmt: skip
    assert ws.max_rows == HEADS * need and ws.head_dim_pad == HEAD_DIM
    address = ws.part_out.data_ptr()
    outs = []
    for _ in range(2):
        query, key, value, cache, meta = _step([(600, 1), (250, 1)], HEADS, KV_HEADS,
                                               HEAD_DIM, torch.float32, seed=5)  # fmt: skip
        outs.append(backend.forward(query, key, value, cache, meta, 0.125))
        assert meta.num_splits > 1  # the split path ran
    assert ws.part_out.data_ptr() == address and backend.workspace is ws
    assert ws.num_overflows == 0
    assert torch.equal(outs[0], outs[1])
    unreserved = TritonAttentionBackend(num_sms=16)
    query, key, value, cache, meta = _step([(600, 1), (250, 1)], HEADS, KV_HEADS, HEAD_DIM,
                                           torch.float32, seed=5)  # fmt: skip
    assert torch.equal(unreserved.forward(query, key, value, cache, meta, 0.125), outs[0])
