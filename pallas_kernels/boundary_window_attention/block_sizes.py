"""Tile sizes of the boundary + window attention kernels, and their defaults.

The defaults are the fastest tiles of the sweeps recorded in BENCHMARKS.md ("Default tile sizes
and launch settings"); they are constants, not tuned per call.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class GpuBlocks:
    """Query / key tile lengths of the GPU kernels (powers of two >= 16) and their launches."""

    block_q: int = 64  # forward and dq: queries per program
    block_kb: int = 64  # forward and dq: boundary keys per step
    block_kw: int = 64  # forward and dq: window keys per step
    block_q_bwd: int = 64  # dk/dv: queries per step
    block_kb_bwd: int = 64  # dk/dv: boundary keys per program
    block_kw_bwd: int = 64  # dk/dv: window keys per program
    num_warps: int = 4
    num_warps_bwd: int = 4
    num_stages: int = 3
    dkv_query_splits: int = 0  # shares of the boundary dk/dv query walk (0: chosen by size)


@dataclasses.dataclass(frozen=True)
class TpuBlocks:
    """Tile lengths of the TPU kernels (multiples of 8): queries per program and keys per step of
    both key streams, forward and backward."""

    block_q: int = 128  # one MXU pass per matmul
    block_k: int = 128
