"""Boundary + window attention as Pallas kernels for TPUs (Mosaic), forward and backward.

The same two key streams as ``pallas_gpu`` (the ~T/K gathered boundary keys, then the
window), expressed the Mosaic way: the boundary keys and the sequence are stacked
into one key array ``[kb (padded to BK) ; k]`` and a scalar-prefetched table lists,
for each query block, exactly the key blocks it needs. The grid's last axis walks
that list with the online-softmax state in VMEM; steps past a block's list repeat
its last entry (no new DMA) and are skipped, so no fully masked key block is ever
computed. The backward uses the transposed tables: for each key block (boundary or
window), the query blocks that see it; dk/dv of the stacked array are folded back
onto the sequence (boundary rows added at the boundary positions) by XLA.

Packed documents (``document_start``, documents at multiples of K; ``pallas_gpu`` has the
rule in full). The tables stay host-side and static; the layout enters as scalar prefetch:
  * forward and dq: each query block's first document start d. An index map sends every
    step whose table entry lies before the document's first boundary block, or before its
    first window block, to the next block the document does need (``_document_key_block``):
    the same block index as the next step's, so the pipeline starts no DMA for it, and
    ``pl.when`` skips its compute. Masks add the query's document start (the column of
    document starts comes in per query block) and the first tokens of documents that start
    inside the query block (window rows). The first token of the block's first document is
    one extra [1, D] row of ``k[:, ::K]``, ``v[:, ::K]`` per program, taken into the softmax
    state at the first step; dq also writes, per query block and head, that token's dk, dv
    summed over the block's queries, which XLA adds at the token (a scatter of B·NQ rows).
  * dk/dv: per boundary-key block, the query block after the end of the last document
    holding its boundaries (from ``documents.next_starts``); later steps stay on the last
    needed query block (no DMA) and are skipped.
With ``document_start=None`` none of this is traced.

Rows that are slices of longer sequences (``attention_of_rows_pallas_tpu``: a context shard's
pieces) run the packed-documents kernels with the row's offset as one more scalar prefetch. The
window blocks lie in the row's own key rows (k, v hold ``key_lead`` >= W keys before the queries),
so their tables stay static; which boundary blocks a query block sees, and which query blocks a
boundary block needs, depend on the offset: the tables list them all and the index maps skip the
others as they skip those of earlier documents (no DMA, no compute). The boundary keys and each
query block's first document key come in as inputs, and the backward returns their gradients.

Layout is head-major ([B, H, T, D]) because Mosaic tiles the last two dims.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.boundary_window_attention.block_sizes import TpuBlocks
from pallas_kernels.boundary_window_attention.flash_vjp import flash_vjp
from pallas_kernels.chunk_grid import ChunkGrid
from pallas_kernels.common import add_at_boundaries, dot, gather_boundaries, matmul_precision, mosaic_params
from pallas_kernels.documents import next_starts
from pallas_kernels.visibility import Visibility

_NEG = -1e30


def _div(a, b: int):
    """``a // b`` for ``a >= 0`` (truncating: no sign fix-ups in Mosaic)."""
    return jax.lax.div(jnp.asarray(a, jnp.int32), jnp.int32(b))


@dataclasses.dataclass(frozen=True)
class _Static:
    length: int  # T
    num_boundaries: int  # NB
    vis: Visibility  # the grid and W
    scale: float
    block_q: int
    block_k: int
    precision: jax.lax.Precision | None  # exact float32 matmuls for float32 inputs
    documents: bool = False  # packed rows: the kernels take the document starts
    # Rows that are slices of longer sequences (``attention_of_rows_pallas_tpu``; needs ``documents``):
    # each row's queries start at its offset, k, v hold ``key_lead`` keys before them, and the boundary
    # keys and each query's document-first key come in as inputs.
    rows: bool = False
    key_lead: int = 0

    @property
    def keys(self) -> int:  # key rows of k, v
        return self.key_lead + self.length

    @property
    def q_padded(self) -> int:
        return pl.cdiv(self.length, self.block_q) * self.block_q

    @property
    def kb_padded(self) -> int:  # boundary rows of the stacked key array
        return pl.cdiv(self.num_boundaries, self.block_k) * self.block_k

    @property
    def k_padded(self) -> int:
        return pl.cdiv(self.keys, self.block_k) * self.block_k


# --- host-side block tables (static shapes, NumPy) -----------------------------------


def _pack(lists):
    """Ragged lists of block indices -> ([n, S] table padded by repeating the last entry, [n] counts)."""
    steps = max(1, max(len(x) for x in lists))
    table = np.zeros((len(lists), steps), np.int32)
    for i, x in enumerate(lists):
        if x:
            table[i, : len(x)] = x
            table[i, len(x) :] = x[-1]
    return table, np.array([len(x) for x in lists], np.int32)


def query_tables(st: _Static):
    """For each query block: the stacked-key blocks it sees (boundary blocks, then window blocks).

    Rows of longer sequences: every boundary block (which ones a row's query block sees depends on
    the row's offset: ``_document_key_block`` skips the others), then the window blocks, which in
    the row's own key rows do not depend on it."""
    bq, bk, t, vis = st.block_q, st.block_k, st.length, st.vis
    first_window = st.kb_padded // bk
    lists = []
    for q0 in range(0, st.q_padded, bq):
        last = min(q0 + bq, t) - 1
        if st.rows:
            blocks = list(range(first_window))
            window_rows = range((st.key_lead + q0 - vis.window) // bk, (st.key_lead + last) // bk + 1)
        else:
            blocks = list(range(pl.cdiv(int(vis.boundaries_seen(last)), bk)))  # boundaries the last query sees
            window_rows = range(int(vis.window_start(q0)) // bk, last // bk + 1)
        lists.append(blocks + [first_window + c for c in window_rows])
    return _pack(lists)


def key_tables(st: _Static):
    """For each stacked-key block: the query blocks that see it."""
    bq, bk, t, vis = st.block_q, st.block_k, st.length, st.vis
    nq = st.q_padded // bq
    lists = []
    for n0 in range(0, st.kb_padded, bk):
        if st.rows:  # which queries of a row see it depends on the row's offset: ``_query_span``
            lists.append(list(range(nq)) if n0 < st.num_boundaries else [])
            continue
        first = int(vis.first_query_seeing(n0)) if n0 < st.num_boundaries else t
        lists.append(list(range(first // bq, nq)) if first < t else [])
    for s0 in range(0, st.k_padded, bk):
        first = s0 - st.key_lead  # the key row s0 as a query row (the same position)
        last = min(first + bk - 1 + vis.window, t - 1)  # the last query whose window holds key row s0 + bk - 1
        seen = s0 < st.keys and last >= max(first, 0)
        lists.append(list(range(max(first, 0) // bq, last // bq + 1)) if seen else [])
    return _pack(lists)


# --- kernels ------------------------------------------------------------------------


def _visible(st: _Static, q0, u0, start=None, off=0):
    """[BQ, BK] mask of query rows q0.. against stacked-key rows u0.. (boundary or window rows);
    ``start`` [BQ, 1]: each query's document start (packed rows); ``off``: the row's offset (rows of
    longer sequences: query row i is at position off + i, key row s at off - key_lead + s)."""
    tq = off + q0 + jax.lax.broadcasted_iota(jnp.int32, (st.block_q, st.block_k), 0)
    u = u0 + jax.lax.broadcasted_iota(jnp.int32, (st.block_q, st.block_k), 1)
    boundary = (u < st.num_boundaries) & st.vis.boundary_visible(tq, u, start)
    row = u - st.kb_padded
    s = row - st.key_lead + off if st.rows else row
    window = st.vis.window_visible(tq, s, start) & (row < st.keys)
    if start is not None:
        # The first token of a document that starts inside the query block (after q0): in the window rows.
        window = window | ((s == start) & (start > off + q0) & st.vis.document_key_visible(tq, start))
    return jnp.where(u0 < st.kb_padded, boundary, window)


def _scores(st, q, k):
    return dot(q, k, st.precision, trans_b=True) * st.scale


def _mm(st, a, b):
    return dot(a, b, st.precision)


def _document_key_block(st: _Static, entry, i, first, off=0):
    """The stacked-key block that step (i, j) of a packed row fetches, for the table's ``entry``;
    ``first``: the document start of query block i's first query; ``off``: the row's offset.

    The entry where the block's documents need it; before the document's first boundary block,
    and before its first window block, the next block they do need: a block the walk fetches
    anyway, so a skipped step starts no DMA (and its compute is skipped: mapped != entry). Rows of
    longer sequences list every boundary block: those past the query block's skip to its window.
    """
    bk = st.block_k
    q0 = off + i * st.block_q
    last = off + jnp.minimum(i * st.block_q + st.block_q, st.length) - 1
    first_window = st.kb_padded // bk
    lo = _div(st.vis.first_boundary(first), bk)  # the document's first boundary block
    boundary_blocks = pl.cdiv(st.vis.boundaries_seen(last), bk)  # in the table (query_tables)
    window_lo = first_window + _div(st.vis.window_start(q0, first) - off + st.key_lead, bk)
    needed_first = jnp.where(lo < boundary_blocks, lo, window_lo)
    boundary = jnp.where(entry < lo, needed_first, entry)
    if st.rows:
        boundary = jnp.where(entry < boundary_blocks, boundary, window_lo)
    return jnp.where(entry < first_window, boundary, jnp.maximum(entry, window_lo))


def _document_key(st: _Static, q, kd, q0, first, start, off=0):
    """The first token of query block q0's first document (at ``first``, its k row ``kd`` [1, D]) for the
    queries of that document once it has left their window: (scores [BQ, 1], visible [BQ, 1])."""
    rows = q0 + jax.lax.broadcasted_iota(jnp.int32, (st.block_q, 1), 0)
    scores = jnp.sum(q.astype(jnp.float32) * kd.astype(jnp.float32), axis=1, keepdims=True) * st.scale
    visible = (start <= off + q0) & st.vis.document_key_visible(off + rows, first) & (rows < st.length)
    return scores, visible


def _prefetched_layout(st: _Static, refs):
    """The forward's and dq's scalar-prefetched layout after table and count: (firsts or None, the
    row's offset (0 for whole rows), the remaining refs)."""
    if not st.documents:
        return None, 0, refs
    if not st.rows:
        return refs[0], 0, refs[1:]
    return refs[0], refs[1][pl.program_id(0)], refs[2:]


def _fwd_kernel(table, count, *refs, st: _Static):
    """Refs: q, o [BQ, D]; k, v [BK, D] (one stacked-key block); lse [BQ, 1]; scratch m, l [BQ, 1], acc [BQ, D].
    Packed rows: firsts [B, NQ] (scalar prefetch: each query block's first document start; rows of
    longer sequences then offsets [B]), and after k, v: doc [BQ, 1] (the queries' document starts),
    kd, vd [1, D] (the first document's first token)."""
    firsts, off, refs = _prefetched_layout(st, refs)
    if st.documents:
        q_ref, k_ref, v_ref, doc_ref, kd_ref, vd_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc = refs
    else:
        q_ref, k_ref, v_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc = refs
    i, j = pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        if st.documents:  # the softmax state starts from the document's first token, where visible
            first = firsts[pl.program_id(0), i]
            s_d, visible_d = _document_key(st, q_ref[...], kd_ref[...], i * st.block_q, first, doc_ref[...], off)
            m_sc[...] = jnp.where(visible_d, s_d, _NEG)
            l_sc[...] = visible_d.astype(jnp.float32)
            acc_sc[...] = jnp.where(visible_d, vd_ref[...].astype(jnp.float32), 0.0)
        else:
            m_sc[...] = jnp.full(m_sc.shape, _NEG, jnp.float32)
            l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
            acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    run = j < count[i]
    if st.documents:  # a step before the documents' blocks fetched the next needed block: skip it
        run = run & (_document_key_block(st, table[i, j], i, firsts[pl.program_id(0), i], off) == table[i, j])

    @pl.when(run)
    def _step():
        start = doc_ref[...] if st.documents else None
        visible = _visible(st, i * st.block_q, table[i, j] * st.block_k, start, off)
        s = jnp.where(visible, _scores(st, q_ref[...], k_ref[...]), _NEG)  # [BQ, BK]
        m_prev = m_sc[...]
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        alpha = jnp.exp(m_prev - m_new)
        p = jnp.where(visible, jnp.exp(s - m_new), 0.0)
        l_sc[...] = l_sc[...] * alpha + jnp.sum(p, axis=1, keepdims=True)
        acc_sc[...] = acc_sc[...] * alpha + _mm(st, p.astype(v_ref.dtype), v_ref[...])
        m_sc[...] = m_new

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        l = l_sc[...]
        l = jnp.where(l > 0, l, 1.0)  # padded query rows see nothing
        o_ref[...] = (acc_sc[...] / l).astype(o_ref.dtype)
        lse_ref[...] = m_sc[...] + jnp.log(l)


def _dq_kernel(table, count, *refs, st: _Static):
    """Packed rows as in the forward, plus pdk, pdv [1, D] outputs (after dq): the first-token term's
    dk, dv of this query block and head, summed over the block's first document."""
    firsts, off, refs = _prefetched_layout(st, refs)
    if st.documents:
        q_ref, k_ref, v_ref, doc_ref, kd_ref, vd_ref, do_ref, lse_ref, delta_ref, dq_ref, pdk_ref, pdv_ref = refs[:-1]
    else:
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref = refs[:-1]
    dq_sc = refs[-1]
    i, j = pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        if st.documents:
            first = firsts[pl.program_id(0), i]
            q, do, kd = q_ref[...], do_ref[...], kd_ref[...].astype(jnp.float32)
            s_d, visible_d = _document_key(st, q, kd, i * st.block_q, first, doc_ref[...], off)
            p_d = jnp.where(visible_d, jnp.exp(s_d - lse_ref[...]), 0.0)  # [BQ, 1]
            dp_d = jnp.sum(do.astype(jnp.float32) * vd_ref[...].astype(jnp.float32), axis=1, keepdims=True)
            ds_d = p_d * (dp_d - delta_ref[...])
            dq_sc[...] = ds_d * kd
            pdk_ref[...] = jnp.sum(ds_d * q.astype(jnp.float32), axis=0, keepdims=True) * st.scale
            pdv_ref[...] = jnp.sum(p_d * do.astype(jnp.float32), axis=0, keepdims=True)
        else:
            dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

    run = j < count[i]
    if st.documents:  # a step before the documents' blocks fetched the next needed block: skip it
        run = run & (_document_key_block(st, table[i, j], i, firsts[pl.program_id(0), i], off) == table[i, j])

    @pl.when(run)
    def _step():
        start = doc_ref[...] if st.documents else None
        visible = _visible(st, i * st.block_q, table[i, j] * st.block_k, start, off)
        k = k_ref[...]
        p = jnp.where(visible, jnp.exp(_scores(st, q_ref[...], k) - lse_ref[...]), 0.0)
        dp = dot(do_ref[...], v_ref[...], st.precision, trans_b=True)
        ds = p * (dp - delta_ref[...])
        dq_sc[...] += _mm(st, ds.astype(k.dtype), k)

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        dq_ref[...] = (dq_sc[...] * st.scale).astype(dq_ref.dtype)


def _dkv_kernel(table, count, *refs, st: _Static, steps: int):
    """One stacked-key block c; the last grid axis walks (query head of the group, query block).

    Refs: q, do [BQ, D]; lse, delta [BQ, 1]; k, v [BK, D]; dk, dv [BK, D]; scratch dk, dv. Packed rows:
    query_end [B, NKB] (scalar prefetch: per key block, the query blocks after the end of the last
    document holding its keys are skipped), and doc [BQ, 1] (the queries' document starts) after delta.
    """
    off = 0
    if st.rows:
        query_end, offsets, q_ref, do_ref, lse_ref, delta_ref, doc_ref, k_ref, v_ref, dk_ref, dv_ref, dk_sc, dv_sc = (
            refs
        )
        off = offsets[pl.program_id(0)]
    elif st.documents:
        query_end, q_ref, do_ref, lse_ref, delta_ref, doc_ref, k_ref, v_ref, dk_ref, dv_ref, dk_sc, dv_sc = refs
    else:
        q_ref, do_ref, lse_ref, delta_ref, k_ref, v_ref, dk_ref, dv_ref, dk_sc, dv_sc = refs
    c, j = pl.program_id(2), pl.program_id(3)
    step = jax.lax.rem(j, jnp.int32(steps))  # j >= 0: truncating ops (no sign fix-ups in Mosaic)

    @pl.when(j == 0)
    def _init():
        dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

    run = step < count[c]
    if st.rows:
        begin, end = _query_span(st, c, query_end[pl.program_id(0), c], off)
        run = run & (table[c, step] >= begin) & (table[c, step] < end)
    elif st.documents:
        run = run & (table[c, step] < query_end[pl.program_id(0), c])

    @pl.when(run)
    def _step():
        start = doc_ref[...] if st.documents else None
        visible = _visible(st, table[c, step] * st.block_q, c * st.block_k, start, off)  # [BQ, BK]
        q, do = q_ref[...], do_ref[...]
        p = jnp.where(visible, jnp.exp(_scores(st, q, k_ref[...]) - lse_ref[...]), 0.0)
        dv_sc[...] += _mm(st, p.T.astype(do.dtype), do)
        dp = dot(do, v_ref[...], st.precision, trans_b=True)
        ds = p * (dp - delta_ref[...])
        dk_sc[...] += _mm(st, ds.T.astype(q.dtype), q)

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        dk_ref[...] = dk_sc[...] * st.scale
        dv_ref[...] = dv_sc[...]


def _query_span(st: _Static, c, query_end, off):
    """Rows of longer sequences: the query blocks [begin, end) that stacked-key block ``c`` needs
    (``key_tables`` lists every query block for a boundary block): for a boundary block, from the
    first query that sees its first boundary to ``query_end``; a window block's table is exact but
    for blocks of keys below position 0 (the first slice's), which none sees."""
    nq, nbb = st.q_padded // st.block_q, st.kb_padded // st.block_k
    first_seeing = st.vis.first_query_seeing(jnp.minimum(c, nbb) * st.block_k)
    begin = jnp.minimum(_div(jnp.maximum(first_seeing - off, 0), st.block_q), nq)
    last_key = off - st.key_lead + (c - nbb + 1) * st.block_k - 1  # of a window block
    boundary = c < nbb
    return jnp.where(boundary, begin, jnp.where(last_key < 0, nq, 0)), jnp.where(boundary, query_end, nq)


# --- launches ------------------------------------------------------------------------


_PARAMS = mosaic_params(("parallel", "parallel", "parallel", "arbitrary"))


def _head_major(a, length):
    """[B, T, H, D] -> [B, H, length, D], zero padded."""
    return jnp.pad(jnp.swapaxes(a, 1, 2), ((0, 0), (0, 0), (0, length - a.shape[1]), (0, 0)))


def _stacked_keys(st: _Static, k, kb=None):
    """[B, T, Hkv, D] -> [B, Hkv, NBp + Tkp, D]: boundary rows, then the sequence (``kb`` [B, NB, Hkv,
    D]: the boundary keys given, for rows of longer sequences; else gathered from k)."""
    if kb is None:
        (kb,) = gather_boundaries(st.vis.grid, k)
    return jnp.concatenate([_head_major(kb, st.kb_padded), _head_major(k, st.k_padded)], axis=2)


def _query_grid_specs(st: _Static, d: int, r: int):
    """BlockSpecs of the forward and dq grids (bi, hi, i, j; scalar prefetch table, count and, for
    packed rows, firsts, then for rows of longer sequences offsets): query rows, stacked-key blocks
    (packed rows: ``_document_key_block``), query columns."""
    qs = pl.BlockSpec((None, None, st.block_q, d), lambda bi, hi, i, j, tab, cnt: (bi, hi, i, 0))
    ks = pl.BlockSpec(
        (None, None, st.block_k, d), lambda bi, hi, i, j, tab, cnt: (bi, jax.lax.div(hi, jnp.int32(r)), tab[i, j], 0)
    )
    col = pl.BlockSpec((None, None, st.block_q, 1), lambda bi, hi, i, j, tab, cnt: (bi, hi, i, 0))
    if not st.documents:
        return qs, ks, col
    extra = 2 if st.rows else 1
    ignore_layout = lambda spec: pl.BlockSpec(spec.block_shape, lambda *ix, f=spec.index_map: f(*ix[:-extra]))
    ks = pl.BlockSpec(
        (None, None, st.block_k, d),
        lambda bi, hi, i, j, tab, cnt, fi, *offs: (
            bi,
            jax.lax.div(hi, jnp.int32(r)),
            _document_key_block(st, tab[i, j], i, fi[bi, i], offs[0][bi] if offs else 0),
            0,
        ),
    )
    return ignore_layout(qs), ks, ignore_layout(col)


def _document_inputs(st: _Static, layout, inputs, r):
    """Packed rows, for the forward and dq grids: the scalar prefetch (the first document start of each
    query block, firsts [B, NQ]; rows of longer sequences then their offsets [B]); the inputs after k,
    v: the queries' document starts [B, Tp, 1] (padded rows continue the last document), and the first
    document keys and values: at the multiples of K, where documents start, [B, Hkv, ceil(T/K), 1, D]
    (the block of query block i's first document), or given per query for rows of longer sequences
    (that of each query block's first query, [B, Hkv, NQ, 1, D]); their BlockSpecs."""
    t, kk, bq = st.length, st.vis.grid.token_chunk, st.block_q
    documents, offsets = layout if st.rows else (layout, None)
    k, v = inputs[5:7] if st.rows else inputs[1:3]
    firsts = documents[:, ::bq]
    column = jnp.pad(documents, ((0, 0), (0, st.q_padded - t)), mode="edge")[..., None]
    step = bq if st.rows else kk
    at_starts = lambda a: jnp.swapaxes(a[:, ::step], 1, 2)[:, :, :, None, :]
    column_spec = pl.BlockSpec((None, st.block_q, 1), lambda bi, hi, i, j, tab, cnt, fi, *_: (bi, i, 0))
    key_block = (lambda bi, i, fi: i) if st.rows else (lambda bi, i, fi: jax.lax.div(fi[bi, i], jnp.int32(kk)))
    key_spec = pl.BlockSpec(
        (None, None, None, 1, k.shape[-1]),
        lambda bi, hi, i, j, tab, cnt, fi, *_: (bi, jax.lax.div(hi, jnp.int32(r)), key_block(bi, i, fi), 0, 0),
    )
    prefetch = (firsts,) if offsets is None else (firsts, offsets)
    return prefetch, (column, at_starts(k), at_starts(v)), [column_spec, key_spec, key_spec]


def _keys(st: _Static, inputs):
    """The stacked keys and values of the inputs."""
    q, k, v = inputs[:3]
    kb, vb = inputs[3:5] if st.rows else (None, None)
    return _stacked_keys(st, k, kb), _stacked_keys(st, v, vb)


def _forward(st: _Static, inputs, layout, interpret):
    """-> o [B, T, H, D], lse [B, H, Tp, 1] (natural log). ``inputs``: (q, k, v), or for rows of longer
    sequences (q, k, v, kb, vb, kd, vd); ``layout``: None, the [B, T] int32 document starts, or
    (starts, offsets [B]) for such rows."""
    q = inputs[0]
    b, t, h, d = q.shape
    r = h // inputs[1].shape[2]
    table, count = query_tables(st)
    qs, ks, col = _query_grid_specs(st, d, r)
    f32 = jnp.float32
    prefetch, in_specs = (jnp.asarray(table), jnp.asarray(count)), [qs, ks, ks]
    kernel_inputs = (_head_major(q, st.q_padded), *_keys(st, inputs))
    if st.documents:
        doc_prefetch, doc_inputs, doc_specs = _document_inputs(st, layout, inputs, r)
        prefetch, in_specs, kernel_inputs = prefetch + doc_prefetch, in_specs + doc_specs, kernel_inputs + doc_inputs
    spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=len(prefetch),
        grid=(b, h, table.shape[0], table.shape[1]),
        in_specs=in_specs,
        out_specs=(qs, col),
        scratch_shapes=[
            pltpu.VMEM((st.block_q, 1), f32),
            pltpu.VMEM((st.block_q, 1), f32),
            pltpu.VMEM((st.block_q, d), f32),
        ],
    )
    o, lse = pl.pallas_call(
        functools.partial(_fwd_kernel, st=st),
        grid_spec=spec,
        out_shape=(
            jax.ShapeDtypeStruct((b, h, st.q_padded, d), q.dtype),
            jax.ShapeDtypeStruct((b, h, st.q_padded, 1), f32),
        ),
        compiler_params=_PARAMS,
        interpret=interpret,
        name="boundary_window_attention_fwd",
    )(*prefetch, *kernel_inputs)
    return jnp.swapaxes(o[:, :, :t], 1, 2), lse


def _backward(st: _Static, inputs, layout, o, lse, do, interpret):
    """The gradients of ``_forward``'s ``inputs``."""
    q, k = inputs[:2]
    b, t, h, d = q.shape
    hkv = k.shape[2]
    r = h // hkv
    f32 = jnp.float32
    qh, doh = _head_major(q, st.q_padded), _head_major(do, st.q_padded)
    kst, vst = _keys(st, inputs)
    delta = jnp.einsum("bthd,bthd->bht", o.astype(f32), do.astype(f32))
    delta = jnp.pad(delta, ((0, 0), (0, 0), (0, st.q_padded - t)))[..., None]  # [B, H, Tp, 1]

    table, count = query_tables(st)
    qs, ks, col = _query_grid_specs(st, d, r)
    if st.documents:
        doc_prefetch, doc_inputs, doc_specs = _document_inputs(st, layout, inputs, r)
        nq = table.shape[0]
        partial = jax.ShapeDtypeStruct((b, h, nq, 1, d), f32)
        partial_spec = pl.BlockSpec((None, None, None, 1, d), lambda bi, hi, i, j, tab, cnt, fi, *_: (bi, hi, i, 0, 0))
        dq, pdk, pdv = pl.pallas_call(
            functools.partial(_dq_kernel, st=st),
            grid_spec=pltpu.PrefetchScalarGridSpec(
                num_scalar_prefetch=2 + len(doc_prefetch),
                grid=(b, h, table.shape[0], table.shape[1]),
                in_specs=[qs, ks, ks, *doc_specs, qs, col, col],
                out_specs=(qs, partial_spec, partial_spec),
                scratch_shapes=[pltpu.VMEM((st.block_q, d), f32)],
            ),
            out_shape=(jax.ShapeDtypeStruct(qh.shape, q.dtype), partial, partial),
            compiler_params=_PARAMS,
            interpret=interpret,
            name="boundary_window_attention_dq",
        )(jnp.asarray(table), jnp.asarray(count), *doc_prefetch, qh, kst, vst, *doc_inputs, doh, lse, delta)
    else:
        dq = pl.pallas_call(
            functools.partial(_dq_kernel, st=st),
            grid_spec=pltpu.PrefetchScalarGridSpec(
                num_scalar_prefetch=2,
                grid=(b, h, table.shape[0], table.shape[1]),
                in_specs=[qs, ks, ks, qs, col, col],
                out_specs=qs,
                scratch_shapes=[pltpu.VMEM((st.block_q, d), f32)],
            ),
            out_shape=jax.ShapeDtypeStruct(qh.shape, q.dtype),
            compiler_params=_PARAMS,
            interpret=interpret,
            name="boundary_window_attention_dq",
        )(jnp.asarray(table), jnp.asarray(count), qh, kst, vst, doh, lse, delta)

    ktab, kcount = key_tables(st)
    steps = ktab.shape[1]

    # Last grid axis: (query head of the kv group) x (query block step).
    def q_of(bi, j_, c, s, tab, cnt, *layout_refs):
        head, step = jax.lax.div(s, jnp.int32(steps)), jax.lax.rem(s, jnp.int32(steps))
        if st.rows:  # outside the needed query blocks, stay on the nearest one (no new DMA)
            query_end, offsets = layout_refs
            begin, end = _query_span(st, c, query_end[bi, c], offsets[bi])
            last = jnp.minimum(jnp.maximum(end - 1, begin), st.q_padded // st.block_q - 1)
            return bi, j_ * r + head, jnp.minimum(jnp.maximum(tab[c, step], begin), last), 0
        if layout_refs:  # packed rows: past the last needed query block, stay on it (no new DMA)
            query_end = layout_refs[0]
            return bi, j_ * r + head, jnp.maximum(jnp.minimum(tab[c, step], query_end[bi, c] - 1), tab[c, 0]), 0
        return bi, j_ * r + head, tab[c, step], 0

    qg = pl.BlockSpec((None, None, st.block_q, d), q_of)
    colg = pl.BlockSpec((None, None, st.block_q, 1), q_of)
    own = pl.BlockSpec((None, None, st.block_k, d), lambda bi, j_, c, s, tab, cnt, *_: (bi, j_, c, 0))
    prefetch, in_specs, kernel_inputs = (
        (jnp.asarray(ktab), jnp.asarray(kcount)),
        [qg, qg, colg, colg],
        (qh, doh, lse, delta),
    )
    if st.documents:

        def doc_of(*ix):
            bi, _, block, _ = q_of(*ix)
            return bi, block, 0

        doc_g = pl.BlockSpec((None, st.block_q, 1), doc_of)
        prefetch += (_query_ends(st, layout),) + ((layout[1],) if st.rows else ())
        in_specs.append(doc_g)
        kernel_inputs += doc_inputs[:1]  # the queries' document starts
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, st=st, steps=steps),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=len(prefetch),
            grid=(b, hkv, ktab.shape[0], r * steps),
            in_specs=[*in_specs, own, own],
            out_specs=(own, own),
            scratch_shapes=[pltpu.VMEM((st.block_k, d), f32), pltpu.VMEM((st.block_k, d), f32)],
        ),
        out_shape=(jax.ShapeDtypeStruct(kst.shape, f32),) * 2,
        compiler_params=_PARAMS,
        interpret=interpret,
        name="boundary_window_attention_dkv",
    )(*prefetch, *kernel_inputs, kst, vst)

    nb, nbp = st.num_boundaries, st.kb_padded
    seq = lambda g: jnp.swapaxes(g[:, :, nbp : nbp + st.keys], 1, 2)  # [B, keys, Hkv, D]
    boundaries = lambda g: jnp.swapaxes(g[:, :, :nb], 1, 2)  # [B, NB, Hkv, D]
    # The first-token terms of the query blocks' first documents, per kv head [B, NQ, Hkv, D].
    per_block = lambda partial: jnp.swapaxes(jnp.sum(partial[:, :, :, 0].reshape(b, hkv, r, -1, d), axis=2), 1, 2)
    dq = jnp.swapaxes(dq[:, :, :t], 1, 2)
    if st.rows:  # the given keys' gradients: boundary rows, and each query block's first document key
        firsts_rows = lambda partial: jnp.zeros((b, t, hkv, d), f32).at[:, :: st.block_q].set(per_block(partial))
        grads = (dq, seq(dk), seq(dv), boundaries(dk), boundaries(dv), firsts_rows(pdk), firsts_rows(pdv))
        return tuple(g.astype(x.dtype) for g, x in zip(grads, inputs))

    def unstack(g, like, partial=None):
        folded = add_at_boundaries(st.vis.grid, seq(g), boundaries(g))
        if partial is not None:  # the first-token terms of the query blocks' first documents
            folded = folded.at[jnp.arange(b)[:, None], doc_prefetch[0]].add(per_block(partial))
        return folded.astype(like.dtype)  # [B, T, Hkv, D]

    if st.documents:
        return dq, unstack(dk, k, pdk), unstack(dv, inputs[2], pdv)
    return dq, unstack(dk, k), unstack(dv, inputs[2])


def _query_ends(st: _Static, layout) -> jax.Array:
    """[B, NKB] int32: per stacked-key block, the query blocks it needs end before this one: for a
    boundary block, the block after the end of the last document holding its boundaries; for a
    window block, all of them (its table is short). ``layout`` as ``_forward``'s."""
    documents, offsets = layout if st.rows else (layout, None)
    nq, bk = st.q_padded // st.block_q, st.block_k
    n_last = np.minimum(np.arange(0, st.kb_padded, bk) + bk, st.num_boundaries) - 1  # every block holds one
    ends = next_starts(documents, st.vis.grid.position(n_last) + 1, st.vis.grid.token_chunk, offsets)
    if offsets is not None:  # positions -> the row's query rows
        ends = ends - offsets[:, None]
    boundary = pl.cdiv(ends, st.block_q)
    window = jnp.full((documents.shape[0], st.k_padded // bk), nq, jnp.int32)
    return jnp.concatenate([boundary.astype(jnp.int32), window], axis=1)


_attention = flash_vjp(_forward, _backward)


def make_static(q, grid: ChunkGrid, window: int, blocks: TpuBlocks | None = None, documents: bool = False) -> _Static:
    t, d = q.shape[1], q.shape[3]
    blocks = blocks or TpuBlocks()
    return _Static(
        length=t,
        num_boundaries=grid.num_boundaries(t),
        vis=Visibility(grid, window),
        scale=d**-0.5,
        block_q=blocks.block_q,
        block_k=blocks.block_k,
        precision=matmul_precision(q.dtype),
        documents=documents,
    )


def attention_pallas_tpu(
    q, k, v, *, grid: ChunkGrid, window: int, document_start=None, interpret=False, blocks: TpuBlocks | None = None
):
    """Same contract as ``reference.attention_dense``; differentiable in q, k, v.

    Args:
      q: [B, T, H, D]; k, v: [B, T, Hkv, D] with H % Hkv == 0.
      grid, window: the layer's chunk grid and W.
      document_start: [B, T] int, each token's document start, documents at multiples of K
        (``pallas_kernels.documents``); None: each row is one document.
      interpret: False, or a ``pltpu.InterpretParams`` (``common.tpu_interpret_params``: on the CPU).
      blocks: tile sizes (default: ``block_sizes.TpuBlocks()``).

    Returns:
      [B, T, H, D] in q.dtype.
    """
    st = make_static(q, grid, window, blocks, documents=document_start is not None)
    documents = None if document_start is None else jnp.asarray(document_start, jnp.int32)
    return _attention(st, (q, k, v), documents, interpret)


def attention_of_rows_pallas_tpu(
    q, k, v, boundaries, documents, *, grid: ChunkGrid, window: int, row_offset, interpret=False, blocks=None
):
    """Same contract as ``xla.attention_of_rows`` (rows that are slices of longer sequences, with
    their boundary and document-first keys given), ``documents`` required; differentiable in q, k,
    v and the given keys. Each row's queries start at its offset, a multiple of K.

    Args:
      interpret, blocks: as ``attention_pallas_tpu``.
    """
    if documents is None:
        raise ValueError("attention_of_rows_pallas_tpu: the rows' documents (kd, vd, starts) are required")
    kb, vb = boundaries
    kd, vd, starts = documents
    lead = k.shape[1] - q.shape[1]
    if lead < window:
        raise ValueError(f"attention_of_rows_pallas_tpu: k holds {lead} keys before the queries, fewer than W={window}")
    st = dataclasses.replace(
        make_static(q, grid, window, blocks, documents=True), num_boundaries=kb.shape[1], rows=True, key_lead=lead
    )
    offsets = jnp.broadcast_to(jnp.asarray(row_offset, jnp.int32), (q.shape[0],))
    return _attention(st, (q, k, v, kb, vb, kd, vd), (jnp.asarray(starts, jnp.int32), offsets), interpret)
