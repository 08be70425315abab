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
from pallas_kernels.visibility import Visibility

_NEG = -1e30


@dataclasses.dataclass(frozen=True)
class _Static:
    length: int  # T
    num_boundaries: int  # NB
    vis: Visibility  # the grid and W
    scale: float
    block_q: int
    block_k: int
    precision: jax.lax.Precision | None  # exact float32 matmuls for float32 inputs

    @property
    def q_padded(self) -> int:
        return pl.cdiv(self.length, self.block_q) * self.block_q

    @property
    def kb_padded(self) -> int:  # boundary rows of the stacked key array
        return pl.cdiv(self.num_boundaries, self.block_k) * self.block_k

    @property
    def k_padded(self) -> int:
        return pl.cdiv(self.length, self.block_k) * self.block_k


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
    """For each query block: the stacked-key blocks it sees (boundary blocks, then window blocks)."""
    bq, bk, t, vis = st.block_q, st.block_k, st.length, st.vis
    first_window = st.kb_padded // bk
    lists = []
    for q0 in range(0, st.q_padded, bq):
        last = min(q0 + bq, t) - 1
        blocks = list(range(pl.cdiv(int(vis.boundaries_seen(last)), bk)))  # boundaries the last query sees
        blocks += [first_window + c for c in range(int(vis.window_start(q0)) // bk, last // bk + 1)]
        lists.append(blocks)
    return _pack(lists)


def key_tables(st: _Static):
    """For each stacked-key block: the query blocks that see it."""
    bq, bk, t, vis = st.block_q, st.block_k, st.length, st.vis
    nq = st.q_padded // bq
    lists = []
    for n0 in range(0, st.kb_padded, bk):
        first = int(vis.first_query_seeing(n0)) if n0 < st.num_boundaries else t
        lists.append(list(range(first // bq, nq)) if first < t else [])
    for s0 in range(0, st.k_padded, bk):
        last = min(s0 + bk - 1 + vis.window, t - 1)  # the last query whose window holds key s0 + bk - 1
        lists.append(list(range(s0 // bq, last // bq + 1)) if s0 < t else [])
    return _pack(lists)


# --- kernels ------------------------------------------------------------------------


def _visible(st: _Static, q0, u0):
    """[BQ, BK] mask of query rows q0.. against stacked-key rows u0.. (boundary or window rows)."""
    tq = q0 + jax.lax.broadcasted_iota(jnp.int32, (st.block_q, st.block_k), 0)
    u = u0 + jax.lax.broadcasted_iota(jnp.int32, (st.block_q, st.block_k), 1)
    boundary = (u < st.num_boundaries) & st.vis.boundary_visible(tq, u)
    s = u - st.kb_padded
    window = st.vis.window_visible(tq, s) & (s < st.length)
    return jnp.where(u0 < st.kb_padded, boundary, window)


def _scores(st, q, k):
    return dot(q, k, st.precision, trans_b=True) * st.scale


def _mm(st, a, b):
    return dot(a, b, st.precision)


def _fwd_kernel(table, count, q_ref, k_ref, v_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc, *, st: _Static):
    """Refs: q, o [BQ, D]; k, v [BK, D] (one stacked-key block); lse [BQ, 1]; scratch m, l [BQ, 1], acc [BQ, D]."""
    i, j = pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, _NEG, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    @pl.when(j < count[i])
    def _step():
        visible = _visible(st, i * st.block_q, table[i, j] * st.block_k)
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


def _dq_kernel(table, count, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, dq_sc, *, st: _Static):
    i, j = pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

    @pl.when(j < count[i])
    def _step():
        visible = _visible(st, i * st.block_q, table[i, j] * st.block_k)
        k = k_ref[...]
        p = jnp.where(visible, jnp.exp(_scores(st, q_ref[...], k) - lse_ref[...]), 0.0)
        dp = dot(do_ref[...], v_ref[...], st.precision, trans_b=True)
        ds = p * (dp - delta_ref[...])
        dq_sc[...] += _mm(st, ds.astype(k.dtype), k)

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        dq_ref[...] = (dq_sc[...] * st.scale).astype(dq_ref.dtype)


def _dkv_kernel(
    table,
    count,
    q_ref,
    do_ref,
    lse_ref,
    delta_ref,
    k_ref,
    v_ref,
    dk_ref,
    dv_ref,
    dk_sc,
    dv_sc,
    *,
    st: _Static,
    steps: int,
):
    """One stacked-key block c; the last grid axis walks (query head of the group, query block)."""
    c, j = pl.program_id(2), pl.program_id(3)
    step = jax.lax.rem(j, jnp.int32(steps))  # j >= 0: truncating ops (no sign fix-ups in Mosaic)

    @pl.when(j == 0)
    def _init():
        dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

    @pl.when(step < count[c])
    def _step():
        visible = _visible(st, table[c, step] * st.block_q, c * st.block_k)  # [BQ, BK]
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


# --- launches ------------------------------------------------------------------------


_PARAMS = mosaic_params(("parallel", "parallel", "parallel", "arbitrary"))


def _head_major(a, length):
    """[B, T, H, D] -> [B, H, length, D], zero padded."""
    return jnp.pad(jnp.swapaxes(a, 1, 2), ((0, 0), (0, 0), (0, length - a.shape[1]), (0, 0)))


def _stacked_keys(st: _Static, k):
    """[B, T, Hkv, D] -> [B, Hkv, NBp + Tkp, D]: boundary rows, then the sequence."""
    (kb,) = gather_boundaries(st.vis.grid, k)
    return jnp.concatenate([_head_major(kb, st.kb_padded), _head_major(k, st.k_padded)], axis=2)


def _forward(st: _Static, q, k, v, interpret):
    """-> o [B, T, H, D], lse [B, H, Tp, 1] (natural log)."""
    b, t, h, d = q.shape
    r = h // k.shape[2]
    table, count = query_tables(st)
    qs = pl.BlockSpec((None, None, st.block_q, d), lambda bi, hi, i, j, tab, cnt: (bi, hi, i, 0))
    ks = pl.BlockSpec(
        (None, None, st.block_k, d), lambda bi, hi, i, j, tab, cnt: (bi, jax.lax.div(hi, jnp.int32(r)), tab[i, j], 0)
    )
    col = pl.BlockSpec((None, None, st.block_q, 1), lambda bi, hi, i, j, tab, cnt: (bi, hi, i, 0))
    f32 = jnp.float32
    spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(b, h, table.shape[0], table.shape[1]),
        in_specs=[qs, ks, ks],
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
    )(jnp.asarray(table), jnp.asarray(count), _head_major(q, st.q_padded), _stacked_keys(st, k), _stacked_keys(st, v))
    return jnp.swapaxes(o[:, :, :t], 1, 2), lse


def _backward(st: _Static, q, k, v, o, lse, do, interpret):
    b, t, h, d = q.shape
    hkv = k.shape[2]
    r = h // hkv
    f32 = jnp.float32
    qh, doh = _head_major(q, st.q_padded), _head_major(do, st.q_padded)
    kst, vst = _stacked_keys(st, k), _stacked_keys(st, v)
    delta = jnp.einsum("bthd,bthd->bht", o.astype(f32), do.astype(f32))
    delta = jnp.pad(delta, ((0, 0), (0, 0), (0, st.q_padded - t)))[..., None]  # [B, H, Tp, 1]

    table, count = query_tables(st)
    qs = pl.BlockSpec((None, None, st.block_q, d), lambda bi, hi, i, j, tab, cnt: (bi, hi, i, 0))
    ks = pl.BlockSpec(
        (None, None, st.block_k, d), lambda bi, hi, i, j, tab, cnt: (bi, jax.lax.div(hi, jnp.int32(r)), tab[i, j], 0)
    )
    col = pl.BlockSpec((None, None, st.block_q, 1), lambda bi, hi, i, j, tab, cnt: (bi, hi, i, 0))
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
    def q_of(bi, j_, c, s, tab, cnt):
        head, step = jax.lax.div(s, jnp.int32(steps)), jax.lax.rem(s, jnp.int32(steps))
        return bi, j_ * r + head, tab[c, step], 0

    qg = pl.BlockSpec((None, None, st.block_q, d), q_of)
    colg = pl.BlockSpec((None, None, st.block_q, 1), q_of)
    own = pl.BlockSpec((None, None, st.block_k, d), lambda bi, j_, c, s, tab, cnt: (bi, j_, c, 0))
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, st=st, steps=steps),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(b, hkv, ktab.shape[0], r * steps),
            in_specs=[qg, qg, colg, colg, own, own],
            out_specs=(own, own),
            scratch_shapes=[pltpu.VMEM((st.block_k, d), f32), pltpu.VMEM((st.block_k, d), f32)],
        ),
        out_shape=(jax.ShapeDtypeStruct(kst.shape, f32),) * 2,
        compiler_params=_PARAMS,
        interpret=interpret,
        name="boundary_window_attention_dkv",
    )(jnp.asarray(ktab), jnp.asarray(kcount), qh, doh, lse, delta, kst, vst)

    nb, nbp = st.num_boundaries, st.kb_padded

    def unstack(g, like):
        seq = add_at_boundaries(
            st.vis.grid, jnp.swapaxes(g[:, :, nbp : nbp + t], 1, 2), jnp.swapaxes(g[:, :, :nb], 1, 2)
        )
        return seq.astype(like.dtype)  # [B, T, Hkv, D]

    return jnp.swapaxes(dq[:, :, :t], 1, 2), unstack(dk, k), unstack(dv, v)


_attention = flash_vjp(_forward, _backward)


def make_static(q, grid: ChunkGrid, window: int, blocks: TpuBlocks | None = None) -> _Static:
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
    )


def attention_pallas_tpu(q, k, v, *, grid: ChunkGrid, window: int, interpret=False, blocks: TpuBlocks | None = None):
    """Same contract as ``reference.attention_dense``; differentiable in q, k, v.

    Args:
      q: [B, T, H, D]; k, v: [B, T, Hkv, D] with H % Hkv == 0.
      grid, window: the layer's chunk grid and W.
      interpret: False, or a ``pltpu.InterpretParams`` (``common.tpu_interpret_params``: on the CPU).
      blocks: tile sizes (default: ``block_sizes.TpuBlocks()``).

    Returns:
      [B, T, H, D] in q.dtype.
    """
    return _attention(make_static(q, grid, window, blocks), q, k, v, interpret)
