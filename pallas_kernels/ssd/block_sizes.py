"""Tile sizes and launch settings of the SSD Pallas kernels, and their defaults.

The defaults are the fastest settings of the sweeps recorded in BENCHMARKS.md ("Default tile
sizes and launch settings"); they are constants, not tuned per call.
"""

from __future__ import annotations

import dataclasses
import math

from pallas_kernels.common import next_pow2


@dataclasses.dataclass(frozen=True)
class GpuPass:
    """How one GPU kernel (the forward or the backward) runs its programs."""

    num_warps: int = 4
    tiles: int = 1  # consecutive tiles each program runs, in a loop
    heads_ahead: int = 1  # heads whose inputs a program loads before computing any of them (the
    # backward loops over such runs of heads; the forward unrolls them)
    num_stages: int = 1  # Triton's software-pipelining depth of the pass's loops: the loop over
    # tiles, and the backward's loop over runs of heads (its loads of the next heads issued while
    # this one computes, into shared memory rather than registers)

    def __post_init__(self):
        for name in ("num_warps", "tiles", "heads_ahead", "num_stages"):
            if getattr(self, name) < 1:
                raise ValueError(f"GpuPass.{name} must be >= 1, got {getattr(self, name)}")


@dataclasses.dataclass(frozen=True)
class GpuBlocks:
    """The GPU kernels' tile (``block_len`` tokens: a power of two >= max(16, K)) and launches."""

    block_len: int
    fwd: GpuPass = GpuPass()
    bwd: GpuPass = GpuPass()

    def __post_init__(self):
        if self.fwd.num_stages > 1 and self.fwd.tiles == 1:
            raise ValueError(
                f"GpuBlocks.fwd.num_stages={self.fwd.num_stages} pipelines the forward's loop over tiles, "
                "its only loop: it needs fwd.tiles > 1"
            )

    def check(self, token_chunk: int):
        if self.block_len < max(16, token_chunk) or self.block_len & (self.block_len - 1):
            raise ValueError(
                f"ssd pallas_gpu: block_len ({self.block_len}) must be a power of two >= max(16, K={token_chunk})"
            )


@dataclasses.dataclass(frozen=True)
class TpuBlocks:
    """The TPU kernels' block: ``block_len`` tokens, a multiple of 8 and of K."""

    block_len: int

    def check(self, token_chunk: int):
        if self.block_len % token_chunk or self.block_len % 8:
            raise ValueError(
                f"ssd pallas_tpu: block_len ({self.block_len}) must be a multiple of 8 and of K ({token_chunk})"
            )


def default_gpu_blocks(token_chunk: int) -> GpuBlocks:
    """16-token tiles (the smallest the tensor cores take), or K if longer; the forward runs 2
    tiles per program in a 2-stage pipelined loop and loads 2 heads ahead, the backward 1 tile and
    its heads one at a time, in a loop."""
    return GpuBlocks(
        block_len=max(16, next_pow2(token_chunk)),
        fwd=GpuPass(num_warps=2, tiles=2, heads_ahead=2, num_stages=2),
        bwd=GpuPass(num_warps=1, heads_ahead=1),
    )


def default_tpu_blocks(token_chunk: int) -> TpuBlocks:
    """128 tokens (one MXU pass, one lane row of dt), or the least multiple of K and 128."""
    return TpuBlocks(block_len=math.lcm(token_chunk, 128))
