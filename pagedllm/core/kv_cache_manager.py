"""Per-request block tables on top of the BlockPool: prefix-cache lookup, allocation, freeing.

A request's block table covers its first `num_computed_tokens + num_new_tokens` tokens. Blocks
become cached (hash -> block) as soon as they are full after the step that computes them, so a
request scheduled later in the SAME step may hit them: the worker must write a step's KV for
every token of a layer before that layer's attention reads the cache.
"""

from __future__ import annotations

from collections.abc import Sequence

from pagedllm.core.block_pool import BlockPool, KVCacheBlock
from pagedllm.core.request import Request


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be at least 1, got {block_size}")
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.block_pool = BlockPool(num_blocks, enable_caching)
        self.req_to_blocks: dict[str, list[KVCacheBlock]] = {}
        # Per request: how many of its leading blocks went through cache_full_blocks.
        self.num_cached_blocks: dict[str, int] = {}
        # Cumulative, in tokens.
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0

    @property
    def num_blocks(self) -> int:
        return self.block_pool.num_blocks

    @property
    def usage(self) -> float:
        return self.block_pool.usage

    @property
    def num_free_blocks(self) -> int:
        return self.block_pool.num_free_blocks

    def can_ever_fit(self, num_tokens: int) -> bool:
        """Whether `num_tokens` tokens of KV fit in the whole cache."""
        return _cdiv(num_tokens, self.block_size) <= self.block_pool.num_blocks

    def get_computed_blocks(self, request: Request) -> tuple[list[KVCacheBlock], int]:
        """Longest chain of cached full blocks that prefixes `request`, and its token count.

        At least one token is always left to compute (the step must produce logits). Requests
        that want prompt logprobs, and pooling requests (their pooler needs every hidden state),
        get no hits. The blocks are not touched here; `allocate_slots` does that.
        """
        if not self.enable_caching or request.pooling:
            return [], 0
        sp = request.sampling_params
        if sp is not None and sp.prompt_logprobs is not None:
            return [], 0
        max_hit_blocks = (request.num_tokens - 1) // self.block_size
        hits: list[KVCacheBlock] = []
        for h in request.block_hashes[:max_hit_blocks]:
            block = self.block_pool.get_cached_block(h)
            if block is None:
                break
            hits.append(block)
        num_hit_tokens = len(hits) * self.block_size
        self.prefix_cache_queries += request.num_tokens
        self.prefix_cache_hits += num_hit_tokens
        return hits, num_hit_tokens

    def allocate_slots(
        self,
        request: Request,
        num_new_tokens: int,
        num_new_computed_tokens: int = 0,
        new_computed_blocks: Sequence[KVCacheBlock] = (),
    ) -> list[KVCacheBlock] | None:
        """Grow the request's block table to hold this step's tokens.

        `new_computed_blocks` / `num_new_computed_tokens` are a prefix hit from
        `get_computed_blocks` (first schedule only). Returns the newly allocated blocks (hit
        blocks excluded), or None, changing nothing, when the free blocks do not suffice.
        """
        if num_new_tokens < 0:
            raise ValueError(f"num_new_tokens must be non-negative, got {num_new_tokens}")
        req_blocks = self.req_to_blocks.get(request.request_id)
        num_existing = len(req_blocks) if req_blocks is not None else 0
        if new_computed_blocks and num_existing:
            raise ValueError(f"request {request.request_id}: prefix hit on a non-empty table")
        total_tokens = request.num_computed_tokens + num_new_computed_tokens + num_new_tokens
        num_needed = _cdiv(total_tokens, self.block_size) - num_existing - len(new_computed_blocks)
        # Hit blocks that are free (ref_cnt 0) leave the free queue when touched.
        num_evictable_hits = sum(1 for b in new_computed_blocks if b.ref_cnt == 0)
        if num_needed > self.block_pool.num_free_blocks - num_evictable_hits:
            return None

        if req_blocks is None:
            req_blocks = self.req_to_blocks[request.request_id] = []
        if new_computed_blocks:
            self.block_pool.touch(new_computed_blocks)
            req_blocks.extend(new_computed_blocks)
        new_blocks = self.block_pool.get_new_blocks(num_needed) if num_needed > 0 else []
        req_blocks.extend(new_blocks)

        if self.enable_caching:
            num_full_before = self.num_cached_blocks.get(request.request_id, 0)
            num_full_after = min(total_tokens // self.block_size, len(request.block_hashes))
            self.block_pool.cache_full_blocks(request, req_blocks, num_full_before, num_full_after)
            self.num_cached_blocks[request.request_id] = max(num_full_before, num_full_after)
        return new_blocks

    def free(self, request: Request) -> None:
        """Release the request's blocks, last block first (so it is evicted first)."""
        blocks = self.req_to_blocks.pop(request.request_id, None)
        self.num_cached_blocks.pop(request.request_id, None)
        if blocks:
            self.block_pool.free_blocks(reversed(blocks))

    def get_block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self.req_to_blocks.get(request_id, ())]

    def reset_prefix_cache(self) -> bool:
        return self.block_pool.reset_prefix_cache()
