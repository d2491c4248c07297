"""KV-cache blocks, the LRU free queue and the pool that owns both plus the prefix-cache map.

Invariants kept by BlockPool:
- a block is in the free queue iff its ref_cnt is 0;
- the free queue is ordered by eviction priority: the head is evicted first;
- a block with a `block_hash` is the one block the hash map holds for that hash (first writer
  wins); it keeps its hash while free, so it can be hit again until it is evicted;
- with KV cache groups (see kv_cache_groups.py) one content hash names a different block in
  each group: the map's key is the hash with the group index appended (group 0: the hash);
- the null block (when reserved) is never free, never cached and never handed out.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pagedllm.core.block_hash import BlockHash

if TYPE_CHECKING:
    from pagedllm.core.request import Request


@dataclass(slots=True, eq=False)
class KVCacheBlock:
    """One block of `block_size` token slots. Identity (not value) equality."""

    block_id: int
    ref_cnt: int = 0
    block_hash: BlockHash | None = None
    # Links of the free queue; both None while the block is not in it.
    prev_free_block: KVCacheBlock | None = field(default=None, repr=False)
    next_free_block: KVCacheBlock | None = field(default=None, repr=False)


class FreeBlockQueue:
    """Doubly linked list of free blocks with O(1) popleft, append and remove.

    Two sentinel nodes bracket the list, so a block is in the queue iff its links are set.
    """

    def __init__(self, blocks: Sequence[KVCacheBlock]) -> None:
        self._head = KVCacheBlock(-1)
        self._tail = KVCacheBlock(-1)
        self._head.next_free_block = self._tail
        self._tail.prev_free_block = self._head
        self.num_free_blocks = 0
        for b in blocks:
            self.append(b)

    def __len__(self) -> int:
        return self.num_free_blocks

    def popleft(self) -> KVCacheBlock:
        block = self._head.next_free_block
        if block is self._tail or block is None:
            raise ValueError("no free blocks left")
        self.remove(block)
        return block

    def popleft_n(self, n: int) -> list[KVCacheBlock]:
        if n > self.num_free_blocks:
            raise ValueError(f"asked for {n} free blocks, only {self.num_free_blocks} left")
        return [self.popleft() for _ in range(n)]

    def remove(self, block: KVCacheBlock) -> None:
        prev, nxt = block.prev_free_block, block.next_free_block
        if prev is None or nxt is None:
            raise ValueError(f"block {block.block_id} is not in the free queue")
        prev.next_free_block = nxt
        nxt.prev_free_block = prev
        block.prev_free_block = block.next_free_block = None
        self.num_free_blocks -= 1

    def append(self, block: KVCacheBlock) -> None:
        if block.prev_free_block is not None or block.next_free_block is not None:
            raise ValueError(f"block {block.block_id} is already in the free queue")
        last = self._tail.prev_free_block
        assert last is not None
        last.next_free_block = block
        block.prev_free_block = last
        block.next_free_block = self._tail
        self._tail.prev_free_block = block
        self.num_free_blocks += 1

    def get_all_free_blocks(self) -> list[KVCacheBlock]:
        """Head (next evicted) to tail. O(n); for tests and debugging."""
        out = []
        node = self._head.next_free_block
        while node is not None and node is not self._tail:
            out.append(node)
            node = node.next_free_block
        return out


def group_block_hash(block_hash: BlockHash, group: int) -> BlockHash:
    """The prefix-cache key of a block of KV cache group `group` with this content hash."""
    return block_hash if group == 0 else BlockHash(block_hash + group.to_bytes(2, "little"))


class BlockPool:
    """Owns every KVCacheBlock, the free queue and the hash -> block prefix-cache map.

    `reserve_null_block`: block 0 is taken out for good (sliding-window groups point their
    freed table entries at it)."""

    def __init__(
        self, num_blocks: int, enable_caching: bool = True, reserve_null_block: bool = False
    ) -> None:
        if num_blocks < 1 + reserve_null_block:
            raise ValueError(f"num_blocks must be at least {1 + reserve_null_block}, "
                             f"got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVCacheBlock(i) for i in range(num_blocks)]
        self.null_block: KVCacheBlock | None = None
        if reserve_null_block:
            self.null_block = self.blocks[0]
            self.null_block.ref_cnt = 1  # never reaches 0: never free
        self.num_usable_blocks = num_blocks - reserve_null_block
        self.free_block_queue = FreeBlockQueue(self.blocks[reserve_null_block:])
        self.cached_block_hash_to_block: dict[BlockHash, KVCacheBlock] = {}

    @property
    def num_free_blocks(self) -> int:
        """Blocks with ref_cnt 0, cached ones included (they are evictable)."""
        return self.free_block_queue.num_free_blocks

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_usable_blocks

    def get_new_blocks(self, num_blocks: int) -> list[KVCacheBlock]:
        """Take blocks from the head of the free queue (LRU first), evicting their hashes.

        The returned blocks have ref_cnt 1. Raises ValueError when not enough are free.
        """
        blocks = self.free_block_queue.popleft_n(num_blocks)
        for b in blocks:
            assert b.ref_cnt == 0, f"free block {b.block_id} has ref_cnt {b.ref_cnt}"
            self._evict(b)
            b.ref_cnt = 1
        return blocks

    def _evict(self, block: KVCacheBlock) -> None:
        h = block.block_hash
        if h is None:
            return
        block.block_hash = None
        if self.cached_block_hash_to_block.get(h) is block:
            del self.cached_block_hash_to_block[h]

    def get_cached_block(self, block_hash: BlockHash, group: int = 0) -> KVCacheBlock | None:
        if not self.enable_caching:
            return None
        return self.cached_block_hash_to_block.get(group_block_hash(block_hash, group))

    def touch(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Take a reference on prefix-hit blocks; a free one leaves the free queue."""
        for b in blocks:
            if b.ref_cnt == 0:
                self.free_block_queue.remove(b)
            b.ref_cnt += 1

    def free_blocks(self, ordered_blocks: Iterable[KVCacheBlock]) -> None:
        """Drop a reference on each block; blocks reaching 0 join the queue tail in this order.

        Pass a request's blocks in reverse so that its last blocks (least likely to be shared)
        are evicted before its first ones.
        """
        for b in ordered_blocks:
            if b.ref_cnt <= 0:
                raise ValueError(f"block {b.block_id} freed more often than taken")
            b.ref_cnt -= 1
            if b.ref_cnt == 0:
                self.free_block_queue.append(b)

    def cache_full_blocks(
        self,
        request: Request,
        blocks: Sequence[KVCacheBlock],
        num_full_blocks_before: int,
        num_full_blocks_after: int,
        group: int = 0,
    ) -> None:
        """Record hash -> block for `blocks[before:after]`, newly full for `request` (in KV
        cache group `group`).

        A block that already has a hash (a prefix hit) is left alone, and so is the null block.
        When another block already holds the hash, the first writer wins and this block stays
        uncached.
        """
        if not self.enable_caching or num_full_blocks_after <= num_full_blocks_before:
            return
        hashes = request.block_hashes
        if len(hashes) < num_full_blocks_after:
            raise ValueError(
                f"request {request.request_id} has {len(hashes)} block hashes, "
                f"{num_full_blocks_after} full blocks asked to be cached"
            )
        for i in range(num_full_blocks_before, num_full_blocks_after):
            block = blocks[i]
            if block.block_hash is not None or block is self.null_block:
                continue
            h = group_block_hash(hashes[i], group)
            if h in self.cached_block_hash_to_block:
                continue
            block.block_hash = h
            self.cached_block_hash_to_block[h] = block

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash. Safe with blocks in use: they simply stop being shareable."""
        for h, block in self.cached_block_hash_to_block.items():
            assert block.block_hash == h
            block.block_hash = None
        self.cached_block_hash_to_block.clear()
        return True
