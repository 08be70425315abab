"""The ground truth: full [T, T] masked softmax attention under the Attamba mask."""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels.chunk_grid import ChunkGrid
from pallas_kernels.masked_attention import masked_attention
from pallas_kernels.visibility import Visibility


def attention_dense(q, k, v, *, grid: ChunkGrid, window: int, document_start=None):
    """Boundary + window attention through the dense [T, T] mask (``Visibility.dense``); with
    ``document_start`` [B, T] each query reads the rule in its own document (any layout)."""
    vis = Visibility(grid, window)
    if document_start is None:
        return masked_attention(q, k, v, jnp.asarray(vis.dense(q.shape[1])))
    return masked_attention(q, k, v, vis.dense(q.shape[1], document_start)[:, None, None])
