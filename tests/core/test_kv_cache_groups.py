"""KV cache groups: how layers are grouped, sliding-window blocks freed exactly when out of the
window, window-aware prefix hits, and the scheduler on a simulated grouped cache (every group's
block table read back through its window, freed entries null, the pool full again at the end)."""

from __future__ import annotations

import random

import pytest

from pagedllm.config import CacheConfig, SchedulerConfig
from pagedllm.core.block_pool import group_block_hash
from pagedllm.core.kv_cache_groups import (
    NULL_BLOCK_ID,
    KVCacheGroup,
    build_kv_cache_spec,
    num_dead_blocks,
)
from pagedllm.core.kv_cache_manager import KVCacheManager
from pagedllm.core.request import Request
from pagedllm.core.scheduler import Scheduler
from pagedllm.core.scheduler_output import ModelRunnerOutput
from pagedllm.sampling_params import SamplingParams

BS = 4
W = 8


def _req(rid: str, tokens: list[int], max_tokens: int = 4) -> Request:
    return Request(rid, tokens, SamplingParams(max_tokens=max_tokens, ignore_eos=True), None,
                   0.0, block_size=BS)  # fmt: skip


def test_groups_of_real_layouts() -> None:
    # Gemma-3-4b: 34 layers, every 6th global: 5 full layers, 29 sliding (window 1024).
    windows = [None if i % 6 == 5 else 1024 for i in range(34)]
    spec = build_kv_cache_spec(windows, max_model_len=32768)
    assert spec.layers_per_block == 5 and spec.num_groups == 7
    assert spec.groups[0] == KVCacheGroup(None, (5, 11, 17, 23, 29))
    assert all(g.sliding_window == 1024 for g in spec.groups[1:])
    assert sorted(i for g in spec.groups for i in g.layers) == list(range(34))
    assert spec.num_reserved_blocks == 1
    # Gemma 2: alternating; two groups of half the layers.
    spec = build_kv_cache_spec([4096 if i % 2 == 0 else None for i in range(42)], 8192)
    assert [len(g.layers) for g in spec.groups] == [21, 21] and spec.layers_per_block == 21
    # Full only, a window that never bites, or the hybrid manager off: one group, no null.
    for windows, max_len, hybrid in (([None] * 30, 2048, True), ([4096] * 32, 4096, True),
                                     ([None, 8, None], 64, False)):  # fmt: skip
        spec = build_kv_cache_spec(windows, max_len, hybrid)
        assert spec.num_groups == 1 and spec.groups[0].sliding_window is None
        assert spec.layers_per_block == len(windows) and spec.num_reserved_blocks == 0
    # Mistral-style: one window everywhere: one group that frees.
    spec = build_kv_cache_spec([W] * 4, 64)
    assert spec.num_groups == 1 and spec.groups[0].sliding_window == W


def test_sliding_blocks_freed_exactly_when_out_of_window() -> None:
    spec = build_kv_cache_spec([W, None], max_model_len=256)  # groups: full, sliding
    kvm = KVCacheManager(64, BS, spec=spec, max_num_batched_tokens=8)
    usable = kvm.num_usable_blocks
    assert usable == 63 and kvm.num_free_blocks == 63
    req = _req("a", list(range(1, 41)), max_tokens=10)
    steps = [8] * 5 + [1] * 9  # chunked prefill of 40, then decodes
    for n in steps:
        start = req.num_computed_tokens
        assert kvm.allocate_slots(req, n) is not None
        full, sliding = kvm.req_to_blocks["a"]
        total = -(-(start + n) // BS)
        assert len(full) == len(sliding) == total
        assert all(b is not kvm.null_block for b in full)
        dead = (start - W + 1) // BS if start >= W else 0
        assert all(b is kvm.null_block for b in sliding[:dead])
        assert all(b is not kvm.null_block for b in sliding[dead:])
        # A block is gone only when no query of this step (first at `start`) can see it.
        for i, b in enumerate(sliding):
            assert (b is kvm.null_block) == ((i + 1) * BS <= start - W + 1)
        assert kvm.num_free_blocks == usable - len(full) - (total - dead)
        assert len(sliding) - dead <= spec.groups[1].max_blocks(10**6, BS, 8)
        req.num_computed_tokens = start + n
        if req.num_computed_tokens >= req.num_tokens:
            req.append_output_token_ids(7)
    kvm.free(req)
    assert kvm.num_free_blocks == usable and kvm.usage == 0.0


def _run(kvm: KVCacheManager, req: Request) -> None:
    hits, n = kvm.get_computed_blocks(req)
    req.num_computed_tokens = 0
    assert kvm.allocate_slots(req, req.num_tokens - n, n, hits) is not None
    req.num_computed_tokens = req.num_tokens


def test_prefix_hits_need_only_the_window_and_never_a_freed_block() -> None:
    spec = build_kv_cache_spec([None, W], max_model_len=256)
    kvm = KVCacheManager(40, BS, spec=spec, max_num_batched_tokens=64)
    prompt = list(range(1, 38))  # 9 full blocks + 1 token
    a = _req("a", prompt)
    _run(kvm, a)
    kvm.free(a)
    # Fill the pool so the LRU blocks (A's first ones, sliding and full) get evicted... then
    # give them back. A new request with A's prompt must still hit where the window allows.
    filler = _req("f", list(range(500, 500 + 4 * 12)))
    _run(kvm, filler)
    filler_ids = {b.block_id for t in kvm.req_to_blocks["f"] for b in t}
    b = _req("b", prompt + [99])
    hits, n = kvm.get_computed_blocks(b)
    full, sliding = hits
    k = n // BS
    for g, table in enumerate(hits):
        for i, blk in enumerate(table):
            if blk is kvm.null_block:
                continue
            assert blk.block_id not in filler_ids  # in use by another request: not A's KV
            assert blk.block_hash == group_block_hash(b.block_hashes[i], g)  # A's content
    assert len(full) == len(sliding) == k
    dead = num_dead_blocks(n, W, BS)
    assert [x is kvm.null_block for x in sliding] == [True] * dead + [False] * (k - dead)
    kvm.free(filler)

    # Sliding blocks evicted inside the window of a longer hit shorten it to where the window
    # is whole; those outside every window do not matter.
    kvm2 = KVCacheManager(64, BS, spec=spec, max_num_batched_tokens=64)
    a2 = _req("a2", prompt)
    _run(kvm2, a2)
    kvm2.free(a2)
    pool = kvm2.block_pool

    def evict_sliding(i: int) -> None:
        key = group_block_hash(a2.block_hashes[i], 1)
        pool.cached_block_hash_to_block.pop(key).block_hash = None

    assert kvm2.get_computed_blocks(_req("c", prompt + [1]))[1] == 9 * BS
    evict_sliding(2)  # outside the window at 36 tokens (needs blocks 7, 8)
    assert kvm2.get_computed_blocks(_req("d", prompt + [1]))[1] == 9 * BS
    evict_sliding(8)  # the last one: the window at 8 blocks needs 6, 7; at 9 needs 7, 8
    assert kvm2.get_computed_blocks(_req("e", prompt + [1]))[1] == 8 * BS
    evict_sliding(6)  # now 8 (needs 6, 7) and 7 (5, 6) fail; 6 blocks (needs 4, 5) is whole
    assert kvm2.get_computed_blocks(_req("g", prompt + [1]))[1] == 6 * BS


class _GroupedRunner:
    """Fake worker over a grouped cache: each slot id holds the token prefix written there;
    every step reads back each group's table over what its layers may see."""

    def __init__(self, spec, num_blocks: int) -> None:
        self.spec, self.num_blocks = spec, num_blocks
        self.null = NULL_BLOCK_ID if spec.has_sliding else None
        self.kv: dict[int, tuple[int, ...]] = {}
        self.state: dict[str, dict] = {}

    def _rows(self, st: dict) -> list[list[int]]:
        rows = []
        for g, ids in zip(self.spec.groups, st["tables"]):
            dead = g.num_dead_blocks(st["computed"], BS)  # as the worker nulls them
            rows.append([NULL_BLOCK_ID] * min(dead, len(ids)) + ids[dead:])
        return rows

    def execute(self, so) -> ModelRunnerOutput:
        for rid in so.finished_req_ids | so.preempted_req_ids:
            self.state.pop(rid, None)
        for nr in so.scheduled_new_reqs:
            self.state[nr.req_id] = dict(
                tokens=nr.prompt_token_ids + nr.output_token_ids, computed=nr.num_computed_tokens,
                tables=[list(nr.block_ids), *map(list, nr.extra_block_ids)])  # fmt: skip
        for cr in so.scheduled_cached_reqs:
            st = self.state[cr.req_id]
            for t, new in zip(st["tables"], [cr.new_block_ids, *cr.extra_new_block_ids]):
                t.extend(new)
        steps = {}
        for rid, n in so.num_scheduled_tokens.items():  # write every group's KV first
            st = self.state[rid]
            rows = self._rows(st)
            start = st["computed"]
            steps[rid] = (start, rows)
            for row in rows:
                for pos in range(start, start + n):
                    assert row[pos // BS] != self.null  # never written
                    self.kv[row[pos // BS] * BS + pos % BS] = tuple(st["tokens"][: pos + 1])
            st["computed"] = start + n
        ids, sampled = [], []
        for rid in so.num_scheduled_tokens:
            st = self.state[rid]
            start, rows = steps[rid]
            for g, row in zip(self.spec.groups, rows):
                first = 0 if g.sliding_window is None else max(0, start - g.sliding_window + 1)
                for pos in range(first, st["computed"]):
                    assert self.kv.get(row[pos // BS] * BS + pos % BS) == tuple(
                        st["tokens"][: pos + 1]), (rid, pos)
            ids.append(rid)
            if st["computed"] == len(st["tokens"]):
                tok = sum(st["tokens"]) % 50 + 1
                st["tokens"].append(tok)
                sampled.append([tok])
            else:
                sampled.append([])
        return ModelRunnerOutput(req_ids=ids, sampled_token_ids=sampled)


def _simulate(spec, num_blocks: int, seed: int) -> tuple[dict[str, list[int]], int, int]:
    sched = Scheduler(
        SchedulerConfig(max_num_batched_tokens=12, max_num_seqs=6, max_model_len=96),
        CacheConfig(block_size=BS), num_blocks=num_blocks, max_model_len=96, kv_cache_spec=spec,
    )  # fmt: skip
    runner = _GroupedRunner(spec, num_blocks)
    rng = random.Random(seed)
    shared = [rng.randrange(1, 50) for _ in range(30)]
    for i in range(10):
        prompt = (shared if i % 2 else []) + [rng.randrange(1, 50) for _ in range(rng.randrange(3, 30))]
        sched.add_request(_req(f"r{i}", prompt, max_tokens=rng.randrange(1, 20)))
    tokens: dict[str, list[int]] = {}
    preemptions = 0
    while sched.has_unfinished_requests():
        so = sched.schedule()
        out = sched.update_from_output(so, runner.execute(so))
        preemptions += out.scheduler_stats.num_preemptions
        for o in out.outputs:
            tokens.setdefault(o.request_id, []).extend(o.new_token_ids)
    kvm = sched.kv_cache_manager
    assert kvm.num_free_blocks == kvm.num_usable_blocks  # every block back in the pool
    return tokens, preemptions, kvm.prefix_cache_hits


@pytest.mark.parametrize(("num_blocks", "seed"), [(40, 1), (44, 2), (48, 3)])
def test_scheduler_on_grouped_cache_reads_back_every_window(num_blocks: int, seed: int) -> None:
    """Chunked prefill (12-token budget), preemption and prefix hits over four groups; this
    caught hits of one group evicted by another group's new blocks in the same allocation."""
    hybrid = build_kv_cache_spec([W, None, W, 12], max_model_len=96)
    # One layer per block (the fewest of a kind): full, window 8 twice, window 12.
    assert [g.sliding_window for g in hybrid.groups] == [None, W, W, 12]
    ref, _, _ = _simulate(build_kv_cache_spec([None]), 400, seed)
    tokens, preemptions, hits = _simulate(hybrid, num_blocks, seed)
    assert tokens == ref  # outputs are a function of the history: same under any schedule
    assert preemptions > 0 and hits > 0
