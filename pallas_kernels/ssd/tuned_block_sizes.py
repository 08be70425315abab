"""Tile sizes of the SSD Pallas kernels, by chunk length K."""

from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class SsdBlocks:
    block_len: int  # tokens per tile (a power of two >= K)
    num_warps: int = 4  # GPU only


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def ssd_gpu_blocks(token_chunk: int, head_dim: int, dtype) -> SsdBlocks:
    """GPU tile: the [L, L] decay tile costs L exponentials per token and head, so L stays
    small. On the H200 at 8×8192, K=8, bf16 (BENCHMARKS.md), L=32 with 2 warps beat
    L=32/4 warps, 64/4, 64/8 and 128/8, forward and backward."""
    del head_dim, dtype
    return SsdBlocks(block_len=max(32, _next_pow2(token_chunk)), num_warps=2)


def ssd_tpu_blocks(token_chunk: int) -> SsdBlocks:
    """TPU tile: 128 tokens (one MXU pass, one lane row of dt), or the least multiple of K and 128."""
    return SsdBlocks(block_len=math.lcm(token_chunk, 128))
