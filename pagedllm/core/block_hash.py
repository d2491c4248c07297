"""Chained content hashes of full KV-cache blocks, the keys of the prefix cache.

A block's hash covers its parent's hash, its token ids and optional extra keys, so equal
hashes mean equal whole prefixes. SHA-256 is used (not Python's `hash()`): users choose the
token ids, and a forgeable collision would let one request read another's KV cache.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from typing import Any, NewType

import msgspec

BlockHash = NewType("BlockHash", bytes)

# Parent of the first block of every sequence.
ROOT_BLOCK_HASH = BlockHash(hashlib.sha256(b"pagedllm/prefix-cache/root/v1").digest())

_NO_EXTRA = b"\x00"
_HAS_EXTRA = b"\x01"


def hash_block_tokens(
    parent_hash: BlockHash | None,
    token_ids: Sequence[int],
    extra_keys: tuple[Any, ...] | None = None,
) -> BlockHash:
    """Hash of one block: sha256(parent || token count || tokens as int64 LE || extra keys).

    `parent_hash=None` means the block is the first of its sequence. `extra_keys` must be
    msgpack-encodable (e.g. adapter names, multimodal content hashes).
    """
    h = hashlib.sha256()
    h.update(ROOT_BLOCK_HASH if parent_hash is None else parent_hash)
    n = len(token_ids)
    h.update(struct.pack("<I", n))
    h.update(struct.pack(f"<{n}q", *token_ids))
    if extra_keys:
        h.update(_HAS_EXTRA)
        h.update(msgspec.msgpack.encode(extra_keys))
    else:
        h.update(_NO_EXTRA)
    return BlockHash(h.digest())


def compute_block_hashes(
    token_ids: Sequence[int],
    block_size: int,
    start_hashes: Sequence[BlockHash] = (),
    extra_keys: tuple[Any, ...] | None = None,
) -> list[BlockHash]:
    """Chain hashes of every full block of `token_ids`.

    `start_hashes` are the hashes already known for the first blocks (they are trusted, not
    recomputed); only the blocks after them are hashed. Returns a new list:
    `list(start_hashes) + hashes of the newly full blocks`. A trailing partial block has no hash.
    """
    hashes = list(start_hashes)
    num_full = len(token_ids) // block_size
    parent = hashes[-1] if hashes else None
    for i in range(len(hashes), num_full):
        parent = hash_block_tokens(
            parent, token_ids[i * block_size : (i + 1) * block_size], extra_keys
        )
        hashes.append(parent)
    return hashes
