"""The Mamba-2 block core in one Pallas GPU kernel (Triton lowering), forward and backward.

Input: the input projection's output ``zxbcdt`` [B, T, S, width], rows ``[z | x | B | C | dt]``
(``reference.SsmDims``). Output: ``RMSNorm_G(SSD(conv(x, B, C), softplus(dt)) * silu(z))``
[B, T, S, I], ready for the output projection. Between the two projections nothing else runs:
the chunk-local conv, silu, softplus, the SSD, the gate and the grouped norm all happen on one
tile in registers, and the backward writes d(zxbcdt) whole, the gradient the input projection's
backward needs, plus small per-program partial sums for the parameters.

Each program owns one tile of one batch row and one stream (grid (row, tile, stream)); tiles
are placed like the SSD kernel's (``pallas_kernels.ssd.pallas_gpu.Geometry``): no chunk of the
grid straddles two, so the conv never needs a token of another tile. Inside a tile the conv's
lags are matmuls with 0/1 shift matrices ``S_j[i, k] = [k = i - j, same chunk]``, exact on the
tensor cores, so the token axis is never shifted in registers.

The forward keeps nothing but the output: the backward recomputes the conv, the SSD forward and
the gate from ``zxbcdt`` and the parameters (two passes over the heads: the norm's statistics
first, then the gradients).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from attamba_jax.chunking import ChunkGrid
from pallas_kernels.ssd.pallas_gpu import (
    HIGHEST, CompilerParams, Geometry, dot, drop_last_input, head_backward, head_forward, idx,
)
from pallas_kernels.ssm_block.reference import SsmDims

f32 = jnp.float32


def _sigmoid(x):
    return 1.0 / (1.0 + jnp.exp(-x))


def _softplus(x):
    return jnp.maximum(x, 0.0) + jnp.log1p(jnp.exp(-jnp.abs(x)))


def _dsilu(x, s):
    """d silu(x)/dx given s = sigmoid(x)."""
    return s * (1.0 + x * (1.0 - s))


class _Tile:
    """One program's tile: token rows, masks, shift matrices and the loaders of its stream's row."""

    def __init__(self, m, zx_ref, cw_ref, geo: Geometry, dims: SsmDims, precision):
        self.start, pos, self.loaded, self.written = geo.positions(m)
        self.rows = pl.ds(self.start, geo.block)
        self.mask = geo.chunk_mask(pos)
        self.zx_ref, self.cw_ref, self.dims, self.precision = zx_ref, cw_ref, dims, precision
        self.dtype = zx_ref.dtype
        self.taps = cw_ref.shape[0]
        lag = jax.lax.broadcasted_iota(jnp.int32, self.mask.shape, 0) - jax.lax.broadcasted_iota(jnp.int32, self.mask.shape, 1)
        self.shifts = [(self.mask & (lag == j)).astype(self.dtype) for j in range(1, self.taps)]

    def load(self, col, width):
        """[L, width] columns col.. of the stream's projection row (0 past the row's end)."""
        return plgpu.load(self.zx_ref.at[self.rows, pl.ds(col, width)], mask=self.loaded[:, None], other=0.0)

    def load_col(self, col):
        return plgpu.load(self.zx_ref.at[self.rows, idx(col)], mask=self.loaded, other=0.0).astype(f32)

    def tap(self, j, channel, width):
        """[width] conv weights of lag j (rounded to the compute dtype, as the composition does)."""
        w = plgpu.load(self.cw_ref.at[idx(self.taps - 1 - j), pl.ds(channel, width)])
        return w.astype(self.dtype).astype(f32)

    def conv(self, channel, width):
        """Conv channels channel.. (within [x | B | C]) -> (raw [L, w], lagged raws, pre-activation f32)."""
        raw = self.load(self.dims.inner + channel, width)
        lagged = [dot(s, raw, self.precision) for s in self.shifts]  # exact: one nonzero per row
        pre = raw.astype(f32) * self.tap(0, channel, width)
        for j, r in enumerate(lagged, start=1):
            pre = pre + r * self.tap(j, channel, width)
        return raw, lagged, pre

    def conv_backward(self, channel, width, raw, lagged, dpre, dcw_ref, dzx_ref):
        """Stores d(raw) into d(zxbcdt) and this program's conv-weight partial sums."""
        draw = dpre * self.tap(0, channel, width)
        plgpu.store(dcw_ref.at[idx(self.taps - 1), pl.ds(channel, width)], jnp.sum(dpre * raw.astype(f32), axis=0))
        for j, (s, r) in enumerate(zip(self.shifts, lagged), start=1):
            draw = draw + dot(s, (dpre * self.tap(j, channel, width)).astype(self.dtype), self.precision, trans_a=True)
            plgpu.store(dcw_ref.at[idx(self.taps - 1 - j), pl.ds(channel, width)], jnp.sum(dpre * r, axis=0))
        self.store(dzx_ref, self.dims.inner + channel, width, draw)

    def store(self, ref, col, width, value):
        plgpu.store(ref.at[self.rows, pl.ds(col, width)], value.astype(ref.dtype), mask=self.written[:, None])

    def store_col(self, ref, col, value):
        plgpu.store(ref.at[self.rows, idx(col)], value.astype(ref.dtype), mask=self.written)

    def activated(self, channel, width):
        """silu(conv) in the compute dtype, and what its backward needs."""
        raw, lagged, pre = self.conv(channel, width)
        sig = _sigmoid(pre)
        return (pre * sig).astype(self.dtype), (raw, lagged, pre, sig)

    def dt_raw(self, h, bias_ref):
        """[L] head h's dt before softplus, bias added (float32)."""
        d = self.dims
        return self.load_col(2 * d.inner + 2 * d.groups * d.state + h) + bias_ref[h]

    def group_bc(self, g):
        d = self.dims
        B, B_res = self.activated(d.inner + g * d.state, d.state)
        C, C_res = self.activated(d.inner + (d.groups + g) * d.state, d.state)
        return B, B_res, C, C_res, dot(C, B, self.precision, trans_b=True)



def _fwd_kernel(zx_ref, cw_ref, bias_ref, a_ref, d_ref, nw_ref, out_ref, *saved, geo, dims: SsmDims, eps, precision):
    """``saved`` (under differentiation): y_ref like out (the SSD output) and rstd_ref [T, G] (f32)."""
    tile = _Tile(pl.program_id(1), zx_ref, cw_ref, geo, dims, precision)
    hg, p = dims.heads // dims.groups, dims.head_dim
    gated = []
    sumsq = []
    for g in range(dims.groups):
        _, _, _, _, cb = tile.group_bc(g)
        total = jnp.zeros((geo.block,), f32)
        for h in range(g * hg, (g + 1) * hg):
            x, _ = tile.activated(h * p, p)
            dt = _softplus(tile.dt_raw(h, bias_ref))
            y = head_forward(cb, tile.mask, dt, a_ref[h], d_ref[h], x, precision)
            if saved:
                tile.store(saved[0], h * p, p, y)
            z = tile.load(h * p, p).astype(f32)
            gz = y * (z * _sigmoid(z))
            gated.append(gz)
            total = total + jnp.sum(gz * gz, axis=1)
        sumsq.append(total)
    for g in range(dims.groups):
        r = jax.lax.rsqrt(sumsq[g] / (hg * p) + eps)
        if saved:
            tile.store_col(saved[1], g, r)
        for h in range(g * hg, (g + 1) * hg):
            w = plgpu.load(nw_ref.at[pl.ds(h * p, p)])
            tile.store(out_ref, h * p, p, gated[h] * r[:, None] * w[None, :])


def _bwd_kernel(
    zx_ref, cw_ref, bias_ref, a_ref, d_ref, nw_ref, y_ref, rstd_ref, dout_ref,
    dzx_ref, dcw_ref, dnw_ref, ddt_ref, dlog_ref, dskip_ref,
    *, geo, dims: SsmDims, precision,
):
    """Refs: y, rstd as the forward saved them; dzx like zx; dcw [W, I+2GN] and dnw [I] (f32)
    this program's partial sums; ddt (d/d(dt + bias)), dlog (d/d(dt·A)) and dskip (dy·x over P)
    [T, Hs] f32 per token."""
    tile = _Tile(pl.program_id(1), zx_ref, cw_ref, geo, dims, precision)
    hg, p, n = dims.heads // dims.groups, dims.head_dim, dims.state
    n_group = float(hg * p)

    def gate(h):
        """(dout, dout·w, y, z, sigmoid(z), y·silu(z)) of head h, float32."""
        dout = plgpu.load(dout_ref.at[tile.rows, pl.ds(h * p, p)], mask=tile.written[:, None], other=0.0).astype(f32)
        y = plgpu.load(y_ref.at[tile.rows, pl.ds(h * p, p)], mask=tile.loaded[:, None], other=0.0).astype(f32)
        z = tile.load(h * p, p).astype(f32)
        z_sig = _sigmoid(z)
        return dout, dout * plgpu.load(nw_ref.at[pl.ds(h * p, p)])[None, :], y, z, z_sig, y * (z * z_sig)

    for g in range(dims.groups):
        r = plgpu.load(rstd_ref.at[tile.rows, idx(g)], mask=tile.loaded, other=0.0)
        # The norm's backward needs sum(dout·w·gated) over the whole group first.
        proj = jnp.zeros((geo.block,), f32)
        for h in range(g * hg, (g + 1) * hg):
            _, v, _, _, _, gz = gate(h)
            proj = proj + jnp.sum(v * gz, axis=1)
        coef = (r * r * r * proj / n_group)[:, None]
        B, B_res, C, C_res, cb = tile.group_bc(g)
        dcb = jnp.zeros_like(cb)
        for h in range(g * hg, (g + 1) * hg):
            dout, v, y, z, z_sig, gz = gate(h)
            plgpu.store(dnw_ref.at[pl.ds(h * p, p)], jnp.sum(dout * gz * r[:, None], axis=0))
            dgz = v * r[:, None] - gz * coef
            tile.store(dzx_ref, h * p, p, dgz * y * _dsilu(z, z_sig))
            dy = (dgz * z * z_sig).astype(tile.dtype)
            x, (x_raw, x_lagged, x_pre, x_sig) = tile.activated(h * p, p)
            dt_raw = tile.dt_raw(h, bias_ref)
            dx, ddt, dlog, dskip, dcb_h = head_backward(cb, tile.mask, _softplus(dt_raw), a_ref[h], d_ref[h], x, dy, precision)
            dcb = dcb + dcb_h
            ddt_raw = ddt * _sigmoid(dt_raw)
            tile.store_col(dzx_ref, 2 * dims.inner + 2 * dims.groups * n + h, ddt_raw)
            tile.store_col(ddt_ref, h, ddt_raw)
            tile.store_col(dlog_ref, h, dlog)
            tile.store_col(dskip_ref, h, dskip)
            tile.conv_backward(h * p, p, x_raw, x_lagged, dx * _dsilu(x_pre, x_sig), dcw_ref, dzx_ref)
        dC = dot(dcb.astype(B.dtype), B, precision)  # [L, N]
        dB = dot(dcb.astype(C.dtype), C, precision, trans_a=True)
        for channel, d_act, (raw, lagged, pre, sig) in (
            (dims.inner + g * n, dB, B_res), (dims.inner + (dims.groups + g) * n, dC, C_res)
        ):
            tile.conv_backward(channel, n, raw, lagged, d_act * _dsilu(pre, sig), dcw_ref, dzx_ref)


def _specs(b, t, s, dims: SsmDims, taps):
    """BlockSpecs of grid (row i, tile m, stream k): each program sees its row's and stream's
    [T, ...] slabs whole and indexes the tokens itself."""
    row = lambda width: pl.BlockSpec((None, t, None, width), lambda i, m, k: (i, 0, k, 0))
    stream_vec = lambda width: pl.BlockSpec((None, width), lambda i, m, k: (k, 0))
    return {
        "zx": row(dims.width), "out": row(dims.inner), "per_head": row(dims.heads), "per_group": row(dims.groups),
        "heads": stream_vec(dims.heads), "inner": stream_vec(dims.inner),
        "cw": pl.BlockSpec((None, taps, dims.conv_channels), lambda i, m, k: (k, 0, 0)),
        "dcw": pl.BlockSpec((None, None, None, taps, dims.conv_channels), lambda i, m, k: (i, m, k, 0, 0)),
        "dnw": pl.BlockSpec((None, None, None, dims.inner), lambda i, m, k: (i, m, k, 0)),
    }


def _params(conv_weight, dt_bias, A, D, norm_weight, s, dims: SsmDims):
    """Per-stream float32 parameter slabs: conv [S, W, I+2GN] (taps first), bias/A/D [S, Hs], norm [S, I]."""
    cw = conv_weight.astype(f32).reshape(s, dims.conv_channels, -1).transpose(0, 2, 1)
    bias = jnp.zeros((s * dims.heads,), f32) if dt_bias is None else dt_bias.astype(f32)
    per_head = lambda v: v.astype(f32).reshape(s, dims.heads)
    return cw, per_head(bias), per_head(A), per_head(D), norm_weight.astype(f32).reshape(s, dims.inner)


def _forward(zxbcdt, conv_weight, dt_bias, A, D, norm_weight, dims, grid, eps, block_len, num_warps, interpret,
             save=False, poison=False):
    """-> out [B, T, S, I]; with ``save`` also (y like out, rstd [B, T, S, G] f32) for the backward.
    ``poison`` aliases ``out`` to a NaN-filled buffer (tests, device checks)."""
    b, t, s, _ = zxbcdt.shape
    geo = Geometry(t, grid, block_len)
    params = _params(conv_weight, dt_bias, A, D, norm_weight, s, dims)
    sp = _specs(b, t, s, dims, params[0].shape[1])
    precision = HIGHEST if zxbcdt.dtype == f32 else None
    kernel = functools.partial(_fwd_kernel, geo=geo, dims=dims, eps=eps, precision=precision)
    args = [zxbcdt, *params]
    in_specs = [sp["zx"], sp["cw"], sp["heads"], sp["heads"], sp["heads"], sp["inner"]]
    out_shape = [jax.ShapeDtypeStruct((b, t, s, dims.inner), zxbcdt.dtype)]
    out_specs = [sp["out"]]
    if save:
        out_shape += [out_shape[0], jax.ShapeDtypeStruct((b, t, s, dims.groups), f32)]
        out_specs += [sp["out"], sp["per_group"]]
    aliases = {}
    if poison:  # every element must be overwritten: start from NaN
        args.append(jnp.full(out_shape[0].shape, jnp.nan, out_shape[0].dtype))
        in_specs.append(sp["out"])
        aliases = {len(args) - 1: 0}
        kernel = drop_last_input(kernel, n_outputs=len(out_shape))
    outs = pl.pallas_call(
        kernel,
        out_shape=tuple(out_shape),
        grid=(b, geo.num_blocks, s),
        in_specs=in_specs,
        out_specs=tuple(out_specs),
        input_output_aliases=aliases,
        compiler_params=CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name="ssm_block_fwd",
    )(*args)
    return tuple(outs) if save else outs[0]


def _backward(zxbcdt, conv_weight, dt_bias, A, D, norm_weight, y, rstd, dout, dims, grid, block_len, num_warps,
              interpret, poison=False):
    b, t, s, _ = zxbcdt.shape
    geo = Geometry(t, grid, block_len)
    params = _params(conv_weight, dt_bias, A, D, norm_weight, s, dims)
    taps = params[0].shape[1]
    sp = _specs(b, t, s, dims, taps)
    precision = HIGHEST if zxbcdt.dtype == f32 else None
    kernel = functools.partial(_bwd_kernel, geo=geo, dims=dims, precision=precision)
    nb = geo.num_blocks
    per_token = jax.ShapeDtypeStruct((b, t, s, dims.heads), f32)
    out_shape = (
        jax.ShapeDtypeStruct(zxbcdt.shape, zxbcdt.dtype),
        jax.ShapeDtypeStruct((b, nb, s, taps, dims.conv_channels), f32),
        jax.ShapeDtypeStruct((b, nb, s, dims.inner), f32),
        per_token, per_token, per_token,
    )
    args = [zxbcdt, *params, y, rstd, dout.astype(zxbcdt.dtype)]
    in_specs = [sp["zx"], sp["cw"], sp["heads"], sp["heads"], sp["heads"], sp["inner"], sp["out"], sp["per_group"], sp["out"]]
    aliases = {}
    if poison:  # d(zxbcdt) must be written whole: start it from NaN
        args.append(jnp.full(zxbcdt.shape, jnp.nan, zxbcdt.dtype))
        in_specs.append(sp["zx"])
        aliases = {len(args) - 1: 0}
        kernel = drop_last_input(kernel, n_outputs=len(out_shape))
    dzx, dcw, dnw, ddt, dlog, dskip = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(b, nb, s),
        in_specs=in_specs,
        out_specs=(sp["zx"], sp["dcw"], sp["dnw"], sp["per_head"], sp["per_head"], sp["per_head"]),
        input_output_aliases=aliases,
        compiler_params=CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name="ssm_block_bwd",
    )(*args)
    # Parameter gradients: the per-program and per-token partial sums, reduced here.
    dt = jax.nn.softplus(zxbcdt[..., -dims.heads:].astype(f32).reshape(b, t, -1) + params[1].reshape(-1))
    d_conv = jnp.sum(dcw, axis=(0, 1)).transpose(0, 2, 1).reshape(conv_weight.shape).astype(conv_weight.dtype)
    d_bias = None if dt_bias is None else jnp.sum(ddt, axis=(0, 1)).reshape(-1).astype(dt_bias.dtype)
    dA = jnp.sum(dlog.reshape(b, t, -1) * dt, axis=(0, 1)).astype(A.dtype)
    dD = jnp.sum(dskip, axis=(0, 1)).reshape(-1).astype(D.dtype)
    d_norm = jnp.sum(dnw, axis=(0, 1)).reshape(-1).astype(norm_weight.dtype)
    return dzx, d_conv, d_bias, dA, dD, d_norm


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9, 10, 11))
def _block(zxbcdt, conv_weight, dt_bias, A, D, norm_weight, dims, grid, eps, block_len, warps, interpret):
    return _forward(zxbcdt, conv_weight, dt_bias, A, D, norm_weight, dims, grid, eps, block_len, warps[0], interpret)


def _block_fwd(zxbcdt, conv_weight, dt_bias, A, D, norm_weight, dims, grid, eps, block_len, warps, interpret):
    out, y, rstd = _forward(zxbcdt, conv_weight, dt_bias, A, D, norm_weight, dims, grid, eps, block_len, warps[0],
                            interpret, save=True)
    return out, (zxbcdt, conv_weight, dt_bias, A, D, norm_weight, y, rstd)


def _block_bwd(dims, grid, eps, block_len, warps, interpret, res, dout):
    return _backward(*res, dout, dims, grid, block_len, warps[1], interpret)


_block.defvjp(_block_fwd, _block_bwd)


def supports(dims: SsmDims, grid: ChunkGrid, block_len: int) -> str | None:
    """Why the fused kernel cannot run these sizes (None: it can). Triton tiles are powers of two >= 16."""
    pow2 = lambda v: v >= 16 and not v & (v - 1)
    if not pow2(dims.head_dim) or not pow2(dims.state):
        return f"head_dim ({dims.head_dim}) and state ({dims.state}) must be powers of two >= 16"
    if not pow2(block_len) or block_len < grid.token_chunk:
        return f"block_len ({block_len}) must be a power of two >= max(16, K={grid.token_chunk})"
    return None


def ssm_block_pallas_gpu(
    zxbcdt, conv_weight, dt_bias, A, D, norm_weight, *, dims: SsmDims, grid: ChunkGrid, eps: float,
    interpret: bool = False, block_len: int | None = None, num_warps: tuple[int, int] = (4, 4),
):
    """The block core fused; same contract as ``reference.ssm_block_composed``.

    Args:
      zxbcdt: [B, T, S, width]; conv_weight [S·(I+2GN), W]; dt_bias [S·Hs] or None; A, D [S·Hs];
        norm_weight [S·I].
      block_len: tokens per tile (default: K rounded up to a power of two, at least 16).
      num_warps: (forward, backward) warps per program.

    Returns:
      [B, T, S, I] in zxbcdt.dtype; differentiable in every array argument.
    """
    block_len = block_len or max(16, 1 << max(0, (grid.token_chunk - 1).bit_length()))
    why = supports(dims, grid, block_len)
    if why:
        raise ValueError(f"ssm_block pallas_gpu: {why}")
    return _block(zxbcdt, conv_weight, dt_bias, A, D, norm_weight, dims, grid, eps, block_len, tuple(num_warps), interpret)
