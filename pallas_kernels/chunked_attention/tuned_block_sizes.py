"""Tile sizes of the chunked-attention Pallas kernels."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class AttentionBlocks:
    """Query / key tile lengths (powers of two >= 16 on GPU, multiples of 8 on TPU)."""

    block_q: int = 64  # forward and dq: queries per program
    block_kb: int = 64  # forward and dq: boundary keys per step
    block_kw: int = 64  # forward and dq: window keys per step
    block_q_bwd: int = 64  # dk/dv: queries per step
    block_kb_bwd: int = 64  # dk/dv: boundary keys per program
    block_kw_bwd: int = 64  # dk/dv: window keys per program
    num_warps: int = 4  # GPU only
    num_warps_bwd: int = 4
    num_stages: int = 3
    dkv_query_splits: int = 0  # GPU only: shares of the boundary dk/dv query walk (0: chosen by size)


def attention_gpu_blocks(token_chunk: int, window: int, head_dim: int) -> AttentionBlocks:
    """The defaults: the best forward and backward tiles of the H200 sweep at L=64k, K=8, D=64
    (``bench_attention.py --sweep 65536,8``; BENCHMARKS.md)."""
    del token_chunk, window, head_dim
    return AttentionBlocks()


def attention_tpu_blocks(token_chunk: int, window: int, head_dim: int) -> AttentionBlocks:
    """128-row tiles: one MXU pass per matmul. The TPU kernels read only ``block_q`` (queries per
    program, forward and backward) and ``block_kb`` (keys per step of both streams, forward and
    backward); the other fields are the GPU kernels'."""
    del token_chunk, window, head_dim
    return AttentionBlocks(block_q=128, block_kb=128)
