"""Chunk-reset SSD as a Pallas kernel for TPUs (Mosaic), forward and backward.

Same algorithm as ``pallas_gpu``: one program per block of L tokens (L a multiple of
K, 128 by default: one MXU pass and one lane row of ``dt``), each block a masked
[L, L] SSD matmul per head. Mosaic wants whole, aligned (8, 128) tiles, so the
wrapper lays the inputs out head-major and pads the sequence by ``o`` in front (the
blocks then start on chunk starts) and to a multiple of L behind; zero padding is
inert (dt = 0, x = 0). Everything stays 2-D inside the kernel ([L, 1] columns and
[1, L] rows) because Mosaic vectors are (sublane, lane) tiles.
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
    """Masks of one L-token block whose first padded position is ``m * L`` (token ``m*L - o``)."""

    def __init__(self, m, length: int, grid: ChunkGrid):
        i = jax.lax.broadcasted_iota(jnp.int32, (length, length), 0)
        j = jax.lax.broadcasted_iota(jnp.int32, (length, length), 1)
        start = grid.block_start(m, length)
        cid_i, cid_j = grid.chunk_id(start + i), grid.chunk_id(start + j)  # positions < 0: front padding
        self.mask = (cid_i == cid_j) & (j <= i)  # [L, L] same chunk, key not after query
        self.mask_t = (cid_j == cid_i) & (i <= j)  # the transpose, built directly
        self.eye = i == j

    def column(self, row):
        """[1, L] -> [L, 1] without a relayout-heavy transpose."""
        return jnp.sum(jnp.where(self.eye, row, 0.0), axis=1, keepdims=True)

    def decay(self, a_row):
        """exp(cum_i - cum_j) on the chunk mask, 0 elsewhere.  a_row: [1, L] = dt * A."""
        a_col = self.column(a_row)
        cum_col = jnp.sum(jnp.where(self.mask, a_row, 0.0), axis=1, keepdims=True)  # [L, 1]
        cum_row = jnp.sum(jnp.where(self.mask_t, a_col, 0.0), axis=0, keepdims=True)  # [1, L]
        return jnp.exp(jnp.where(self.mask, cum_col - cum_row, -jnp.inf))


def _fwd_kernel(x_ref, dt_ref, a_ref, b_ref, c_ref, d_ref, y_ref, *, grid, heads, groups, precision):
    """Refs (batch row and block squeezed): x, y [H, L, P]; dt [H, L]; B, C [G, L, N]; A, D [H] in SMEM."""
    length = dt_ref.shape[-1]
    blk = _Block(pl.program_id(1), length, grid)
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


def _bwd_kernel(
    x_ref,
    dt_ref,
    a_ref,
    b_ref,
    c_ref,
    d_ref,
    dy_ref,
    dx_ref,
    ddt_ref,
    db_ref,
    dc_ref,
    da_ref,
    dd_ref,
    *,
    grid,
    heads,
    groups,
    precision,
):
    """dA, dD: [1, H] per-block partial sums; other refs as in the forward."""
    length = dt_ref.shape[-1]
    blk = _Block(pl.program_id(1), length, grid)
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


def _specs(h, g, p, n, block_len):
    per = lambda *rest: pl.BlockSpec(
        (None, rest[0], block_len) + rest[1:], lambda i, m: (i, 0, m) + (0,) * (len(rest) - 1)
    )
    smem = pl.BlockSpec(memory_space=pltpu.SMEM)
    part = pl.BlockSpec((None, None, 1, h), lambda i, m: (i, m, 0, 0))
    return per(h, p), per(h), smem, per(g, n), part


_PARAMS = mosaic_params(("parallel", "parallel"))


def _forward(x, dt, A, B, C, D, grid, block_len, interpret):
    b_, t, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    lay = _Layout(t, grid, block_len)
    x_spec, dt_spec, smem, bc_spec, _ = _specs(h, g, p, n, block_len)
    precision = matmul_precision(x.dtype)
    y = pl.pallas_call(
        functools.partial(_fwd_kernel, grid=grid, heads=h, groups=g, precision=precision),
        out_shape=jax.ShapeDtypeStruct((b_, h, lay.padded, p), x.dtype),
        grid=(b_, lay.num_blocks),
        in_specs=[x_spec, dt_spec, smem, bc_spec, bc_spec, smem],
        out_specs=x_spec,
        compiler_params=_PARAMS,
        interpret=interpret,
        name="ssd_fwd",
    )(
        lay.to_kernel(x),
        lay.to_kernel(dt),
        A.astype(jnp.float32),
        lay.to_kernel(B),
        lay.to_kernel(C),
        D.astype(jnp.float32),
    )
    return lay.from_kernel(y)


def _backward(x, dt, A, B, C, D, dy, grid, block_len, interpret):
    b_, t, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    lay = _Layout(t, grid, block_len)
    x_spec, dt_spec, smem, bc_spec, part = _specs(h, g, p, n, block_len)
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
        functools.partial(_bwd_kernel, grid=grid, heads=h, groups=g, precision=precision),
        out_shape=out_shape,
        grid=(b_, nb),
        in_specs=[x_spec, dt_spec, smem, bc_spec, bc_spec, smem, x_spec],
        out_specs=(x_spec, dt_spec, bc_spec, bc_spec, part, part),
        compiler_params=_PARAMS,
        interpret=interpret,
        name="ssd_bwd",
    )(
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
    return lay.from_kernel(dx), lay.from_kernel(ddt), dA, lay.from_kernel(dB), lay.from_kernel(dC), dD


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _ssd(x, dt, A, B, C, D, grid, block_len, interpret):
    return _forward(x, dt, A, B, C, D, grid, block_len, interpret)


def _ssd_fwd(x, dt, A, B, C, D, grid, block_len, interpret):
    return _forward(x, dt, A, B, C, D, grid, block_len, interpret), (x, dt, A, B, C, D)


def _ssd_bwd(grid, block_len, interpret, res, dy):
    return _backward(*res, dy, grid, block_len, interpret)


_ssd.defvjp(_ssd_fwd, _ssd_bwd)


def ssd_pallas_tpu(x, dt, A, B, C, D, *, grid: ChunkGrid, interpret=False, blocks: TpuBlocks | None = None):
    """Fixed-grid SSD on the TPU; same contract as ``xla.ssd_chunked``.

    Args:
      x: [B, T, H, P]; dt: [B, T, H]; A, D: [H]; B, C: [B, T, G, N].
      grid: the layer's chunk grid.
      interpret: False, or a ``pltpu.InterpretParams`` (``common.tpu_interpret_params``: on the CPU).
      blocks: the block length (default: ``block_sizes.default_tpu_blocks``).

    Returns:
      y: [B, T, H, P] in x.dtype. Differentiable in every array argument.
    """
    blocks = blocks or default_tpu_blocks(grid.token_chunk)
    blocks.check(grid.token_chunk)
    return _ssd(x, dt, A, B, C, D, grid, blocks.block_len, interpret)
