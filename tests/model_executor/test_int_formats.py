"""GPTQ / AWQ bit layouts: the tests' packers (from the published formats) against a
bit-by-bit reader and hand-worked words, then pagedllm's `packed_int` against both."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pagedllm.model_executor.layers.quantization.awq import unpack_awq
from pagedllm.model_executor.layers.quantization.packed_int import (
    dequantize,
    pack_int32,
    unpack_int32,
)
from tests.model_executor.quant_formats import (
    awq_bit_unpack,
    awq_pack,
    bit_stream_unpack,
    gptq_pack,
)


def _u32(x: np.ndarray) -> list[int]:
    return [int(v) for v in x.view(np.uint32).ravel()]


def test_hand_worked_words() -> None:
    # GPTQ 4-bit: input rows 0..7 of a column in ascending nibbles.
    assert _u32(gptq_pack(np.arange(8).reshape(8, 1), 4)) == [0x76543210]
    # GPTQ 8-bit: four bytes, row 0 lowest.
    assert _u32(gptq_pack(np.array([[1], [2], [3], [0xFF]]), 8)) == [0xFF030201]
    # AWQ: nibble i holds column (0, 2, 4, 6, 1, 3, 5, 7)[i] of the run of 8.
    assert _u32(awq_pack(np.arange(8).reshape(1, 8))) == [0x75316420]
    # GPTQ 3-bit: 32 values per 3 words; value 10 straddles words 0|1 (2 low bits at 30..31),
    # value 21 words 1|2 (its low bit at bit 31 of word 1).
    vals = np.zeros((32, 1), dtype=np.int64)
    vals[10], vals[21], vals[0], vals[31] = 0b101, 0b011, 0b111, 0b110
    w0, w1, w2 = _u32(gptq_pack(vals, 3))
    assert w0 == (0b01 << 30) | 0b111
    assert w1 == 0b1 | (0b1 << 31)
    assert w2 == 0b01 | (0b110 << 29)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_gptq_packer_vs_bit_reader_and_library(bits: int) -> None:
    rng = np.random.default_rng(bits)
    values = rng.integers(0, 2**bits, size=(64, 5))
    packed = gptq_pack(values, bits)
    assert packed.shape == (64 * bits // 32, 5) and packed.dtype == np.int32
    np.testing.assert_array_equal(bit_stream_unpack(packed, bits, 64), values)
    lib = unpack_int32(torch.from_numpy(packed), bits, 0, 64)
    np.testing.assert_array_equal(lib.numpy(), values)
    np.testing.assert_array_equal(pack_int32(torch.from_numpy(values), bits, 0).numpy(), packed)
    # Along dim 1 (GPTQ qzeros).
    np.testing.assert_array_equal(
        unpack_int32(torch.from_numpy(packed.T.copy()), bits, 1, 64).numpy(), values.T)


def test_awq_packer_vs_bit_reader_and_library() -> None:
    values = np.random.default_rng(0).integers(0, 16, size=(6, 24))
    packed = awq_pack(values)
    np.testing.assert_array_equal(awq_bit_unpack(packed, 24), values)
    np.testing.assert_array_equal(unpack_awq(torch.from_numpy(packed), 24).numpy(), values)


def test_dequantize_with_act_order_groups() -> None:
    q = torch.tensor([[1, 15], [2, 0], [3, 7], [4, 8]])  # [K=4, N=2]
    zeros = torch.tensor([[8.0, 8.0], [1.0, 2.0]])
    scales = torch.tensor([[0.5, 1.0], [2.0, 0.25]])
    g_idx = torch.tensor([1, 0, 1, 0])
    w = dequantize(pack_int32(q, 8, 0), zeros, scales, 8, 2, g_idx)
    expected = torch.tensor([[0.0, 3.25], [-3.0, -8.0], [4.0, 1.25], [-2.0, 0.0]])
    assert torch.equal(w, expected)


def test_pack_refuses_out_of_range_and_ragged() -> None:
    with pytest.raises(ValueError, match="unsigned 4-bit"):
        pack_int32(torch.tensor([[16]] * 8), 4, 0)
    with pytest.raises(ValueError, match="multiple of 32"):
        pack_int32(torch.zeros(16, 1, dtype=torch.int64), 3, 0)
