"""Rounding to the fp8 e4m3 grid inside Triton kernels (KV-cache writes, activation
quantization)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def round_to_e4m3_grid(y):
    """Rounds fp32 values in [-448, 448] to the nearest e4m3 value (ties to even), in fp32.

    The cast that follows is then exact. Triton's interpreter mis-rounds fp32 -> e4m3 casts
    whose mantissa carry reaches the next power of two (124.2 -> 64); rounding here keeps the
    kernel bit-exact with torch on every backend at the cost of a few ALU ops in a kernel
    bound by memory.
    """
    bits = y.to(tl.int32, bitcast=True)
    exponent = tl.maximum(((bits >> 23) & 0xFF) - 127, -6)  # subnormals share 2^-6's step
    step = ((exponent - 3 + 127) << 23).to(tl.float32, bitcast=True)  # 3 mantissa bits
    # Adding and removing 1.5 * 2^23 rounds |v| < 2^22 to an integer, ties to even.
    return ((y / step + 12582912.0) - 12582912.0) * step
