"""BlockPool and FreeBlockQueue: LRU order, ref counting, caching; property tests."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pagedllm.core.block_pool import BlockPool, FreeBlockQueue, KVCacheBlock
from pagedllm.core.request import Request
from pagedllm.sampling_params import SamplingParams


def _req(rid: str, tokens: list[int], block_size: int = 4) -> Request:
    return Request(rid, tokens, SamplingParams(), None, 0.0, block_size=block_size)


def _ids(blocks: list[KVCacheBlock]) -> list[int]:
    return [b.block_id for b in blocks]


def test_free_queue_o1_ops() -> None:
    blocks = [KVCacheBlock(i) for i in range(5)]
    q = FreeBlockQueue(blocks)
    assert len(q) == 5
    q.remove(blocks[2])
    assert _ids(q.get_all_free_blocks()) == [0, 1, 3, 4]
    assert q.popleft() is blocks[0]
    q.append(blocks[2])
    q.append(blocks[0])
    assert _ids(q.get_all_free_blocks()) == [1, 3, 4, 2, 0]
    with pytest.raises(ValueError):
        q.append(blocks[0])
    assert _ids(q.popleft_n(5)) == [1, 3, 4, 2, 0]
    with pytest.raises(ValueError):
        q.popleft()
    with pytest.raises(ValueError):
        q.remove(blocks[1])


def test_get_touch_free_and_usage() -> None:
    pool = BlockPool(4)
    a = pool.get_new_blocks(3)
    assert _ids(a) == [0, 1, 2] and all(b.ref_cnt == 1 for b in a)
    assert pool.num_free_blocks == 1 and pool.usage == pytest.approx(0.75)
    with pytest.raises(ValueError):
        pool.get_new_blocks(2)
    pool.touch(a[:1])
    assert a[0].ref_cnt == 2
    pool.free_blocks(reversed(a))
    assert a[0].ref_cnt == 1 and pool.num_free_blocks == 3
    # Freed in reverse order: tail blocks first in line for eviction.
    assert _ids(pool.free_block_queue.get_all_free_blocks()) == [3, 2, 1]
    with pytest.raises(ValueError):
        pool.free_blocks([a[1]])


def test_cache_first_writer_wins_and_eviction() -> None:
    pool = BlockPool(6)
    r1 = _req("a", list(range(8)))
    r2 = _req("b", list(range(8)))
    b1 = pool.get_new_blocks(2)
    pool.cache_full_blocks(r1, b1, 0, 2)
    assert pool.get_cached_block(r1.block_hashes[0]) is b1[0]
    b2 = pool.get_new_blocks(2)
    pool.cache_full_blocks(r2, b2, 0, 2)  # same content: duplicates stay uncached
    assert b2[0].block_hash is None and pool.get_cached_block(r2.block_hashes[1]) is b1[1]
    pool.free_blocks(reversed(b1))
    # A free cached block can still be hit and touched back out of the free queue.
    hit = pool.get_cached_block(r1.block_hashes[0])
    assert hit is b1[0] and hit.ref_cnt == 0
    pool.touch([hit])
    assert hit.ref_cnt == 1 and pool.num_free_blocks == 3
    # Allocating reaches the cached free block b1[1] last (after blocks 4, 5) and evicts it.
    got = pool.get_new_blocks(3)
    assert _ids(got) == [4, 5, 1]
    assert pool.get_cached_block(r1.block_hashes[1]) is None and got[2].block_hash is None
    assert pool.get_cached_block(r1.block_hashes[0]) is b1[0]


def test_lru_eviction_order_across_requests() -> None:
    pool = BlockPool(4)
    r_old, r_new = _req("old", [1] * 8), _req("new", [2] * 8)
    old = pool.get_new_blocks(2)
    new = pool.get_new_blocks(2)
    pool.cache_full_blocks(r_old, old, 0, 2)
    pool.cache_full_blocks(r_new, new, 0, 2)
    pool.free_blocks(reversed(old))
    pool.free_blocks(reversed(new))
    # Least recently freed first; within a request, its last block first.
    assert _ids(pool.get_new_blocks(1)) == [1]
    assert pool.get_cached_block(r_old.block_hashes[0]) is old[0]
    assert pool.get_cached_block(r_old.block_hashes[1]) is None
    assert _ids(pool.get_new_blocks(2)) == [0, 3]
    assert pool.get_cached_block(r_new.block_hashes[0]) is new[0]


def test_caching_disabled_and_reset() -> None:
    off = BlockPool(2, enable_caching=False)
    r = _req("a", list(range(8)))
    blocks = off.get_new_blocks(2)
    off.cache_full_blocks(r, blocks, 0, 2)
    assert off.get_cached_block(r.block_hashes[0]) is None
    on = BlockPool(2)
    blocks = on.get_new_blocks(2)
    on.cache_full_blocks(r, blocks, 0, 2)
    assert on.reset_prefix_cache()
    assert on.get_cached_block(r.block_hashes[0]) is None
    assert all(b.block_hash is None for b in blocks)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["alloc", "free", "touch", "cache"]), st.integers(0, 7)),
        max_size=60,
    )
)
def test_pool_invariants_random_ops(ops: list[tuple[str, int]]) -> None:
    num_blocks = 8
    pool = BlockPool(num_blocks)
    owned: list[list[KVCacheBlock]] = []  # each entry: one owner's references
    for step, (op, arg) in enumerate(ops):
        if op == "alloc" and arg <= pool.num_free_blocks:
            owned.append(pool.get_new_blocks(arg))
        elif op == "free" and owned:
            pool.free_blocks(reversed(owned.pop(arg % len(owned))))
        elif op == "touch" and owned:
            shared = owned[arg % len(owned)]
            pool.touch(shared)
            owned.append(list(shared))
        elif op == "cache" and owned:
            blocks = owned[arg % len(owned)]
            req = _req(f"r{step}", [arg % 3] * (4 * len(blocks)))
            pool.cache_full_blocks(req, blocks, 0, len(blocks))
        refs: dict[int, int] = {}
        for blocks in owned:
            for b in blocks:
                refs[b.block_id] = refs.get(b.block_id, 0) + 1
        free = pool.free_block_queue.get_all_free_blocks()
        assert len(free) == pool.num_free_blocks == num_blocks - len(refs)
        assert len({b.block_id for b in free}) == len(free)
        for b in pool.blocks:
            assert b.ref_cnt == refs.get(b.block_id, 0) >= 0
        for h, b in pool.cached_block_hash_to_block.items():
            assert b.block_hash == h
    for blocks in owned:
        pool.free_blocks(reversed(blocks))
    assert pool.num_free_blocks == num_blocks and all(b.ref_cnt == 0 for b in pool.blocks)
