"""Chained block hashing and Request bookkeeping."""

from __future__ import annotations

from pagedllm.core.block_hash import ROOT_BLOCK_HASH, compute_block_hashes, hash_block_tokens
from pagedllm.core.request import Request, RequestStatus
from pagedllm.engine.protocol import EngineCoreRequest, FinishReason
from pagedllm.sampling_params import SamplingParams


def test_hash_is_sha256_chain_and_deterministic() -> None:
    h1 = hash_block_tokens(None, [1, 2, 3, 4])
    assert isinstance(h1, bytes) and len(h1) == 32
    assert h1 == hash_block_tokens(None, [1, 2, 3, 4])
    assert h1 == hash_block_tokens(ROOT_BLOCK_HASH, [1, 2, 3, 4])
    assert h1 != hash_block_tokens(None, [1, 2, 3, 5])
    h2 = hash_block_tokens(h1, [5, 6, 7, 8])
    # Same tokens under another parent hash differently.
    assert h2 != hash_block_tokens(None, [5, 6, 7, 8])
    assert hash_block_tokens(None, [1, 2], ("lora-a",)) != hash_block_tokens(None, [1, 2])
    assert hash_block_tokens(None, [1, 2], ("a",)) != hash_block_tokens(None, [1, 2], ("b",))
    # Token boundaries are unambiguous.
    assert hash_block_tokens(None, [256]) != hash_block_tokens(None, [0, 1])


def test_compute_block_hashes_full_blocks_only_and_incremental() -> None:
    toks = list(range(10))
    hashes = compute_block_hashes(toks, 4)
    assert len(hashes) == 2
    assert hashes[0] == hash_block_tokens(None, [0, 1, 2, 3])
    assert hashes[1] == hash_block_tokens(hashes[0], [4, 5, 6, 7])
    more = toks + [10, 11, 12]
    extended = compute_block_hashes(more, 4, hashes)
    assert extended[:2] == hashes and len(extended) == 3
    assert extended == compute_block_hashes(more, 4)
    assert hashes is not extended and len(hashes) == 2


def test_request_fields_and_hash_extension() -> None:
    sp = SamplingParams(max_tokens=7)
    req = Request("r", [1, 2, 3, 4, 5, 6], sp, eos_token_id=2, arrival_time=0.0, block_size=4)
    assert req.num_tokens == 6 and req.num_prompt_tokens == 6 and req.num_output_tokens == 0
    assert (
        req.max_tokens == 7 and req.num_cached_tokens == -1 and req.status == RequestStatus.WAITING
    )
    assert len(req.block_hashes) == 1
    req.append_output_token_ids([7, 8])
    assert req.all_token_ids == [1, 2, 3, 4, 5, 6, 7, 8] and req.output_token_ids == [7, 8]
    assert req.block_hashes == compute_block_hashes(req.all_token_ids, 4)
    req.append_output_token_ids(9)
    assert req.num_output_tokens == 3 and len(req.block_hashes) == 2


def test_status_finish_reasons() -> None:
    assert not RequestStatus.PREEMPTED.is_finished and RequestStatus.FINISHED_ABORTED.is_finished
    assert RequestStatus.RUNNING.finish_reason is None
    assert RequestStatus.FINISHED_STOPPED.finish_reason == FinishReason.STOP
    assert RequestStatus.FINISHED_LENGTH_CAPPED.finish_reason == FinishReason.LENGTH
    assert RequestStatus.FINISHED_ABORTED.finish_reason == FinishReason.ABORT


def test_from_engine_core_request_and_pooling() -> None:
    ecr = EngineCoreRequest("e", [5] * 20, None, None, 1.5, pooling=True)
    req = Request.from_engine_core_request(ecr, block_size=8)
    assert req.pooling and req.max_tokens == 1 and req.arrival_time == 1.5
    assert len(req.block_hashes) == 2
