"""Chunk-reset SSD as a Pallas kernel for TPUs (Mosaic), forward and backward.

Same algorithm as ``pallas_gpu``: one program per block of L tokens (L a multiple of
K, 128 by default: one MXU pass and one lane row of ``dt``), each block a masked
[L, L] SSD matmul per head. Mosaic wants whole, aligned (8, 128) tiles, so the
wrapper lays the inputs out head-major and pads the sequence by ``o`` in front (the
blocks then start on chunk starts) and to a multiple of L behind; zero padding is
inert (dt = 0, x = 0). Everything stays 2-D inside the kernel ([L, 1] columns and
[1, L] rows) because Mosaic vectors are (sublane, lane) tiles.

Packed documents (``document_start``, every document starting at a multiple of K:
``pallas_kernels.documents``) travel as one more input, [B, 1, Tp] int32 (padding
continues its neighbour's document), read as one [1, L] lane row per block. As on the
GPU the mask becomes M_ij = [r_i <= j <= i] (r = ``ChunkGrid.chunk_start_in_document``,
inside i's row chunk), built from c = pos - r < K: ``i - c_i <= j <= i``, with c read as a
row for the transposed mask and as a column for the mask (one [L, L] select and lane sum
per block, exact in float32), in place of the two [L, L] ``chunk_id`` evaluations. Both
cumsums are masked sums, so each document gets its own and a document's outputs depend on
its own inputs alone, bit for bit. Without documents the kernels are the code they were
before.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.chunk_grid import ChunkGrid
from pallas_kernels.common import dot, matmul_precision, mosaic_params
from pallas_kernels.ssd.block_sizes import TpuBlocks, default_tpu_blocks


class _Block:
    """Masks of one L-token block whose first padded position is ``m * L`` (token ``m*L - o``).

    ``document_start``: None, or the block's [1, L] int32 document starts; then key j counts for
    query i from the start of i's chunk in i's document, ``r_i <= j <= i``, which is
    ``i - c_i <= j <= i`` with ``c = pos - r`` (< K) read as a column for the mask and as a row
    for its transpose."""

    def __init__(self, m, length: int, grid: ChunkGrid, document_start=None):
        i = jax.lax.broadcasted_iota(jnp.int32, (length, length), 0)
        j = jax.lax.broadcasted_iota(jnp.int32, (length, length), 1)
        start = grid.block_start(m, length)
        if document_start is None:
            cid_i, cid_j = grid.chunk_id(start + i), grid.chunk_id(start + j)  # positions < 0: front padding
            self.mask = (cid_i == cid_j) & (j <= i)  # [L, L] same chunk, key not after query
            self.mask_t = (cid_j == cid_i) & (i <= j)  # the transpose, built directly
            self.eye = i == j
            return
        self.eye = i == j
        pos = start + jax.lax.broadcasted_iota(jnp.int32, (1, length), 1)  # [1, L]
        # Distance from the last restart (front padding, pos < 0: 0, a chunk of its own).
        c_row = jnp.maximum(pos - grid.chunk_start_in_document(pos, document_start), 0)
        c_col = self.column(c_row.astype(jnp.float32)).astype(jnp.int32)  # [L, 1], exact (< K)
        self.mask = (j <= i) & (j >= i - c_col)
        self.mask_t = (i <= j) & (i >= j - c_row)

    def column(self, row):
        """[1, L] -> [L, 1] without a relayout-heavy transpose."""
        return jnp.sum(jnp.where(self.eye, row, 0.0), axis=1, keepdims=True)

    def decay(self, a_row):
        """exp(cum_i - cum_j) on the chunk mask, 0 elsewhere.  a_row: [1, L] = dt * A."""
        a_col = self.column(a_row)
        cum_col = jnp.sum(jnp.where(self.mask, a_row, 0.0), axis=1, keepdims=True)  # [L, 1]
        cum_row = jnp.sum(jnp.where(self.mask_t, a_col, 0.0), axis=0, keepdims=True)  # [1, L]
        return jnp.exp(jnp.where(self.mask, cum_col - cum_row, -jnp.inf))


def _block(ds_ref, dt_ref, grid: ChunkGrid) -> _Block:
    """This program's block; ``ds_ref``: None or the block's [1, L] document starts (one load)."""
    return _Block(pl.program_id(1), dt_ref.shape[-1], grid, None if ds_ref is None else ds_ref[...])


def _document_ref(refs, documents: bool):
    """-> (the document starts' ref, the others): with documents it comes first."""
    return (refs[0], refs[1:]) if documents else (None, refs)


def _fwd_kernel(*refs, grid, heads, groups, precision, documents):
    """Refs (batch row and block squeezed): x, y [H, L, P]; dt [H, L]; B, C [G, L, N]; A, D [H] in
    SMEM; with documents, ``document_start`` [1, L] first."""
    ds_ref, (x_ref, dt_ref, a_ref, b_ref, c_ref, d_ref, y_ref) = _document_ref(refs, documents)
    blk = _block(ds_ref, dt_ref, grid)
    per_group = heads // groups
    for g in range(groups):
        bg, cg = b_ref[g], c_ref[g]  # [L, N]
        cb = dot(cg, bg, precision, trans_b=True)  # [L, L]
        for h in range(g * per_group, (g + 1) * per_group):
            dt = dt_ref[pl.ds(h, 1), :].astype(jnp.float32)  # [1, L]
            x = x_ref[h]  # [L, P]
            w = cb * blk.decay(dt * a_ref[h]) * dt
            y = dot(w.astype(x.dtype), x, precision) + d_ref[h] * x.astype(jnp.float32)
            y_ref[h] = y.astype(y_ref.dtype)


def _bwd_kernel(*refs, grid, heads, groups, precision, documents):
    """dA, dD: [1, H] per-block partial sums; other refs as in the forward."""
    ds_ref, refs = _document_ref(refs, documents)
    x_ref, dt_ref, a_ref, b_ref, c_ref, d_ref, dy_ref, dx_ref, ddt_ref, db_ref, dc_ref, da_ref, dd_ref = refs
    blk = _block(ds_ref, dt_ref, grid)
    per_group = heads // groups
    head_ids = jax.lax.broadcasted_iota(jnp.int32, da_ref.shape, 1)
    da_all = jnp.zeros(da_ref.shape, jnp.float32)
    dd_all = jnp.zeros(dd_ref.shape, jnp.float32)
    for g in range(groups):
        bg, cg = b_ref[g], c_ref[g]
        cb = dot(cg, bg, precision, trans_b=True)
        dcb = jnp.zeros_like(cb)
        for h in range(g * per_group, (g + 1) * per_group):
            a_h = a_ref[h]
            dt = dt_ref[pl.ds(h, 1), :].astype(jnp.float32)  # [1, L]
            x, dy = x_ref[h], dy_ref[h]  # [L, P]
            decay = blk.decay(dt * a_h)
            cbe = cb * decay
            w = cbe * dt
            dx = dot(w.astype(dy.dtype), dy, precision, trans_a=True) + d_ref[h] * dy.astype(jnp.float32)
            dx_ref[h] = dx.astype(dx_ref.dtype)
            dw = dot(dy, x, precision, trans_b=True)  # [L, L]
            dd_all = jnp.where(head_ids == h, jnp.sum(dy.astype(jnp.float32) * x.astype(jnp.float32)), dd_all)
            dcb = dcb + dw * decay * dt
            q = dw * w  # d(loss)/d(log decay_ij)
            dcum_col = jnp.sum(q, axis=1, keepdims=True) - blk.column(jnp.sum(q, axis=0, keepdims=True))  # [L, 1]
            da_row = jnp.sum(jnp.where(blk.mask, dcum_col, 0.0), axis=0, keepdims=True)  # [1, L]
            ddt = jnp.sum(dw * cbe, axis=0, keepdims=True) + da_row * a_h
            ddt_ref[pl.ds(h, 1), :] = ddt.astype(ddt_ref.dtype)
            da_all = jnp.where(head_ids == h, jnp.sum(da_row * dt), da_all)
        dc_ref[g] = dot(dcb.astype(bg.dtype), bg, precision).astype(dc_ref.dtype)
        db_ref[g] = dot(dcb.astype(cg.dtype), cg, precision, trans_a=True).astype(db_ref.dtype)
    da_ref[...] = da_all
    dd_ref[...] = dd_all


class _Layout:
    """[B, T, ...] <-> head-major, padded [B, H, Tp, ...]: the blocks of ``grid.block_start``, the
    first starting ``o`` pads before token 0."""

    def __init__(self, t: int, grid: ChunkGrid, block_len: int):
        self.t, self.o, self.block = t, -grid.block_start(0, block_len), block_len
        self.num_blocks = grid.num_blocks(t, block_len)
        self.padded = self.num_blocks * block_len

    def to_kernel(self, a):
        """[B, T, H, ...] -> [B, H, Tp, ...]."""
        pad = [(0, 0), (self.o, self.padded - self.t - self.o)] + [(0, 0)] * (a.ndim - 2)
        return jnp.moveaxis(jnp.pad(a, pad), 1, 2)

    def from_kernel(self, a):
        return jnp.moveaxis(a, 2, 1)[:, self.o : self.o + self.t]

    def documents(self, document_start):
        """[B, T] -> [B, 1, Tp] int32 rows, padding continuing its neighbour's document (a lane
        row per block: ``_specs``' ``ds_spec``); None stays None."""
        if document_start is None:
            return None
        padded = jnp.pad(document_start.astype(jnp.int32), [(0, 0), (self.o, self.padded - self.t - self.o)], "edge")
        return padded[:, None, :]


def _specs(h, g, p, n, block_len):
    per = lambda *rest: pl.BlockSpec(
        (None, rest[0], block_len) + rest[1:], lambda i, m: (i, 0, m) + (0,) * (len(rest) - 1)
    )
    smem = pl.BlockSpec(memory_space=pltpu.SMEM)
    part = pl.BlockSpec((None, None, 1, h), lambda i, m: (i, m, 0, 0))
    return per(h, p), per(h), smem, per(g, n), part


def _document_inputs(ds, block_len):
    """The launch's leading input and its spec with documents ([B, 1, Tp]: a [1, L] row per block), else none."""
    return ([], []) if ds is None else ([ds], [pl.BlockSpec((None, 1, block_len), lambda i, m: (i, 0, m))])


_PARAMS = mosaic_params(("parallel", "parallel"))


def _forward(x, dt, A, B, C, D, ds, grid, block_len, interpret):
    """``ds``: None or the [B, 1, Tp] document starts of ``_Layout.documents``."""
    b_, t, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    lay = _Layout(t, grid, block_len)
    x_spec, dt_spec, smem, bc_spec, _ = _specs(h, g, p, n, block_len)
    ds_in, ds_spec = _document_inputs(ds, block_len)
    precision = matmul_precision(x.dtype)
    y = pl.pallas_call(
        functools.partial(_fwd_kernel, grid=grid, heads=h, groups=g, precision=precision, documents=ds is not None),
        out_shape=jax.ShapeDtypeStruct((b_, h, lay.padded, p), x.dtype),
        grid=(b_, lay.num_blocks),
        in_specs=[*ds_spec, x_spec, dt_spec, smem, bc_spec, bc_spec, smem],
        out_specs=x_spec,
        compiler_params=_PARAMS,
        interpret=interpret,
        name="ssd_fwd",
    )(
        *ds_in,
        lay.to_kernel(x),
        lay.to_kernel(dt),
        A.astype(jnp.float32),
        lay.to_kernel(B),
        lay.to_kernel(C),
        D.astype(jnp.float32),
    )
    return lay.from_kernel(y)


def _backward(x, dt, A, B, C, D, ds, dy, grid, block_len, interpret):
    b_, t, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    lay = _Layout(t, grid, block_len)
    x_spec, dt_spec, smem, bc_spec, part = _specs(h, g, p, n, block_len)
    ds_in, ds_spec = _document_inputs(ds, block_len)
    precision = matmul_precision(x.dtype)
    f32 = jnp.float32
    nb, tp = lay.num_blocks, lay.padded
    out_shape = (
        jax.ShapeDtypeStruct((b_, h, tp, p), x.dtype),
        jax.ShapeDtypeStruct((b_, h, tp), dt.dtype),
        jax.ShapeDtypeStruct((b_, g, tp, n), B.dtype),
        jax.ShapeDtypeStruct((b_, g, tp, n), C.dtype),
        jax.ShapeDtypeStruct((b_, nb, 1, h), f32),
        jax.ShapeDtypeStruct((b_, nb, 1, h), f32),
    )
    dx, ddt, dB, dC, dA, dD = pl.pallas_call(
        functools.partial(_bwd_kernel, grid=grid, heads=h, groups=g, precision=precision, documents=ds is not None),
        out_shape=out_shape,
        grid=(b_, nb),
        in_specs=[*ds_spec, x_spec, dt_spec, smem, bc_spec, bc_spec, smem, x_spec],
        out_specs=(x_spec, dt_spec, bc_spec, bc_spec, part, part),
        compiler_params=_PARAMS,
        interpret=interpret,
        name="ssd_bwd",
    )(
        *ds_in,
        lay.to_kernel(x),
        lay.to_kernel(dt),
        A.astype(f32),
        lay.to_kernel(B),
        lay.to_kernel(C),
        D.astype(f32),
        lay.to_kernel(dy),
    )
    dA = jnp.sum(dA, axis=(0, 1, 2)).astype(A.dtype)
    dD = jnp.sum(dD, axis=(0, 1, 2)).astype(D.dtype)
    return lay.from_kernel(dx), lay.from_kernel(ddt), dA, lay.from_kernel(dB), lay.from_kernel(dC), dD, None


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9))
def _ssd(x, dt, A, B, C, D, ds, grid, block_len, interpret):
    return _forward(x, dt, A, B, C, D, ds, grid, block_len, interpret)


def _ssd_fwd(x, dt, A, B, C, D, ds, grid, block_len, interpret):
    return _forward(x, dt, A, B, C, D, ds, grid, block_len, interpret), (x, dt, A, B, C, D, ds)


def _ssd_bwd(grid, block_len, interpret, res, dy):
    return _backward(*res, dy, grid, block_len, interpret)


_ssd.defvjp(_ssd_fwd, _ssd_bwd)


def ssd_pallas_tpu(
    x, dt, A, B, C, D, *, grid: ChunkGrid, document_start=None, interpret=False, blocks: TpuBlocks | None = None
):
    """Fixed-grid SSD on the TPU; same contract as ``xla.ssd_chunked``.

    Args:
      x: [B, T, H, P]; dt: [B, T, H]; A, D: [H]; B, C: [B, T, G, N].
      grid: the layer's chunk grid.
      document_start: [B, T] int, each token's document start in a packed row, every document
        starting at a multiple of K (``pallas_kernels.documents``); None: each row is one document.
      interpret: False, or a ``pltpu.InterpretParams`` (``common.tpu_interpret_params``: on the CPU).
      blocks: the block length (default: ``block_sizes.default_tpu_blocks``).

    Returns:
      y: [B, T, H, P] in x.dtype. Differentiable in every array argument.
    """
    blocks = blocks or default_tpu_blocks(grid.token_chunk)
    blocks.check(grid.token_chunk)
    ds = _Layout(x.shape[1], grid, blocks.block_len).documents(document_start)
    return _ssd(x, dt, A, B, C, D, ds, grid, blocks.block_len, interpret)
