"""The ground truth: full [T, T] masked softmax attention under the Attamba mask."""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels.chunk_grid import ChunkGrid
from pallas_kernels.masked_attention import masked_attention
from pallas_kernels.visibility import Visibility


def attention_dense(q, k, v, *, grid: ChunkGrid, window: int):
    """Boundary + window attention through the dense [T, T] mask (``Visibility.dense``)."""
    return masked_attention(q, k, v, jnp.asarray(Visibility(grid, window).dense(q.shape[1])))
