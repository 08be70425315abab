"""Boundary + window attention as Pallas kernels for GPUs (Triton lowering).

Forward: one program per (query block of BQ tokens, batch row, query head). It runs
one online softmax over two key streams and nothing else:
  1. the gathered boundary keys ``kb = k[:, boundaries]`` (~T/K rows). Boundary n is
     visible to query t iff ``pos(n) < t - W``; blocks visible to the whole query
     block run unmasked, the few straddling ``t - W`` run masked, the rest are
     never loaded;
  2. the window keys ``[q0 - W, q0 + BQ)``, masked by ``t - W <= s <= t``.
The two sets are disjoint, so the result is exactly softmax over the Attamba mask.

Backward (FlashAttention-2 style, from the saved log-sum-exp): dq walks the same
two streams as the forward; dk/dv come from two kernels, one per key kind: each
boundary-key block walks the queries that see it (t > pos(n) + W, to the end; on long
rows that walk is cut into equal shares run by separate programs and summed), and
each window-key block the BK + W queries after it. The boundary part is added into
dk/dv at the boundary positions.

Packed documents (``document_start``, documents at multiples of K): every query of a
block whose document starts before the block shares that document's start d (the block's
first query's); documents that start inside the block start inside its window walk. So:
  * the boundary walk starts at the document's first boundary, ``first_boundary(d)``:
    blocks of earlier documents are never loaded; masks add ``pos(n) > d_t`` (blocks
    stay unmasked only where no document starts inside the query block);
  * the window walk starts at ``max(q0 - W, d)``; masks add ``s >= d_t``;
  * the document's first token (visible once it has left the window): for the block's
    first document one row ``k[d]``, ``v[d]`` loaded once per program and taken into the
    softmax state before the walk (a row-wise dot, no tile); for documents that start
    inside the block it is in the window walk's range, one more term of the window mask.
In the backward, dq takes the same terms; the dq pass also sums, per query block and
head, the first-token term's dk, dv over the block's first document, and the window
dk/dv program of the key block holding that token adds those sums (one small one-hot
matmul per 16 query blocks); its window mask takes the first tokens of documents that
start inside a query block. The boundary dk/dv walk stops at the end of the last
document holding the block's boundaries and is unmasked only where every query sees
every key. Walk ends that depend on the layout come from ``documents.next_starts``.
With ``document_start=None`` none of this is traced: the kernels are the ones above.

Rows that are slices of longer sequences (``attention_of_rows_pallas_gpu``: a context shard's
pieces) run the packed-documents kernels with three changes, and nothing else traced: each row's
queries sit at its offset (a scalar per row; every walk bound is computed in positions and every
load translated into the row), k and v hold ``key_lead`` >= W keys before the queries, and the
boundary keys and each query's document-first key come in as inputs instead of being read from
k and v. The backward returns their gradients (the dq pass's first-token sums become those of the
given document keys); keys before position 0 are never seen.

Logits are taken in base 2 (scale·log2 e folded in) so the softmax uses exp2.
Matmuls run on tensor cores in the input dtype (bf16) with float32 accumulation;
float32 inputs use exact float32 matmuls.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import poison as poisoned
from pallas_kernels.boundary_window_attention.block_sizes import GpuBlocks
from pallas_kernels.boundary_window_attention.flash_vjp import flash_vjp
from pallas_kernels.chunk_grid import ChunkGrid
from pallas_kernels.common import (
    add_at_boundaries,
    dot,
    gather_boundaries,
    index,
    iota,
    matmul_precision,
    next_pow2,
    triton_params,
)
from pallas_kernels.documents import next_starts
from pallas_kernels.visibility import Visibility

_NEG = -1e30  # finite "minus infinity": keeps (masked - max) free of inf - inf
_LOG2E = math.log2(math.e)
_NO_KEY = -(2**30)


@dataclasses.dataclass(frozen=True)
class _Static:
    """Everything the kernels specialise on (hashable: a custom_vjp static argument)."""

    length: int  # T
    num_boundaries: int  # NB
    vis: Visibility  # the grid and W
    head_dim: int  # D (padded)
    scale: float  # 1/sqrt(D) of the unpadded head dim
    blocks: GpuBlocks
    precision: jax.lax.Precision | None  # exact float32 matmuls for float32 inputs
    poison: bool = False  # every kernel output starts as NaN (``pallas_kernels.poison``)
    documents: bool = False  # packed rows: the kernels take the [T] document starts of their row
    # Rows that are slices of longer sequences (``attention_of_rows``; needs ``documents``): each row's
    # queries start at its offset, k, v hold ``key_lead`` keys before them, and the boundary keys and
    # each query's document-first key come in as inputs.
    rows: bool = False
    key_lead: int = 0

    @property
    def keys(self) -> int:  # key rows of k, v
        return self.key_lead + self.length

    @property
    def layout_refs(self) -> int:
        """Refs after kb, vb that the forward and dq kernels take for the layout: doc (and off, kd, vd)."""
        return (4 if self.rows else 1) if self.documents else 0

    @property
    def qk_scale(self) -> float:
        return self.scale * _LOG2E


def _load_rows(ref, start, size, limit):
    """Rows [start, start + size) of a [rows, D] ref, zero past ``limit``."""
    rows = start + iota(size)
    return plgpu.load(ref.at[pl.ds(start, size), :], mask=(rows < limit)[:, None], other=0.0)


def _load_vec(ref, start, size, limit):
    rows = start + iota(size)
    return plgpu.load(ref.at[pl.ds(start, size)], mask=rows < limit, other=0.0)


def _load_ints(ref, start, size, limit):
    rows = start + iota(size)
    return plgpu.load(ref.at[pl.ds(start, size)], mask=rows < limit, other=0)


def _div(a, b: int):
    """``a // b`` for ``a >= 0`` (truncating: no sign fix-ups)."""
    return jax.lax.div(jnp.asarray(a, jnp.int32), jnp.int32(b))


def key_blocks(st: _Static, q0):
    """The key blocks query block ``[q0, q0 + BQ)`` visits, forward and dq: boundary-key blocks
    ``[0, full)`` (every query sees every key: no mask), ``[full, boundary_end)`` (masked), then
    ``window_blocks`` blocks of raw keys from position ``window_start``.

    -> (full, boundary_end, window_start, window_blocks); ``q0`` an int or a traced scalar.
    """
    bq, bkb, bkw = st.blocks.block_q, st.blocks.block_kb, st.blocks.block_kw
    last = jnp.minimum(q0 + bq, st.length) - 1
    n_full = st.vis.boundaries_seen(q0)  # boundaries every query of the block sees
    n_end = st.vis.boundaries_seen(last)  # boundaries the last query sees
    window_start = st.vis.window_start(q0)
    return n_full // bkb, pl.cdiv(n_end, bkb), window_start, pl.cdiv(last + 1 - window_start, bkw)


def _walk_keys(st: _Static, q0, tq, kb_ref, vb_ref, k_ref, v_ref, body, carry):
    """Calls ``body(carry, k [BK, D], v [BK, D], visible [BQ, BK] | None)`` on every key block
    that query block ``[q0, q0 + BQ)`` (positions ``tq``) can see; returns the carry."""
    bkb, bkw = st.blocks.block_kb, st.blocks.block_kw
    t, nb = st.length, st.num_boundaries
    full, boundary_end, s0, window_blocks = key_blocks(st, q0)

    def full_block(j, c):
        n0 = j * bkb  # n0 + bkb <= (boundaries every query sees) <= NB: no bounds mask needed
        kt = plgpu.load(kb_ref.at[pl.ds(n0, bkb), :])
        vt = plgpu.load(vb_ref.at[pl.ds(n0, bkb), :])
        return body(c, kt, vt, None)

    def partial_block(j, c):
        n0 = j * bkb
        n = n0 + iota(bkb)
        kt, vt = _load_rows(kb_ref, n0, bkb, nb), _load_rows(vb_ref, n0, bkb, nb)
        visible = st.vis.boundary_visible(tq[:, None], n[None, :])
        return body(c, kt, vt, visible)

    carry = jax.lax.fori_loop(0, full, full_block, carry)
    carry = jax.lax.fori_loop(full, boundary_end, partial_block, carry)

    def window_block(j, c):
        start = s0 + j * bkw
        s = start + iota(bkw)
        kt, vt = _load_rows(k_ref, start, bkw, t), _load_rows(v_ref, start, bkw, t)
        visible = st.vis.window_visible(tq[:, None], s[None, :])
        return body(c, kt, vt, visible)

    return jax.lax.fori_loop(0, window_blocks, window_block, carry)


# --- packed documents: the forward / dq walk ------------------------------------------


def _block_documents(st: _Static, doc_ref, q0, off=0):
    """The documents of query block ``[q0, q0 + BQ)`` (rows of the refs; at positions ``off + q0``..):
    (first, start, inner) = the document start of its first query (every query of the block whose
    document starts before it has it), each query's document start [BQ], and whether another document
    starts inside the block."""
    last = jnp.minimum(q0 + st.blocks.block_q, st.length) - 1
    return doc_ref[q0], _load_ints(doc_ref, q0, st.blocks.block_q, st.length), doc_ref[last] > q0 + off


def document_key_blocks(st: _Static, q0, first, inner, off=0):
    """``key_blocks`` in a packed row: the block's first query's document starts at ``first``;
    ``inner``: another document starts inside the block.

    Boundary-key blocks start at the document's first boundary (earlier ones hold earlier
    documents); ``[u0, u1)`` run unmasked (every query sees every key: no document starts inside
    the query block), ``[a, u0)`` (at most one block) and ``[u1, end)`` masked. Window blocks start
    at ``max(q0 - W, first)``.

    ``q0`` (an int or a traced scalar) is the block's first position; the row's queries end at
    ``off + T``. -> (a, u0, u1, end, window_start, window_blocks).
    """
    bq, bkb, bkw = st.blocks.block_q, st.blocks.block_kb, st.blocks.block_kw
    last = jnp.minimum(q0 + bq, off + st.length) - 1
    lo = st.vis.first_boundary(first)  # the document's first row boundary
    a = _div(lo, bkb)
    full = _div(st.vis.boundaries_seen(q0), bkb)
    end = pl.cdiv(st.vis.boundaries_seen(last), bkb)
    u0 = jnp.where(inner, a, jnp.maximum(a, jnp.minimum(pl.cdiv(lo, bkb), full)))
    u1 = jnp.where(inner, a, jnp.maximum(u0, full))
    window_start = st.vis.window_start(q0, first)
    return a, u0, u1, jnp.maximum(end, u1), window_start, pl.cdiv(last + 1 - window_start, bkw)


def _inner_first_tokens(st: _Static, tq, start, q0):
    """[BQ]: the first token of each query's document where the window walk holds it (a document
    that starts after the query block's first query ``q0``, once the token has left the window), else
    ``_NO_KEY``, a position no key has (rows of longer sequences hold keys below position 0)."""
    return jnp.where((start > q0) & st.vis.document_key_visible(tq, start), start, _NO_KEY)


def _walk_document_keys(st: _Static, q0, tq, docs, kb_ref, vb_ref, k_ref, v_ref, body, carry, off=0):
    """``_walk_keys`` in a packed row (``docs`` from ``_block_documents``): the key blocks of the
    query block's documents only, masked by each query's document start. ``q0`` and ``tq`` are
    positions; the row's queries start at ``off`` (its key rows at ``off - key_lead``)."""
    bkb, bkw = st.blocks.block_kb, st.blocks.block_kw
    keys, nb = st.keys, st.num_boundaries
    first, start, inner = docs
    a, u0, u1, end, s0, window_blocks = document_key_blocks(st, q0, first, inner, off)

    def full_block(j, c):
        n0 = j * bkb  # n0 + bkb <= (boundaries every query sees) <= NB: no bounds mask needed
        kt = plgpu.load(kb_ref.at[pl.ds(n0, bkb), :])
        vt = plgpu.load(vb_ref.at[pl.ds(n0, bkb), :])
        return body(c, kt, vt, None)

    head = u0 - a

    def masked_block(j, c):  # blocks a .. u0 - 1, then u1 .. end - 1
        n0 = jnp.where(j < head, a + j, u1 + j - head) * bkb
        n = n0 + iota(bkb)
        kt, vt = _load_rows(kb_ref, n0, bkb, nb), _load_rows(vb_ref, n0, bkb, nb)
        visible = st.vis.boundary_visible(tq[:, None], n[None, :], start[:, None])
        return body(c, kt, vt, visible)

    carry = jax.lax.fori_loop(u0, u1, full_block, carry)
    carry = jax.lax.fori_loop(0, head + end - u1, masked_block, carry)
    extra = _inner_first_tokens(st, tq, start, q0)

    def window_block(j, c):
        s_first = s0 + j * bkw
        s = s_first + iota(bkw)
        row = s_first - off + st.key_lead  # >= 0: the window starts at most W <= key_lead before the row's queries
        kt, vt = _load_rows(k_ref, row, bkw, keys), _load_rows(v_ref, row, bkw, keys)
        visible = st.vis.window_visible(tq[:, None], s[None, :], start[:, None]) | (s[None, :] == extra[:, None])
        return body(c, kt, vt, visible)

    return jax.lax.fori_loop(0, window_blocks, window_block, carry)


def _document_key(st: _Static, q, q0, tq, valid, docs, kd, vd):
    """The first token of the query block's first document (its key and value rows ``kd``, ``vd``
    [D]), for the queries of that document once it has left their window: (scores [BQ] in base 2,
    visible [BQ], k row, v row in float32). ``q0``, ``tq``: positions; ``valid`` [BQ]: real queries."""
    first, start, _ = docs
    scores = jnp.sum(q.astype(jnp.float32) * kd.astype(jnp.float32)[None, :], axis=1) * st.qk_scale
    visible = (start <= q0) & st.vis.document_key_visible(tq, first) & valid
    return scores, visible, kd.astype(jnp.float32), vd.astype(jnp.float32)


def _query_block(st: _Static, program):
    """Heaviest (latest) query blocks first: they see the most boundary keys."""
    num_q = pl.cdiv(st.length, st.blocks.block_q)
    q0 = (num_q - 1 - program) * st.blocks.block_q
    return q0, q0 + iota(st.blocks.block_q)


def _documents_frame(st: _Static, q0, refs):
    """Packed rows, the query block at row ``q0``: (the row's offset, its queries' positions [BQ],
    ``_block_documents``). ``refs``: doc [T] (and for rows of longer sequences off [1], kd, vd)."""
    off = refs[1][0] if st.rows else 0
    return off, off + q0 + iota(st.blocks.block_q), _block_documents(st, refs[0], q0, off)


def _first_key(st: _Static, q0, docs, k_ref, v_ref, refs):
    """The key and value rows [D] of the query block's first document's first token: given per
    query for rows of longer sequences (kd, vd [T, D]: that of the block's first query is that of
    every query of its first document), else read at the document start."""
    if st.rows:
        kd_ref, vd_ref = refs[2:]
        return kd_ref[q0, :], vd_ref[q0, :]
    return k_ref[docs[0], :], v_ref[docs[0], :]


def _fwd_kernel(q_ref, k_ref, v_ref, kb_ref, vb_ref, *refs, st: _Static):
    """Refs: q, o [T, D]; k, v [key_lead + T, D]; kb, vb [NB, D]; (documents: doc [T], the document
    starts; rows: off [1], kd, vd [T, D]); lse [Tp] (base-2 log-sum-exp)."""
    layout, (o_ref, lse_ref) = refs[: st.layout_refs], refs[st.layout_refs :]
    bq, d = st.blocks.block_q, st.head_dim
    q0, tq = _query_block(st, pl.program_id(0))
    valid = tq < st.length
    q = _load_rows(q_ref, q0, bq, st.length)

    def body(carry, kt, vt, visible):
        acc, m, l = carry
        s = dot(q, kt, st.precision, trans_b=True) * st.qk_scale  # [BQ, BK]
        if visible is not None:
            s = jnp.where(visible, s, _NEG)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(s - m_new[:, None])
        if visible is not None:
            p = jnp.where(visible, p, 0.0)
        l = l * alpha + jnp.sum(p, axis=1)
        acc = acc * alpha[:, None] + dot(p.astype(vt.dtype), vt, st.precision)
        return acc, m_new, l

    if st.documents:
        # The softmax state starts from the document's first token (where visible): one key, no rescale.
        off, pos, docs = _documents_frame(st, q0, layout)
        kd, vd = _first_key(st, q0, docs, k_ref, v_ref, layout)
        s_d, visible_d, _, vd = _document_key(st, q, off + q0, pos, valid, docs, kd, vd)
        init = (
            jnp.where(visible_d[:, None], vd[None, :], 0.0),
            jnp.where(visible_d, s_d, _NEG),
            visible_d.astype(jnp.float32),
        )
        acc, m, l = _walk_document_keys(st, off + q0, pos, docs, kb_ref, vb_ref, k_ref, v_ref, body, init, off)
    else:
        init = (jnp.zeros((bq, d), jnp.float32), jnp.full((bq,), _NEG, jnp.float32), jnp.zeros((bq,), jnp.float32))
        acc, m, l = _walk_keys(st, q0, tq, kb_ref, vb_ref, k_ref, v_ref, body, init)
    # Every real query sees itself, so l > 0; padded rows (t >= T) are not stored.
    l_safe = jnp.where(l > 0, l, 1.0)
    plgpu.store(o_ref.at[pl.ds(q0, bq), :], (acc / l_safe[:, None]).astype(o_ref.dtype), mask=valid[:, None])
    lse_ref[pl.ds(q0, bq)] = m + jnp.log2(l_safe)


def _dq_kernel(q_ref, k_ref, v_ref, kb_ref, vb_ref, *refs, st: _Static):
    """Refs: q, do, dq [T, D]; k, v [key_lead + T, D]; kb, vb [NB, D]; lse, delta [Tp]; documents:
    the forward's layout refs (after vb) and pdk, pdv [NQ, D] (after dq): per query block, the
    first-token term's dk, dv (unscaled) summed over the block's first document.
    """
    layout, refs = refs[: st.layout_refs], refs[st.layout_refs :]
    if st.documents:
        do_ref, lse_ref, delta_ref, dq_ref, pdk_ref, pdv_ref = refs
    else:
        do_ref, lse_ref, delta_ref, dq_ref = refs
    bq, d = st.blocks.block_q, st.head_dim
    q0, tq = _query_block(st, pl.program_id(0))
    valid = tq < st.length
    q = _load_rows(q_ref, q0, bq, st.length)
    do = _load_rows(do_ref, q0, bq, st.length)
    lse = _load_vec(lse_ref, q0, bq, st.length)
    delta = _load_vec(delta_ref, q0, bq, st.length)

    def body(dq, kt, vt, visible):
        s = dot(q, kt, st.precision, trans_b=True) * st.qk_scale
        p = jnp.exp2(s - lse[:, None])
        if visible is not None:
            p = jnp.where(visible, p, 0.0)
        dp = dot(do, vt, st.precision, trans_b=True)  # [BQ, BK]
        ds = p * (dp - delta[:, None])
        return dq + dot(ds.astype(kt.dtype), kt, st.precision)

    if st.documents:
        off, pos, docs = _documents_frame(st, q0, layout)
        kd, vd = _first_key(st, q0, docs, k_ref, v_ref, layout)
        s_d, visible_d, kd, vd = _document_key(st, q, off + q0, pos, valid, docs, kd, vd)
        p_d = jnp.where(visible_d, jnp.exp2(s_d - lse), 0.0)
        ds_d = p_d * (jnp.sum(do.astype(jnp.float32) * vd[None, :], axis=1) - delta)
        block = _div(q0, bq)
        pdk_ref[block, :] = jnp.sum(ds_d[:, None] * q.astype(jnp.float32), axis=0)
        pdv_ref[block, :] = jnp.sum(p_d[:, None] * do.astype(jnp.float32), axis=0)
        dq = _walk_document_keys(
            st, off + q0, pos, docs, kb_ref, vb_ref, k_ref, v_ref, body, ds_d[:, None] * kd[None, :], off
        )
    else:
        dq = _walk_keys(st, q0, tq, kb_ref, vb_ref, k_ref, v_ref, body, jnp.zeros((bq, d), jnp.float32))
    plgpu.store(dq_ref.at[pl.ds(q0, bq), :], (dq * st.scale).astype(dq_ref.dtype), mask=valid[:, None])


def _dkv_step(st, kt, vt, q, do, lse, delta, visible, dk, dv):
    """One [BK keys x BQ queries] tile of dk/dv, keys on rows (no transposes of p)."""
    s_t = dot(kt, q, st.precision, trans_b=True) * st.qk_scale  # [BK, BQ]
    p_t = jnp.exp2(s_t - lse[None, :])
    if visible is not None:
        p_t = jnp.where(visible, p_t, 0.0)
    dv = dv + dot(p_t.astype(do.dtype), do, st.precision)
    dp_t = dot(vt, do, st.precision, trans_b=True)
    ds_t = p_t * (dp_t - delta[None, :])
    dk = dk + dot(ds_t.astype(q.dtype), q, st.precision)
    return dk, dv


def _load_queries(st, q_ref, do_ref, lse_ref, delta_ref, head, t0, size):
    """Query-side tiles of head ``head`` (of this kv group) for rows [t0, t0 + size); zeros past T
    make padded rows contribute nothing (do = 0 and delta = 0)."""
    valid = t0 + iota(size) < st.length
    rows, head = pl.ds(t0, size), index(head)
    q = plgpu.load(q_ref.at[rows, head, :], mask=valid[:, None], other=0.0)
    do = plgpu.load(do_ref.at[rows, head, :], mask=valid[:, None], other=0.0)
    lse = plgpu.load(lse_ref.at[head, rows], mask=valid, other=0.0)
    delta = plgpu.load(delta_ref.at[head, rows], mask=valid, other=0.0)
    return q, do, lse, delta


def _dkv_boundary_kernel(
    q_ref, do_ref, lse_ref, delta_ref, kb_ref, vb_ref, dkb_ref, dvb_ref, *, st: _Static, group: int, splits: int
):
    """dk, dv of one block of boundary keys from one of ``splits`` equal shares of the queries
    that see them (the shares' partial sums are added by the caller).

    Refs: q, do [T, R, D] (the R query heads of this kv head); lse, delta [R, Tp];
    kb, vb [NB, D]; dkb, dvb [NB, D]: this share's partial sums.
    """
    bk, bq, d = st.blocks.block_kb_bwd, st.blocks.block_q_bwd, st.head_dim
    t, nb = st.length, st.num_boundaries
    n0 = (pl.program_id(0) // splits) * bk
    share = pl.program_id(0) % splits
    n = n0 + iota(bk)
    kt, vt = _load_rows(kb_ref, n0, bk, nb), _load_rows(vb_ref, n0, bk, nb)
    # Query blocks t0 = first_query + j*bq, j < num_total; the first num_masked straddle a key.
    first_query = st.vis.first_query_seeing(n0)
    all_see = st.vis.first_query_seeing(jnp.minimum(n0 + bk, nb) - 1)  # from here every key is visible
    num_masked = pl.cdiv(jnp.maximum(jnp.minimum(all_see, t) - first_query, 0), bq)
    num_total = jnp.maximum(num_masked, pl.cdiv(jnp.maximum(t - first_query, 0), bq))
    per_share = pl.cdiv(num_total, splits)
    j0 = jnp.minimum(share * per_share, num_total)
    j1 = jnp.minimum(j0 + per_share, num_total)
    split_at = jnp.clip(num_masked, j0, j1)

    dk = dv = jnp.zeros((bk, d), jnp.float32)
    for head in range(group):

        def masked(j, c, head=head):
            t0 = first_query + j * bq
            q, do, lse, delta = _load_queries(st, q_ref, do_ref, lse_ref, delta_ref, head, t0, bq)
            visible = st.vis.boundary_visible((t0 + iota(bq))[None, :], n[:, None])
            return _dkv_step(st, kt, vt, q, do, lse, delta, visible, *c)

        def unmasked(j, c, head=head):
            q, do, lse, delta = _load_queries(st, q_ref, do_ref, lse_ref, delta_ref, head, first_query + j * bq, bq)
            return _dkv_step(st, kt, vt, q, do, lse, delta, None, *c)

        dk, dv = jax.lax.fori_loop(j0, split_at, masked, (dk, dv))
        dk, dv = jax.lax.fori_loop(split_at, j1, unmasked, (dk, dv))
    rows = (n < nb)[:, None]
    plgpu.store(dkb_ref.at[pl.ds(n0, bk), :], dk * st.scale, mask=rows)
    plgpu.store(dvb_ref.at[pl.ds(n0, bk), :], dv, mask=rows)


def _dkv_boundary_documents_kernel(
    q_ref, do_ref, lse_ref, delta_ref, kb_ref, vb_ref, doc_ref, ns_ref, *refs, st, group, splits
):
    """``_dkv_boundary_kernel`` in a packed row: the walk ends at the end of the last document holding
    the block's boundaries and runs unmasked only where every query sees every key (after the
    straddling first queries, before the next document starts).

    Refs as there, plus doc [T] (the document starts) and ns [J] (``_next_start_positions``); for
    rows of longer sequences off [1] next (the row's queries are at off + 0..T-1).
    """
    off_ref, (dkb_ref, dvb_ref) = (refs[0], refs[1:]) if st.rows else (None, refs)
    off = off_ref[0] if st.rows else 0
    bk, bq, d = st.blocks.block_kb_bwd, st.blocks.block_q_bwd, st.head_dim
    t, nb = st.length, st.num_boundaries
    c = pl.program_id(0) // splits
    share = pl.program_id(0) % splits
    n0 = c * bk
    n = n0 + iota(bk)
    kt, vt = _load_rows(kb_ref, n0, bk, nb), _load_rows(vb_ref, n0, bk, nb)
    # Query blocks t0 = first_query + j*bq, j < total (to the end of the last document holding a key
    # of the block); [0, straddle) straddle the first queries, [straddle, inside) see every key, the rest
    # hold queries of later documents.
    first_query = st.vis.first_query_seeing(n0)
    if st.rows:
        first_query = jnp.maximum(first_query, off)
    all_see = st.vis.first_query_seeing(jnp.minimum(n0 + bk, nb) - 1)
    next_document, end = ns_ref[2 * c], ns_ref[2 * c + 1]  # after pos(n0); after the block's last key
    total = pl.cdiv(jnp.maximum(end - first_query, 0), bq)
    straddle = jnp.minimum(pl.cdiv(jnp.maximum(jnp.minimum(all_see, off + t) - first_query, 0), bq), total)
    inside = jnp.where(next_document >= off + t, total, _div(jnp.maximum(next_document - first_query, 0), bq))
    inside = jnp.minimum(jnp.maximum(inside, straddle), total)
    per_share = pl.cdiv(total, splits)
    j0 = jnp.minimum(share * per_share, total)
    j1 = jnp.minimum(j0 + per_share, total)
    a = jnp.minimum(jnp.maximum(straddle, j0), j1)
    b = jnp.minimum(jnp.maximum(inside, a), j1)
    first_row = first_query - off  # the row of the walk's first query

    dk = dv = jnp.zeros((bk, d), jnp.float32)
    for head in range(group):

        def masked(j, c_, head=head):  # query blocks j0 .. a - 1, then b .. j1 - 1
            r0 = first_row + jnp.where(j < a - j0, j0 + j, b + j - (a - j0)) * bq
            q, do, lse, delta = _load_queries(st, q_ref, do_ref, lse_ref, delta_ref, head, r0, bq)
            start = _load_ints(doc_ref, r0, bq, t)
            visible = st.vis.boundary_visible((off + r0 + iota(bq))[None, :], n[:, None], start[None, :])
            return _dkv_step(st, kt, vt, q, do, lse, delta, visible, *c_)

        def unmasked(j, c_, head=head):
            q, do, lse, delta = _load_queries(st, q_ref, do_ref, lse_ref, delta_ref, head, first_row + j * bq, bq)
            return _dkv_step(st, kt, vt, q, do, lse, delta, None, *c_)

        dk, dv = jax.lax.fori_loop(0, (a - j0) + (j1 - b), masked, (dk, dv))
        dk, dv = jax.lax.fori_loop(a, b, unmasked, (dk, dv))
    rows = (n < nb)[:, None]
    plgpu.store(dkb_ref.at[pl.ds(n0, bk), :], dk * st.scale, mask=rows)
    plgpu.store(dvb_ref.at[pl.ds(n0, bk), :], dv, mask=rows)


def _query_splits(st: _Static, programs: int) -> int:
    """Shares of the query walk per boundary-key block in the dk/dv pass.

    With few boundary-key blocks (one long row: T/K/BK blocks x kv heads) the pass would run
    a few hundred programs that each walk up to T/BQ query blocks; splitting the walk keeps
    ~1024 programs in flight, each share at least 8 query blocks long.
    """
    if st.blocks.dkv_query_splits:
        return st.blocks.dkv_query_splits
    num_q = pl.cdiv(st.length, st.blocks.block_q_bwd)
    return max(1, min(pl.cdiv(1024, programs), num_q // 8))


def _dkv_window_kernel(q_ref, do_ref, lse_ref, delta_ref, k_ref, v_ref, dk_ref, dv_ref, *, st: _Static, group: int):
    """dk, dv of one block of keys [s0, s0 + BK) from the window queries [s0, s0 + BK + W).

    Refs: q, do [T, R, D]; lse, delta [R, Tp]; k, v, dk, dv [T, D].
    """
    bk, bq, d = st.blocks.block_kw_bwd, st.blocks.block_q_bwd, st.head_dim
    t, w = st.length, st.vis.window
    s0 = pl.program_id(0) * bk
    s = s0 + iota(bk)
    kt, vt = _load_rows(k_ref, s0, bk, t), _load_rows(v_ref, s0, bk, t)
    num_q = pl.cdiv(jnp.maximum(jnp.minimum(s0 + bk + w, t) - s0, 0), bq)
    dk = dv = jnp.zeros((bk, d), jnp.float32)
    for head in range(group):

        def step(j, c, head=head):
            t0 = s0 + j * bq
            q, do, lse, delta = _load_queries(st, q_ref, do_ref, lse_ref, delta_ref, head, t0, bq)
            visible = st.vis.window_visible((t0 + iota(bq))[None, :], s[:, None])
            return _dkv_step(st, kt, vt, q, do, lse, delta, visible, *c)

        dk, dv = jax.lax.fori_loop(0, num_q, step, (dk, dv))
    rows = (s < t)[:, None]
    plgpu.store(dk_ref.at[pl.ds(s0, bk), :], dk * st.scale, mask=rows)
    plgpu.store(dv_ref.at[pl.ds(s0, bk), :], dv, mask=rows)


_PARTIAL_TILE = 16  # query blocks per step when the window dk/dv pass adds the dq pass's first-token sums


def _dkv_window_documents_kernel(q_ref, do_ref, lse_ref, delta_ref, k_ref, v_ref, *refs, st: _Static, group: int):
    """``_dkv_window_kernel`` in a packed row. The window mask adds ``s >= d_t`` and the first
    tokens that the forward's window walk holds (documents starting inside a query block: such a
    query lies in its first token's query block, so the walk extends to the end of the last query
    block holding a key of this block). Then the first tokens of the documents starting in this
    block take the dq pass's per-query-block sums (pdk, pdv [NQ, R, D]) of the query blocks whose
    first document they start (firsts [NQ]: each query block's first document start): a contiguous
    run of query blocks, from ``ns``.

    Refs as there, then doc [T], ns [J], firsts [NQ], pdk, pdv [NQ, R, D] before dk, dv. For rows
    of longer sequences: doc [T], off [1] (k, v, dk, dv hold key_lead + T rows from off - key_lead);
    the first-token sums are the gradient of the given document-first keys instead.
    """
    if st.rows:
        (doc_ref, off_ref, dk_ref, dv_ref) = refs
        off = off_ref[0]
    else:
        (doc_ref, ns_ref, firsts_ref, pdk_ref, pdv_ref, dk_ref, dv_ref), off = refs, 0
    bk, bq, d = st.blocks.block_kw_bwd, st.blocks.block_q_bwd, st.head_dim
    bqf = st.blocks.block_q  # the dq pass's query blocks
    t, w, keys = st.length, st.vis.window, st.keys
    c = pl.program_id(0)
    s0 = c * bk  # the block's first key row
    r0 = s0 - st.key_lead  # ... as a query row (the same position)
    s = off + r0 + iota(bk)  # the keys' positions
    kt, vt = _load_rows(k_ref, s0, bk, keys), _load_rows(v_ref, s0, bk, keys)
    end = jnp.maximum(r0 + bk, 0)
    last_query = jnp.minimum(jnp.maximum(r0 + bk + w, pl.cdiv(end, bqf) * bqf), t)
    first_query = jnp.maximum(r0, 0) if st.rows else r0
    num_q = pl.cdiv(jnp.maximum(last_query - first_query, 0), bq)
    dk = dv = jnp.zeros((bk, d), jnp.float32)
    for head in range(group):

        def step(j, c_, head=head):
            t0 = first_query + j * bq
            tq = off + t0 + iota(bq)
            q, do, lse, delta = _load_queries(st, q_ref, do_ref, lse_ref, delta_ref, head, t0, bq)
            start = _load_ints(doc_ref, t0, bq, t)
            extra = _inner_first_tokens(st, tq, start, off + _div(t0 + iota(bq), bqf) * bqf)
            visible = st.vis.window_visible(tq[None, :], s[:, None], start[None, :]) | (s[:, None] == extra[None, :])
            return _dkv_step(st, kt, vt, q, do, lse, delta, visible, *c_)

        dk, dv = jax.lax.fori_loop(0, num_q, step, (dk, dv))

    if not st.rows:
        # Query blocks i with first document start in [s0, s0 + BK): i*BQ >= the first start >= s0, and
        # i*BQ < the first start >= s0 + BK.
        offset = 2 * pl.cdiv(st.num_boundaries, st.blocks.block_kb_bwd)
        i_lo, i_hi = pl.cdiv(ns_ref[offset + c], bqf), pl.cdiv(ns_ref[offset + c + 1], bqf)
        pt = _PARTIAL_TILE

        def partial_sums(j, c_):
            dk, dv = c_
            i0 = i_lo + j * pt
            valid = i0 + iota(pt) < i_hi
            firsts = plgpu.load(firsts_ref.at[pl.ds(i0, pt)], mask=valid, other=-1)
            onehot = (s[:, None] == firsts[None, :]).astype(jnp.float32)  # [BK, PT]: the key each block's sums go to
            load = lambda ref, h: plgpu.load(ref.at[pl.ds(i0, pt), index(h), :], mask=valid[:, None], other=0.0)
            pk = functools.reduce(jnp.add, [load(pdk_ref, h) for h in range(group)])
            pv = functools.reduce(jnp.add, [load(pdv_ref, h) for h in range(group)])
            exact = jax.lax.Precision.HIGHEST
            return dk + dot(onehot, pk, exact), dv + dot(onehot, pv, exact)

        dk, dv = jax.lax.fori_loop(0, pl.cdiv(jnp.maximum(i_hi - i_lo, 0), pt), partial_sums, (dk, dv))
    rows = (s0 + iota(bk) < keys)[:, None]
    plgpu.store(dk_ref.at[pl.ds(s0, bk), :], dk * st.scale, mask=rows)
    plgpu.store(dv_ref.at[pl.ds(s0, bk), :], dv, mask=rows)


def _next_start_positions(st: _Static) -> np.ndarray:
    """The positions whose next document start (``documents.next_starts``) the dk/dv passes read: per
    boundary-key block, pos(n0) and pos(last key) + 1; then each window-key block's first key (and T)."""
    grid, nb, bkb, bkw = st.vis.grid, st.num_boundaries, st.blocks.block_kb_bwd, st.blocks.block_kw_bwd
    n0 = np.arange(0, nb, bkb)
    ends = np.minimum(n0 + bkb, nb) - 1
    boundary = np.stack([grid.position(n0), grid.position(ends) + 1], axis=1).reshape(-1)
    window = np.minimum(np.arange(pl.cdiv(st.length, bkw) + 1) * bkw, st.length)
    return np.concatenate([boundary, window]).astype(np.int32)


# --- launches ------------------------------------------------------------------------


def _padded_length(st: _Static) -> int:
    return pl.cdiv(st.length, st.blocks.block_q) * st.blocks.block_q


def _layout_args(st: _Static, layout, t: int, index_map):
    """The packed layout's kernel arguments and specs: doc [T] (and off [1] for rows of longer
    sequences); ``layout`` is the document starts, or (starts, offsets [B]) for such rows."""
    if not st.documents:
        return (), []
    if not st.rows:
        return (layout,), [pl.BlockSpec((None, t), index_map)]
    starts, offsets = layout
    return (starts, offsets.reshape(-1, 1)), [
        pl.BlockSpec((None, t), index_map),
        pl.BlockSpec((None, 1), index_map),
    ]


def _boundary_keys(st: _Static, k, v, inputs):
    """kb, vb [B, NB, Hkv, D]: given for rows of longer sequences, else gathered from k, v."""
    return inputs[3:5] if st.rows else gather_boundaries(st.vis.grid, k, v)


def _forward(st: _Static, inputs, layout, interpret):
    """-> o [B, T, H, D], lse [B, H, Tp] (base 2). ``inputs``: (q, k, v), or for rows of longer
    sequences (q, k, v, kb, vb, kd, vd); ``layout``: None, the [B, T] int32 document starts, or
    (starts, offsets [B]) for such rows."""
    q, k, v = inputs[:3]
    b, t, h, d = q.shape
    hkv = k.shape[2]
    r = h // hkv
    kb, vb = _boundary_keys(st, k, v, inputs)  # [B, NB, Hkv, D]
    nq = pl.cdiv(t, st.blocks.block_q)
    tp = _padded_length(st)
    keys = st.keys
    seq = lambda n: pl.BlockSpec((None, n, None, d), lambda i, bi, hi: (bi, 0, hi, 0))
    kv_seq = lambda n: pl.BlockSpec((None, n, None, d), lambda i, bi, hi: (bi, 0, hi // r, 0))
    lse_spec = pl.BlockSpec((None, None, tp), lambda i, bi, hi: (bi, hi, 0))
    in_specs = [seq(t), kv_seq(keys), kv_seq(keys), kv_seq(st.num_boundaries), kv_seq(st.num_boundaries)]
    args = (q, k, v, kb, vb)
    layout_args, layout_specs = _layout_args(st, layout, t, lambda i, bi, hi: (bi, 0))
    args, in_specs = args + layout_args, in_specs + layout_specs
    if st.rows:
        args, in_specs = args + tuple(inputs[5:]), in_specs + [kv_seq(t), kv_seq(t)]
    return poisoned.pallas_call(
        functools.partial(_fwd_kernel, st=st),
        poison=st.poison,
        out_shape=(jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, h, tp), jnp.float32)),
        grid=(nq, b, h),
        in_specs=in_specs,
        out_specs=(seq(t), lse_spec),
        compiler_params=triton_params(st.blocks.num_warps, st.blocks.num_stages),
        interpret=interpret,
        name="boundary_window_attention_fwd",
    )(*args)


def _backward(st: _Static, inputs, layout, o, lse, do, interpret):
    """The gradients of ``_forward``'s ``inputs``."""
    q, k, v = inputs[:3]
    b, t, h, d = q.shape
    hkv = k.shape[2]
    r = h // hkv
    nb = st.num_boundaries
    tp = _padded_length(st)
    keys = st.keys
    kb, vb = _boundary_keys(st, k, v, inputs)  # [B, NB, Hkv, D]
    documents = None if layout is None else (layout[0] if st.rows else layout)
    f32 = jnp.float32
    delta = jnp.einsum("bthd,bthd->bht", o.astype(f32), do.astype(f32))
    delta = jnp.pad(delta, ((0, 0), (0, 0), (0, tp - t)))  # [B, H, Tp]
    blk = st.blocks

    # dq: per query block, like the forward.
    seq = lambda n: pl.BlockSpec((None, n, None, d), lambda i, bi, hi: (bi, 0, hi, 0))
    kv_seq = lambda n: pl.BlockSpec((None, n, None, d), lambda i, bi, hi: (bi, 0, hi // r, 0))
    row = pl.BlockSpec((None, None, tp), lambda i, bi, hi: (bi, hi, 0))
    nq = pl.cdiv(t, blk.block_q)
    dq_args = (q, k, v, kb, vb)
    dq_specs = [seq(t), kv_seq(keys), kv_seq(keys), kv_seq(nb), kv_seq(nb)]
    layout_args, layout_specs = _layout_args(st, layout, t, lambda i, bi, hi: (bi, 0))
    dq_args, dq_specs = dq_args + layout_args, dq_specs + layout_specs
    if st.rows:
        dq_args, dq_specs = dq_args + tuple(inputs[5:]), dq_specs + [kv_seq(t), kv_seq(t)]
    dq_args, dq_specs = dq_args + (do, lse, delta), dq_specs + [seq(t), row, row]
    if st.documents:
        # Per query block, the first-token term's dk, dv sums [B, NQ, H, D].
        partial = jax.ShapeDtypeStruct((b, nq, h, d), f32)
        partial_spec = pl.BlockSpec((None, nq, None, d), lambda i, bi, hi: (bi, 0, hi, 0))
        out_shape, out_specs = (
            (jax.ShapeDtypeStruct(q.shape, q.dtype), partial, partial),
            (seq(t),) + (partial_spec,) * 2,
        )
    else:
        out_shape, out_specs = jax.ShapeDtypeStruct(q.shape, q.dtype), seq(t)
    dq = poisoned.pallas_call(
        functools.partial(_dq_kernel, st=st),
        poison=st.poison,
        out_shape=out_shape,
        grid=(nq, b, h),
        in_specs=dq_specs,
        out_specs=out_specs,
        compiler_params=triton_params(blk.num_warps_bwd, blk.num_stages),
        interpret=interpret,
        name="boundary_window_attention_dq",
    )(*dq_args)
    if st.documents:
        dq, pdk, pdv = dq

    # dk, dv: per kv head, summing its R query heads.
    group_seq = pl.BlockSpec((None, t, r, d), lambda i, bi, j: (bi, 0, j, 0))
    group_row = pl.BlockSpec((None, r, tp), lambda i, bi, j: (bi, j, 0))
    own = lambda n: pl.BlockSpec((None, n, None, d), lambda i, bi, j: (bi, 0, j, 0))
    num_kb = pl.cdiv(nb, blk.block_kb_bwd)
    splits = _query_splits(st, num_kb * b * hkv)
    share = pl.BlockSpec((None, None, nb, None, d), lambda i, bi, j: (i % splits, bi, 0, j, 0))
    boundary_kernel, window_kernel = _dkv_boundary_kernel, _dkv_window_kernel
    boundary_specs = [group_seq, group_seq, group_row, group_row, own(nb), own(nb)]
    window_specs = [group_seq, group_seq, group_row, group_row, own(keys), own(keys)]
    boundary_args, window_args = (q, do, lse, delta, kb, vb), (q, do, lse, delta, k, v)
    if st.documents:
        positions = _next_start_positions(st)
        offsets = layout[1] if st.rows else None
        ns = next_starts(documents, positions, st.vis.grid.token_chunk, offsets)  # [B, J]
        doc_spec = pl.BlockSpec((None, t), lambda i, bi, j: (bi, 0))
        ns_spec = pl.BlockSpec((None, len(positions)), lambda i, bi, j: (bi, 0))
        boundary_kernel, window_kernel = _dkv_boundary_documents_kernel, _dkv_window_documents_kernel
        boundary_args, boundary_specs = boundary_args + (documents, ns), boundary_specs + [doc_spec, ns_spec]
        if st.rows:
            off_args, off_specs = _layout_args(st, layout, t, lambda i, bi, j: (bi, 0))
            boundary_args, boundary_specs = boundary_args + off_args[1:], boundary_specs + off_specs[1:]
            window_args, window_specs = window_args + off_args, window_specs + off_specs
        else:
            firsts = pl.BlockSpec((None, nq), lambda i, bi, j: (bi, 0))
            group_partial = pl.BlockSpec((None, nq, r, d), lambda i, bi, j: (bi, 0, j, 0))
            window_specs = window_specs + [doc_spec, ns_spec, firsts, group_partial, group_partial]
            window_args = window_args + (documents, ns, documents[:, :: blk.block_q], pdk, pdv)
    dkb, dvb = poisoned.pallas_call(
        functools.partial(boundary_kernel, st=st, group=r, splits=splits),
        poison=st.poison,
        out_shape=(jax.ShapeDtypeStruct((splits,) + kb.shape, f32),) * 2,
        grid=(num_kb * splits, b, hkv),
        in_specs=boundary_specs,
        out_specs=(share, share),
        compiler_params=triton_params(blk.num_warps_bwd, blk.num_stages),
        interpret=interpret,
        name="boundary_window_attention_dkv_boundary",
    )(*boundary_args)
    dkb, dvb = jnp.sum(dkb, axis=0), jnp.sum(dvb, axis=0)
    dk, dv = poisoned.pallas_call(
        functools.partial(window_kernel, st=st, group=r),
        poison=st.poison,
        out_shape=(jax.ShapeDtypeStruct(k.shape, f32),) * 2,
        grid=(pl.cdiv(keys, blk.block_kw_bwd), b, hkv),
        in_specs=window_specs,
        out_specs=(own(keys), own(keys)),
        compiler_params=triton_params(blk.num_warps_bwd, blk.num_stages),
        interpret=interpret,
        name="boundary_window_attention_dkv_window",
    )(*window_args)
    if st.rows:
        # The first-token sums are the given document-first keys' gradient, at each query block's first row.
        dkd, dvd = (
            jnp.zeros((b, t, hkv, d), f32).at[:, :: blk.block_q].set(p.reshape(b, nq, hkv, r, d).sum(3))
            for p in (pdk * st.scale, pdv)
        )
        grads = (dq, dk, dv, dkb, dvb, dkd, dvd)
        return tuple(g.astype(x.dtype) for g, x in zip(grads, inputs))
    dk, dv = add_at_boundaries(st.vis.grid, dk, dkb), add_at_boundaries(st.vis.grid, dv, dvb)
    return dq, dk.astype(k.dtype), dv.astype(v.dtype)


_attention = flash_vjp(_forward, _backward)


def _pad_head_dim(a, d):
    return a if a.shape[-1] == d else jnp.pad(a, [(0, 0)] * 3 + [(0, d - a.shape[-1])])


def make_static(
    q, grid: ChunkGrid, window: int, blocks: GpuBlocks | None = None, poison: bool = False, documents: bool = False
) -> _Static:
    """The kernels' static configuration for these shapes (head dim padded to a power of two >= 16;
    ``documents``: packed rows, the kernels take their document starts)."""
    t, d = q.shape[1], q.shape[3]
    return _Static(
        length=t,
        num_boundaries=grid.num_boundaries(t),
        vis=Visibility(grid, window),
        head_dim=max(16, next_pow2(d)),
        scale=d**-0.5,
        blocks=blocks or GpuBlocks(),
        precision=matmul_precision(q.dtype),
        poison=poison,
        documents=documents,
    )


def attention_pallas_gpu(
    q,
    k,
    v,
    *,
    grid: ChunkGrid,
    window: int,
    document_start=None,
    interpret: bool = False,
    blocks: GpuBlocks | None = None,
    poison: bool = False,
):
    """Same contract as ``reference.attention_dense``; differentiable in q, k, v.

    Args:
      q: [B, T, H, D]; k, v: [B, T, Hkv, D] with H % Hkv == 0.
      grid, window: the layer's chunk grid and W.
      document_start: [B, T] int, each token's document start, documents at multiples of K
        (``pallas_kernels.documents``); None: each row is one document.
      interpret: run the kernels in the Pallas interpreter (CPU).
      blocks: tile and launch settings (default: ``block_sizes.GpuBlocks()``).
      poison: every kernel output, forward and backward, starts as NaN (checks that each
        element is written; ``pallas_kernels.poison``).

    Returns:
      [B, T, H, D] in q.dtype.
    """
    st = make_static(q, grid, window, blocks, poison, documents=document_start is not None)
    d = q.shape[-1]
    q, k, v = (_pad_head_dim(a, st.head_dim) for a in (q, k, v))
    documents = None if document_start is None else jnp.asarray(document_start, jnp.int32)
    return _attention(st, (q, k, v), documents, interpret)[..., :d]


def attention_of_rows_pallas_gpu(
    q,
    k,
    v,
    boundaries,
    documents,
    *,
    grid: ChunkGrid,
    window: int,
    row_offset,
    interpret: bool = False,
    blocks: GpuBlocks | None = None,
    poison: bool = False,
):
    """Same contract as ``xla.attention_of_rows`` (rows that are slices of longer sequences, with
    their boundary and document-first keys given), ``documents`` required; differentiable in q, k,
    v and the given keys. Each row's queries start at its offset, a multiple of K.

    Args:
      interpret, blocks, poison: as ``attention_pallas_gpu``.
    """
    if documents is None:
        raise ValueError("attention_of_rows_pallas_gpu: the rows' documents (kd, vd, starts) are required")
    kb, vb = boundaries
    kd, vd, starts = documents
    b, t, _, d = q.shape
    lead = k.shape[1] - t
    if lead < window:
        raise ValueError(f"attention_of_rows_pallas_gpu: k holds {lead} keys before the queries, fewer than W={window}")
    st = dataclasses.replace(
        make_static(q, grid, window, blocks, poison, documents=True),
        num_boundaries=kb.shape[1],
        rows=True,
        key_lead=lead,
    )
    inputs = tuple(_pad_head_dim(a, st.head_dim) for a in (q, k, v, kb, vb, kd, vd))
    offsets = jnp.broadcast_to(jnp.asarray(row_offset, jnp.int32), (b,))
    return _attention(st, inputs, (jnp.asarray(starts, jnp.int32), offsets), interpret)[..., :d]
