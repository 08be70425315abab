"""Tile sizes of the SSD Pallas kernels, by chunk length K."""

from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class GpuPass:
    """How one GPU kernel (the forward or the backward) runs its programs."""

    num_warps: int = 4
    tiles: int = 1  # consecutive tiles each program runs, in a loop
    heads_ahead: int = 1  # heads whose inputs a program loads before computing any of them
    num_stages: int = 1  # Triton's software-pipelining depth of the loop over tiles (needs tiles > 1)

    def __post_init__(self):
        for name in ("num_warps", "tiles", "heads_ahead", "num_stages"):
            if getattr(self, name) < 1:
                raise ValueError(f"GpuPass.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_stages > 1 and self.tiles == 1:
            raise ValueError(f"GpuPass.num_stages={self.num_stages} pipelines the loop over tiles: it needs tiles > 1")


@dataclasses.dataclass(frozen=True)
class SsdBlocks:
    block_len: int  # tokens per tile (a power of two >= K)
    fwd: GpuPass = GpuPass()  # GPU only
    bwd: GpuPass = GpuPass()  # GPU only


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def ssd_gpu_blocks(token_chunk: int, head_dim: int, dtype) -> SsdBlocks:
    """GPU tile: the smallest the tensor cores take (16 tokens), or K. Each program keeps
    several [L, L] float32 tiles per head live, so larger tiles presumably cost registers and
    occupancy (not profiled). On the H200 at 16×1024, H=16, G=2, K=8, bf16 (BENCHMARKS.md),
    16-token tiles took half the forward+backward time of 32-token ones (0.11-0.13 vs
    0.26-0.38 ms); there, between 1, 2 and 4 warps, and 1, 2 or 4 tiles per program in an
    unpipelined loop, the differences stayed within run-to-run noise. Loading two heads'
    inputs before computing either took the forward at 4×32768 from 0.161 to 0.139 ms
    (forward+backward 0.627 to 0.604 ms; two runs each); four or eight heads at once, or
    programs of fewer heads than a group, were slower. A loop over tiles per forward program
    that Triton pipelines two stages deep helps long rows and costs short ones: in kernel
    time (profiler), 2 tiles per program against 4 took 0.059 against 0.061 ms at 4×32768
    with H=8, G=1 (two runs) and 0.112 against 0.113 ms with H=16, G=2, and 0.012 against
    0.017 ms (H=8) and 0.019 against 0.022 ms (H=16) at 16×1024, where fewer, longer
    programs leave SMs idle (8 tiles: 0.023-0.033 ms); one unpipelined tile was as fast or faster at
    16×1024 but 11% slower at 4×32768 with H=16. The same loop slowed the backward
    (0.02-0.05 ms more at 4×32768)."""
    del head_dim, dtype
    return SsdBlocks(
        block_len=max(16, next_pow2(token_chunk)),
        fwd=GpuPass(num_warps=2, tiles=2, heads_ahead=2, num_stages=2),
        bwd=GpuPass(num_warps=1, heads_ahead=2),
    )


def ssd_tpu_blocks(token_chunk: int) -> SsdBlocks:
    """TPU tile: 128 tokens (one MXU pass, one lane row of dt), or the least multiple of K and 128."""
    return SsdBlocks(block_len=math.lcm(token_chunk, 128))
