"""Start-up check that the KV cache fits: the largest context and the flags that help."""

import pytest

from pagedllm.worker.kv_cache_sizing import MemoryBudget, check_kv_cache_fits

GIB = 1 << 30


def _budget(quantization=None, kv_cache_dtype="auto") -> MemoryBudget:
    return MemoryBudget(total=80 * GIB, gpu_memory_utilization=0.9, weights=60 * GIB,
                        activation_peak=2 * GIB, other=GIB, quantization=quantization,
                        kv_cache_dtype=kv_cache_dtype)


def test_blocks_when_one_request_fits():
    assert check_kv_cache_fits(_budget(), 10 * GIB, 2 << 20, 16, 32768) == 5120


def test_too_short_cache_names_the_largest_context_and_flags():
    # 1000 blocks of 16 tokens = 16000 tokens < 32768.
    with pytest.raises(ValueError) as e:
        check_kv_cache_fits(_budget(), 1000 * (2 << 20), 2 << 20, 16, 32768)
    msg = str(e.value)
    assert "largest context that fits is 16000 tokens (--max-model-len 16000)" in msg
    assert "max_model_len=32768 needs 4.00 GiB" in msg
    for flag in ("--quantization fp8", "--kv-cache-dtype fp8", "--gpu-memory-utilization",
                 "--max-model-len", "--tensor-parallel-size"):
        assert flag in msg


def test_no_room_at_all_and_no_repeat_of_flags_in_use():
    with pytest.raises(ValueError, match=r"does not fit: weights 60\.00 GiB \(fp8\)") as e:
        check_kv_cache_fits(_budget("fp8", "fp8"), 0, 2 << 20, 16, 4096)
    assert "--quantization" not in str(e.value) and "--kv-cache-dtype" not in str(e.value)
    assert "--max-num-batched-tokens" in str(e.value)


def test_sliding_window_groups_count_their_bounded_need():
    """Gemma-3-4b's groups (a full one + six of window 1024), chunks of 2048: a 32k request
    holds at most 2048 + 6 x (ceil((1023 + 2048) / 16) + 1) blocks (+ the null one), so 3207
    blocks of 5 layers fit it; 3000 do not, and the message names the largest context that
    fits those."""
    from pagedllm.core.kv_cache_groups import build_kv_cache_spec
    from pagedllm.worker.kv_cache_layout import KVCacheLayout

    spec = build_kv_cache_spec([None if i % 6 == 5 else 1024 for i in range(34)], 32768)
    layout = KVCacheLayout(spec, 16, 2048)
    assert layout.blocks_for(32768) == 2048 + 6 * 193 + 1
    per_block = 5 << 20
    assert check_kv_cache_fits(_budget(), 3207 * per_block, per_block, 16, 32768,
                               layout.blocks_for) == 3207  # fmt: skip
    with pytest.raises(ValueError) as e:
        check_kv_cache_fits(_budget(), 3000 * per_block, per_block, 16, 32768, layout.blocks_for)
    fits = int(str(e.value).split("largest context that fits is ")[1].split()[0])
    assert layout.blocks_for(fits) <= 3000 < layout.blocks_for(fits + 1)
    assert layout.max_concurrency(3207 * 4, 32768) == pytest.approx((3207 * 4 - 1) / 3206)
