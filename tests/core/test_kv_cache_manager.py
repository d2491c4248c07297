"""KVCacheManager: prefix hits, counters, allocation failure, property tests."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from pagedllm.core.kv_cache_manager import KVCacheManager
from pagedllm.core.request import Request
from pagedllm.sampling_params import SamplingParams

BS = 4


def _req(rid: str, tokens: list[int], **sp_kwargs: object) -> Request:
    return Request(rid, tokens, SamplingParams(**sp_kwargs), None, 0.0, block_size=BS)


def _schedule_prefill(kvm: KVCacheManager, req: Request) -> list[int]:
    blocks, hit = kvm.get_computed_blocks(req)
    assert kvm.allocate_slots(req, req.num_tokens - hit, hit, blocks) is not None
    req.num_computed_tokens = req.num_tokens
    return kvm.get_block_ids(req.request_id)


def test_prefix_hits_across_requests_and_counters() -> None:
    kvm = KVCacheManager(num_blocks=16, block_size=BS)
    prefix = list(range(100, 110))  # 2 full blocks + 2 tokens
    a = _req("a", prefix + [1, 2, 3])
    ids_a = _schedule_prefill(kvm, a)
    assert len(ids_a) == 4 and kvm.prefix_cache_hits == 0 and kvm.prefix_cache_queries == 13
    b = _req("b", prefix + [7, 7, 7, 7, 7])
    (blocks,), hit = kvm.get_computed_blocks(b)  # one KV cache group
    assert hit == 8 and [x.block_id for x in blocks] == ids_a[:2]
    assert kvm.prefix_cache_queries == 28 and kvm.prefix_cache_hits == 8
    new = kvm.allocate_slots(b, b.num_tokens - hit, hit, blocks)
    assert new is not None and len(new) == 2
    assert kvm.get_block_ids("b")[:2] == ids_a[:2]
    assert all(x.ref_cnt == 2 for x in blocks)
    # Hits stay valid after the first owner is freed.
    kvm.free(a)
    c = _req("c", prefix + [9])
    assert kvm.get_computed_blocks(c)[1] == 8


def test_hit_leaves_at_least_one_token() -> None:
    kvm = KVCacheManager(num_blocks=8, block_size=BS)
    toks = list(range(8))
    _schedule_prefill(kvm, _req("a", toks))
    (blocks,), hit = kvm.get_computed_blocks(_req("b", toks))
    assert hit == 4 and len(blocks) == 1
    # The recomputed last block duplicates a cached hash and stays uncached.
    b = _req("b2", toks)
    ids = _schedule_prefill(kvm, b)
    assert len(ids) == 2 and kvm.block_pool.blocks[ids[1]].block_hash is None


def test_no_hits_when_disabled_prompt_logprobs_or_pooling() -> None:
    toks = list(range(12))
    off = KVCacheManager(num_blocks=8, block_size=BS, enable_caching=False)
    _schedule_prefill(off, _req("a", toks))
    assert off.get_computed_blocks(_req("b", toks)) == (([],), 0)
    assert off.prefix_cache_queries == 0
    on = KVCacheManager(num_blocks=8, block_size=BS)
    _schedule_prefill(on, _req("a", toks))
    assert on.get_computed_blocks(_req("b", toks, prompt_logprobs=1)) == (([],), 0)
    pooled = Request("p", toks, None, None, 0.0, pooling=True, block_size=BS)
    assert on.get_computed_blocks(pooled) == (([],), 0)
    assert on.get_computed_blocks(_req("c", toks))[1] == 8


def test_allocation_failure_changes_nothing_and_counts_evictable_hits() -> None:
    kvm = KVCacheManager(num_blocks=4, block_size=BS)
    a = _req("a", list(range(8)))
    _schedule_prefill(kvm, a)
    kvm.free(a)  # both blocks cached, free
    b = _req("b", list(range(8)) + list(range(50, 58)))  # 4 blocks, 2 hit
    blocks, hit = kvm.get_computed_blocks(b)
    assert hit == 8
    # 2 hit blocks (free, evictable) + 2 new = 4: fits exactly.
    assert kvm.allocate_slots(b, 8, hit, blocks) is not None and kvm.num_free_blocks == 0
    kvm.free(b)
    c = _req("c", list(range(8)) + list(range(60, 70)))  # needs 5 blocks
    blocks, hit = kvm.get_computed_blocks(c)
    free_before = kvm.num_free_blocks
    assert kvm.allocate_slots(c, c.num_tokens - hit, hit, blocks) is None
    assert kvm.num_free_blocks == free_before and kvm.get_block_ids("c") == []
    assert all(x.ref_cnt == 0 for x in blocks[0])


def test_decode_growth_caches_blocks_when_full() -> None:
    kvm = KVCacheManager(num_blocks=8, block_size=BS)
    a = _req("a", [1, 2, 3])
    _schedule_prefill(kvm, a)
    for tok in (4, 5, 6):
        a.append_output_token_ids(tok)
        assert kvm.allocate_slots(a, 1) is not None
        a.num_computed_tokens += 1
    assert len(kvm.get_block_ids("a")) == 2
    first = kvm.block_pool.blocks[kvm.get_block_ids("a")[0]]
    assert first.block_hash == a.block_hashes[0]
    assert kvm.can_ever_fit(32) and not kvm.can_ever_fit(33)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 3), st.integers(1, 12), st.booleans()),
        min_size=1,
        max_size=30,
    )
)
def test_manager_invariants_random(ops: list[tuple[int, int, bool]]) -> None:
    """Random prefills (shared prefixes), decode steps and frees keep the pool consistent."""
    num_blocks = 10
    kvm = KVCacheManager(num_blocks=num_blocks, block_size=BS)
    live: dict[str, Request] = {}
    for i, (prefix_id, length, do_free) in enumerate(ops):
        if do_free and live:
            kvm.free(live.pop(sorted(live)[prefix_id % len(live)]))
        else:
            req = _req(f"r{i}", [prefix_id] * 6 + list(range(length)))
            blocks, hit = kvm.get_computed_blocks(req)
            if kvm.allocate_slots(req, req.num_tokens - hit, hit, blocks) is not None:
                req.num_computed_tokens = req.num_tokens
                live[req.request_id] = req
        for req in live.values():  # one decode step each, when it fits
            req.append_output_token_ids(7)
            if kvm.allocate_slots(req, 1) is not None:
                req.num_computed_tokens += 1
            else:
                req.output_token_ids.pop()
                req.all_token_ids.pop()
        refs: dict[int, int] = {}
        for rid, req in live.items():
            ids = kvm.get_block_ids(rid)
            assert len(ids) == len(set(ids)), "a request owns a block twice"
            assert len(ids) * BS >= req.num_computed_tokens
            for bid in ids:
                refs[bid] = refs.get(bid, 0) + 1
        for b in kvm.block_pool.blocks:
            assert b.ref_cnt == refs.get(b.block_id, 0) >= 0
        assert kvm.num_free_blocks == num_blocks - len(refs)
    for req in list(live.values()):
        kvm.free(req)
    assert kvm.num_free_blocks == num_blocks
    assert all(b.ref_cnt == 0 for b in kvm.block_pool.blocks)
    assert kvm.prefix_cache_hits <= kvm.prefix_cache_queries
