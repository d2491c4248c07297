"""Per-request block tables on top of the BlockPool: prefix-cache lookup, allocation, freeing.

A request has one block table per KV cache group (`kv_cache_groups.py`; one group unless the
model mixes full and sliding-window layers). A table covers the request's first
`num_computed_tokens + num_new_tokens` tokens. In a sliding group, the blocks that fell out of
the window of the step's first query are returned to the pool as the request advances, and the
null block takes their place in the table.

Blocks become cached (hash -> block, per group) as soon as they are full after the step that
computes them, so a request scheduled later in the SAME step may hit them: the worker must write
a step's KV for every token of a layer before that layer's attention reads the cache.

A prefix hit of k blocks needs, in a full group, blocks 0..k-1, and in a sliding group only the
blocks the window of position k * block_size reaches; the hit is the longest k every group has.
"""

from __future__ import annotations

from collections.abc import Sequence

from pagedllm.core.block_pool import BlockPool, KVCacheBlock
from pagedllm.core.kv_cache_groups import KVCacheGroup, KVCacheSpec, build_kv_cache_spec
from pagedllm.core.request import Request

# One list of blocks per KV cache group.
GroupBlocks = tuple[list[KVCacheBlock], ...]


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_caching: bool = True,
        spec: KVCacheSpec | None = None,
        max_num_batched_tokens: int | None = None,
    ) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be at least 1, got {block_size}")
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.spec = spec if spec is not None else build_kv_cache_spec([None])
        self.groups: tuple[KVCacheGroup, ...] = self.spec.groups
        self.max_num_batched_tokens = max_num_batched_tokens
        self._has_sliding = self.spec.has_sliding
        self.block_pool = BlockPool(num_blocks, enable_caching, self._has_sliding)
        self.null_block = self.block_pool.null_block
        # Per request, per group: its block table (null blocks where freed).
        self.req_to_blocks: dict[str, GroupBlocks] = {}
        # Per request: how many of its leading blocks went through cache_full_blocks.
        self.num_cached_blocks: dict[str, int] = {}
        # Per request, per group: leading entries already replaced by the null block, and
        # entries the worker was told about (`take_new_block_ids`).
        self.num_freed_blocks: dict[str, list[int]] = {}
        self.num_sent_blocks: dict[str, list[int]] = {}
        # Cumulative, in tokens.
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0

    @property
    def num_blocks(self) -> int:
        return self.block_pool.num_blocks

    @property
    def num_usable_blocks(self) -> int:
        """Blocks requests can hold (the null block excluded)."""
        return self.block_pool.num_usable_blocks

    @property
    def usage(self) -> float:
        return self.block_pool.usage

    @property
    def num_free_blocks(self) -> int:
        return self.block_pool.num_free_blocks

    def max_blocks_needed(self, num_tokens: int) -> int:
        """Most blocks (all groups) a request of `num_tokens` tokens of KV holds at once."""
        chunk = self.max_num_batched_tokens or num_tokens
        return self.spec.max_blocks(num_tokens, self.block_size, chunk)

    def can_ever_fit(self, num_tokens: int) -> bool:
        """Whether `num_tokens` tokens of KV fit in the whole cache."""
        return self.max_blocks_needed(num_tokens) <= self.num_usable_blocks

    # ------------------------------------------------------------------ prefix cache

    def get_computed_blocks(self, request: Request) -> tuple[GroupBlocks, int]:
        """Longest cached prefix of `request` every group can resume from: per group its
        blocks (null where a sliding window does not need one), and its token count.

        At least one token is always left to compute (the step must produce logits). Requests
        that want prompt logprobs, and pooling requests (their pooler needs every hidden state),
        get no hits. The blocks are not touched here; `allocate_slots` does that.
        """
        empty: GroupBlocks = tuple([] for _ in self.groups)
        if not self.enable_caching or request.pooling:
            return empty, 0
        sp = request.sampling_params
        if sp is not None and sp.prompt_logprobs is not None:
            return empty, 0
        bs = self.block_size
        hashes = request.block_hashes[: (request.num_tokens - 1) // bs]
        pool = self.block_pool
        # Full groups: the chain of cached blocks from the start bounds every hit.
        limit = len(hashes)
        found: list[list[KVCacheBlock | None]] = []
        for g, group in enumerate(self.groups):
            blocks: list[KVCacheBlock | None] = []
            for h in hashes[:limit]:
                b = pool.get_cached_block(h, g)
                if b is None and group.sliding_window is None:
                    break
                blocks.append(b)
            if group.sliding_window is None:
                limit = len(blocks)
            found.append(blocks)
        k = self._longest_hit(found, limit)
        hits = tuple(self._hit_table(group, blocks, k) for group, blocks in zip(self.groups, found))
        num_hit_tokens = k * bs
        self.prefix_cache_queries += request.num_tokens
        self.prefix_cache_hits += num_hit_tokens
        return hits, num_hit_tokens

    def _longest_hit(self, found: list[list[KVCacheBlock | None]], limit: int) -> int:
        """Largest k <= limit such that every sliding group has the blocks position
        k * block_size needs (full groups have k blocks by `limit`)."""
        runs = []  # per sliding group: cached blocks in a row ending at each index
        for group, blocks in zip(self.groups, found):
            if group.sliding_window is None:
                continue
            run, n = [], 0
            for b in blocks[:limit]:
                n = n + 1 if b is not None else 0
                run.append(n)
            runs.append((group, run))
        for k in range(limit, 0, -1):
            if all(run[k - 1] >= k - group.num_dead_blocks(k * self.block_size, self.block_size)
                   for group, run in runs):
                return k
        return 0

    def _hit_table(
        self, group: KVCacheGroup, blocks: list[KVCacheBlock | None], k: int
    ) -> list[KVCacheBlock]:
        dead = group.num_dead_blocks(k * self.block_size, self.block_size)
        table = [self.null_block] * dead + blocks[dead:k]
        assert all(b is not None for b in table)
        return table  # type: ignore[return-value]

    # ------------------------------------------------------------------ allocation

    def allocate_slots(
        self,
        request: Request,
        num_new_tokens: int,
        num_new_computed_tokens: int = 0,
        new_computed_blocks: GroupBlocks | Sequence[KVCacheBlock] = (),
    ) -> list[KVCacheBlock] | None:
        """Grow the request's block tables to hold this step's tokens.

        First frees, in sliding groups, the blocks out of the window of the step's first query.
        `new_computed_blocks` / `num_new_computed_tokens` are a prefix hit from
        `get_computed_blocks` (first schedule only; a plain list is taken as the one group's).
        Returns the newly allocated blocks, all groups (hit blocks excluded), or None,
        allocating nothing, when the free blocks do not suffice; `get_group_block_ids` has the
        tables.
        """
        if num_new_tokens < 0:
            raise ValueError(f"num_new_tokens must be non-negative, got {num_new_tokens}")
        rid = request.request_id
        tables = self.req_to_blocks.get(rid)
        total_tokens = request.num_computed_tokens + num_new_computed_tokens + num_new_tokens
        num_total_blocks = _cdiv(total_tokens, self.block_size)
        if tables is not None:
            if self._has_sliding:  # even a step that needs no new block frees dead ones
                self._free_dead_blocks(rid, tables, request.num_computed_tokens)
            if not new_computed_blocks and self._fits(request, tables, total_tokens,
                                                      num_total_blocks):
                return []  # the common decode step: nothing to allocate or to cache
        hits = self._as_groups(new_computed_blocks)
        if tables is not None and any(hits) and any(tables):
            raise ValueError(f"request {rid}: prefix hit on a non-empty table")
        needs = [max(0, num_total_blocks - (len(tables[g]) if tables else 0) - len(hits[g]))
                 for g in range(len(self.groups))]
        # Hit blocks that are free (ref_cnt 0) leave the free queue when touched.
        num_evictable_hits = sum(1 for hit in hits for b in hit if b.ref_cnt == 0)
        if sum(needs) > self.block_pool.num_free_blocks - num_evictable_hits:
            return None

        if tables is None:
            tables = self.req_to_blocks[rid] = tuple([] for _ in self.groups)
            self.num_freed_blocks[rid] = [0] * len(self.groups)
        # Every group's hits leave the free queue before any group takes new blocks (which
        # would evict them).
        for g, (table, hit) in enumerate(zip(tables, hits)):
            if hit:
                real = [b for b in hit if b is not self.null_block]
                self.block_pool.touch(real)
                table.extend(hit)
                self.num_freed_blocks[rid][g] = len(hit) - len(real)
        new_blocks: list[KVCacheBlock] = []
        for table, need in zip(tables, needs):
            if need:
                blocks = self.block_pool.get_new_blocks(need)
                table.extend(blocks)
                new_blocks.extend(blocks)

        if self.enable_caching:
            num_full_before = self.num_cached_blocks.get(rid, 0)
            num_full_after = min(total_tokens // self.block_size, len(request.block_hashes))
            for g, table in enumerate(tables):
                self.block_pool.cache_full_blocks(request, table, num_full_before,
                                                  num_full_after, g)
            self.num_cached_blocks[rid] = max(num_full_before, num_full_after)
        return new_blocks

    def _fits(self, request: Request, tables: GroupBlocks, total_tokens: int,
              num_total_blocks: int) -> bool:
        """Whether `total_tokens` fit the tables as they are and fill no block that is not
        cached yet (what `allocate_slots` would otherwise do)."""
        for table in tables:
            if len(table) < num_total_blocks:
                return False
        if not self.enable_caching:
            return True
        num_full = min(total_tokens // self.block_size, len(request.block_hashes))
        return num_full <= self.num_cached_blocks.get(request.request_id, 0)

    def _as_groups(self, blocks: GroupBlocks | Sequence[KVCacheBlock]) -> GroupBlocks:
        if not blocks:
            return tuple([] for _ in self.groups)
        if isinstance(blocks[0], KVCacheBlock):
            if len(self.groups) != 1:
                raise ValueError("prefix-hit blocks of several KV cache groups come per group")
            return (list(blocks),)  # type: ignore[arg-type]
        if len(blocks) != len(self.groups):
            raise ValueError(f"{len(blocks)} block lists for {len(self.groups)} KV cache groups")
        return tuple(list(b) for b in blocks)  # type: ignore[arg-type]

    def _free_dead_blocks(self, rid: str, tables: GroupBlocks, num_computed_tokens: int) -> None:
        """Sliding groups: blocks before the window of position `num_computed_tokens` go back
        to the pool (oldest first: evicted first) and the null block takes their place."""
        freed = self.num_freed_blocks[rid]
        for g, (group, table) in enumerate(zip(self.groups, tables)):
            dead = min(group.num_dead_blocks(num_computed_tokens, self.block_size), len(table))
            if dead <= freed[g]:
                continue
            out = [b for b in table[freed[g] : dead] if b is not self.null_block]
            table[freed[g] : dead] = [self.null_block] * (dead - freed[g])
            freed[g] = dead
            self.block_pool.free_blocks(out)

    def free(self, request: Request) -> None:
        """Release the request's blocks, each group's last block first (evicted first)."""
        tables = self.req_to_blocks.pop(request.request_id, None)
        self.num_cached_blocks.pop(request.request_id, None)
        self.num_freed_blocks.pop(request.request_id, None)
        self.num_sent_blocks.pop(request.request_id, None)
        for table in tables or ():
            self.block_pool.free_blocks(b for b in reversed(table) if b is not self.null_block)

    def get_block_ids(self, request_id: str) -> list[int]:
        """The first group's block table (the only one of a model without sliding groups)."""
        tables = self.req_to_blocks.get(request_id)
        return [b.block_id for b in tables[0]] if tables else []

    def get_group_block_ids(self, request_id: str) -> list[list[int]]:
        tables = self.req_to_blocks.get(request_id)
        if tables is None:
            return [[] for _ in self.groups]
        return [[b.block_id for b in table] for table in tables]

    def take_new_block_ids(self, request_id: str) -> list[list[int]]:
        """Per group, the ids appended to the request's table since the last call (all of
        it on the first). The worker replaces freed entries by the same rule (null block)."""
        tables = self.req_to_blocks.get(request_id)
        if tables is None:
            return [[] for _ in self.groups]
        sent = self.num_sent_blocks.setdefault(request_id, [0] * len(tables))
        out = []
        for g, table in enumerate(tables):
            out.append([b.block_id for b in table[sent[g]:]])
            sent[g] = len(table)
        return out

    def num_held_blocks(self, request_id: str) -> int:
        """Blocks the request holds now (null entries excluded), all groups."""
        tables = self.req_to_blocks.get(request_id) or ()
        return sum(1 for t in tables for b in t if b is not self.null_block)

    def reset_prefix_cache(self) -> bool:
        return self.block_pool.reset_prefix_cache()
