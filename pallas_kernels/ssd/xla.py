"""Fast XLA paths for the chunk-reset SSD core.

``associative``: ``jax.lax.associative_scan`` over (decay, input) pairs with the
decay zeroed at chunk starts; any reset pattern, O(T log T) work, materialises the
[B, T, H, P, N] state.

``chunked``: fixed grid only. Lays the sequence out as independent K-token chunks
(see ``chunk_grid.ChunkLayout``) and computes each chunk in SSD "quadratic" form, one masked
matmul per chunk and no scan at all:

    y_i = sum_{r_i <= j <= i} (C_i · B_j) * exp(cum_i - cum_j) * dt_j * x_j + D * x_i,
    cum = cumsum(dt * A) within the chunk,

where r_i is the chunk's first token, or, in a packed row whose documents start at multiples
of K, the first token of i's chunk in its document (``ChunkGrid.chunk_start_in_document``),
which lies inside the same row chunk.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.chunk_grid import ChunkGrid
from pallas_kernels.ssd.reference import expand_groups


def ssd_associative(x, dt, A, B, C, D, reset):
    """Same contract as ``reference.ssd_sequential`` (returns y only)."""
    h = x.shape[2]
    f32 = jnp.float32
    decay = jnp.exp(dt.astype(f32) * A.astype(f32)) * (1.0 - reset.astype(f32))[..., None]
    # [B, T, H, P, N] input to the state
    u = (dt.astype(f32)[..., None] * x.astype(f32))[..., None] * expand_groups(B, h).astype(f32)[:, :, :, None, :]

    def combine(left, right):
        a_l, u_l = left
        a_r, u_r = right
        return a_l * a_r, a_r[..., None, None] * u_l + u_r

    _, states = jax.lax.associative_scan(combine, (decay, u), axis=1)
    y = jnp.einsum("bthpn,bthn->bthp", states, expand_groups(C, h).astype(f32))
    y = y + D.astype(f32)[:, None] * x.astype(f32)
    return y.astype(x.dtype)


def ssd_chunked(x, dt, A, B, C, D, *, grid: ChunkGrid, document_start=None):
    """Fixed-grid SSD: one masked [K, K] matmul per chunk and head."""
    b, t, h, p = x.shape
    g = B.shape[2]
    r = h // g
    k = grid.token_chunk
    f32 = jnp.float32
    layout = grid.chunk_layout(t)
    xc = layout.to_chunks(x.astype(f32)).reshape(b, -1, k, g, r, p)  # [B, C, K, G, R, P]
    dtc = layout.to_chunks(dt.astype(f32)).reshape(b, -1, k, g, r)  # [B, C, K, G, R]
    Bc = layout.to_chunks(B)  # [B, C, K, G, N]
    Cc = layout.to_chunks(C)
    dta = dtc * A.astype(f32).reshape(g, r)  # [B, C, K, G, R]
    if document_start is None:
        cum = jnp.cumsum(dta, axis=2)
    else:
        # A chunk holds at most two documents (they start at multiples of K): the one starting in
        # it and the one before. Each gets its own cumsum, so no value of one enters the other's
        # decays, not even as rounding.
        starts = layout.to_chunks(document_start)  # [B, C, K]
        late = (starts == jnp.max(starts, axis=2, keepdims=True))[..., None, None]
        cum = jnp.where(late, jnp.cumsum(jnp.where(late, dta, 0), axis=2), jnp.cumsum(jnp.where(late, 0, dta), axis=2))
    seg = cum[:, :, :, None] - cum[:, :, None, :]  # [B, C, Ki, Kj, G, R]
    causal = jnp.tril(jnp.ones((k, k), bool))[None, None, :, :, None, None]
    if document_start is not None:
        # j counts for i only from the start of i's chunk in its document; a padding slot of the
        # layout sees nothing (its decays could overflow, and 0 * inf in the backward is nan).
        pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        restart = layout.to_chunks(grid.chunk_start_in_document(pos, document_start))  # [B, C, K]
        real = layout.to_chunks(jnp.ones((b, t), bool))
        since = (layout.to_chunks(pos)[:, :, None, :] >= restart[:, :, :, None]) & real[:, :, :, None]
        causal = causal & since[..., None, None]
    decay = jnp.exp(jnp.where(causal, seg, -jnp.inf))
    cb = jnp.einsum("bcign,bcjgn->bcijg", Cc, Bc, preferred_element_type=f32)  # [B, C, Ki, Kj, G]
    weights = cb[..., None] * decay * dtc[:, :, None]  # [B, C, Ki, Kj, G, R]
    y = jnp.einsum("bcijgr,bcjgrp->bcigrp", weights, xc)  # [B, C, K, G, R, P]
    y = layout.from_chunks(y.reshape(b, -1, k, h, p))
    y = y + D.astype(f32)[:, None] * x.astype(f32)
    return y.astype(x.dtype)
