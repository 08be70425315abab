"""Compressed boundary + window attention in XLA: O(T·(T/K + W)) instead of O(T²).

Query t attends to the two disjoint key sets of ``Visibility``, computed separately and
merged by log-sum-exp:
  * boundary part: the ~T/K boundary keys with b < t - W (gathered once per layer);
  * window part:   keys max(0, t-W) .. t, computed on query blocks of Q >= W tokens
                   that each see their own block and the one before (2Q keys).
In a packed row (documents starting at multiples of K) both parts drop keys before the
query's document, and a third part holds the document's first token once it has left the
window: one key per query, gathered at its document start.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.chunk_grid import ChunkGrid
from pallas_kernels.common import gather_boundaries
from pallas_kernels.documents import at_document_start
from pallas_kernels.visibility import Visibility


def _partial_attention(scores, mask, v, value_spec):
    """Unnormalised attention over one key set.

    Returns (acc, row_max, row_sum) with acc = sum_s exp(s - row_max) v_s; rows with
    no visible key give acc = 0, row_sum = 0, row_max = -inf.
    """
    scores = jnp.where(mask, scores, -jnp.inf)
    row_max = jax.lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True))
    safe_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    probs = jnp.where(mask, jnp.exp(scores - safe_max), 0.0)
    acc = jnp.einsum(value_spec, probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return acc, row_max, jnp.sum(probs, axis=-1, keepdims=True)


def window_block_size(window: int) -> int:
    """Query block of the window part: >= W so that two blocks cover every window."""
    return max(8, -(-window // 8) * 8)


def attention_compressed(q, k, v, *, grid: ChunkGrid, window: int, document_start=None):
    """Same contract as ``reference.attention_dense``."""
    kb, vb = gather_boundaries(grid, k, v)  # [B, NB, Hkv, D]
    documents = None
    if document_start is not None:
        documents = (at_document_start(k, document_start), at_document_start(v, document_start), document_start)
    # Q zero keys before position 0 (masked), so that every query block has a block before it.
    front = lambda a: jnp.pad(a, [(0, 0), (window_block_size(window), 0), (0, 0), (0, 0)])
    return attention_of_rows(q, front(k), front(v), (kb, vb), documents, grid=grid, window=window, row_offset=0)


def attention_of_rows(q, k, v, boundaries, documents, *, grid: ChunkGrid, window: int, row_offset):
    """Boundary + window attention of rows whose queries sit at ``row_offset`` + 0..T-1 of their
    sequence, with the boundary and document keys given: the body of ``attention_compressed``, and
    of a context shard's attention (its row is a slice of a longer sequence).

    Args:
      q: [R, T, H, D]; query t of row r is at position ``row_offset[r] + t`` (an int or [R]).
      grid: the layer's chunk grid (the positions of ``boundaries`` are on it).
      k, v: [R, Q + T, Hkv, D], Q = ``window_block_size(window)``: the keys at positions
        ``row_offset - Q`` .. ``row_offset + T - 1`` (the window part reads them; positions
        below 0 are masked).
      boundaries: (kb, vb [R, NB, Hkv, D]): the grid's first NB boundaries in arrival order
        (``kb[:, n]`` is the key at ``grid.position(n)``), NB at least those before the last
        query's window; a query sees those before its window (and after its document's first token).
      documents: None (every row is one sequence from position 0), or (kd, vd [R, T, Hkv, D],
        starts [R, T]): each query's document start and the key and value there, seen once
        the start has left the window.

    Returns:
      [R, T, H, D] in q.dtype.
    """
    b, t, h, d = q.shape
    hkv = k.shape[2]
    r = h // hkv
    f32 = jnp.float32
    scale = d**-0.5
    qg = q.reshape(b, t, hkv, r, d)
    vis = Visibility(grid, window)
    offset = jnp.asarray(row_offset, jnp.int32).reshape(-1, 1)  # [R or 1, 1]
    tpos = offset + jnp.arange(t)  # [R or 1, T]
    start = None if documents is None else documents[2][:, :, None]  # [R, T, 1]
    heads = lambda mask: mask[:, None, None]  # [R, ...] -> [R, 1, 1, ...]

    # Boundary keys strictly before each query's window (and after its document's first token).
    kb, vb = boundaries
    bpos = jnp.asarray(grid.position(np.arange(kb.shape[1])), jnp.int32)
    s_b = jnp.einsum("btkrd,bnkd->bkrtn", qg, kb, preferred_element_type=f32) * scale
    mask_b = vis.before_window(tpos[:, :, None], bpos.reshape(-1, 1, bpos.shape[-1]), start)  # [R, T, NB]
    parts = [_partial_attention(s_b, heads(mask_b), vb, "bkrtn,bnkd->bkrtd")]

    if documents is not None:
        # The document's first token, a boundary of its own grid.
        kd, vd = (a[:, :, None] for a in documents[:2])  # [R, T, 1, Hkv, D]
        s_d = jnp.einsum("btkrd,btnkd->bkrtn", qg, kd, preferred_element_type=f32) * scale
        mask_d = vis.document_key_visible(tpos[:, :, None], start)  # [R, T, 1]
        parts.append(_partial_attention(s_d, heads(mask_d), vd, "bkrtn,btnkd->bkrtd"))

    # Sliding window on blocks of Q queries: block i sees the Q keys before it and its own.
    qb = window_block_size(window)
    if k.shape[1] != qb + t:
        raise ValueError(f"attention_of_rows: k must hold the {qb} keys before the queries and one per query")
    nblk = -(-t // qb)
    pad = nblk * qb - t
    padt = lambda a: jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))
    qw = padt(qg).reshape(b, nblk, qb, hkv, r, d)
    kw, vw = (padt(a).reshape(b, nblk + 1, qb, hkv, d) for a in (k, v))
    kw2 = jnp.concatenate([kw[:, :-1], kw[:, 1:]], axis=2)  # [R, NBLK, 2Q, Hkv, D]
    vw2 = jnp.concatenate([vw[:, :-1], vw[:, 1:]], axis=2)
    s_w = jnp.einsum("bnqkrd,bnskd->bkrnqs", qw, kw2, preferred_element_type=f32) * scale
    local = jnp.arange(nblk * qb).reshape(nblk, qb)
    qpos = offset[:, :, None, None] + local[None, :, :, None]  # [R or 1, NBLK, Q, 1]
    kpos = qpos[:, :, :1, :] - qb + jnp.arange(2 * qb)  # [R or 1, NBLK, 1, 2Q]
    start_w = None if start is None else padt(start).reshape(b, nblk, qb, 1)
    mask_w = vis.window_visible(qpos, kpos, start_w) & (kpos >= 0)  # [R or 1, NBLK, Q, 2Q]
    acc_w, max_w, sum_w = _partial_attention(s_w, heads(mask_w), vw2, "bkrnqs,bnskd->bkrnqd")
    unblock = lambda a: a.reshape(a.shape[:3] + (nblk * qb,) + a.shape[5:])[:, :, :, :t]
    parts.append((unblock(acc_w), unblock(max_w), unblock(sum_w)))

    # Log-sum-exp merge; the window part always holds key t, so its max is finite.
    m = functools.reduce(jnp.maximum, [row_max for _, row_max, _ in parts])
    weights = [jnp.exp(row_max - m) for _, row_max, _ in parts]
    num = sum(acc * w for (acc, _, _), w in zip(parts, weights))
    den = sum(row_sum * w for (_, _, row_sum), w in zip(parts, weights))
    out = num / den  # [R, Hkv, H/Hkv, T, D]
    return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(b, t, h, d).astype(q.dtype)
