"""The gated grouped RMSNorm as Pallas kernels for GPUs (Triton lowering), forward and backward.

A memory-bound op that XLA, differentiating the composition, spreads over several fusions (the
statistics, the normalisation, and a backward that recomputes both inside whatever consumes its
gradient). Here each direction is one pass over the rows: a program owns ``rows`` consecutive
rows of one group and holds them in registers.

Forward: read y and z, write the output and each row's 1/rms per group (float32, [rows, G]).
Backward: read y, z, 1/rms and the output's gradient, write dy and dz, and per program the
weight gradient of its rows (float32 [programs, C]; the caller sums the few of them), so no
program reduces over all rows. Group widths are padded to powers of two (Triton's tiles), the
padding masked off.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.common import iota, next_pow2, triton_params

_NUM_WARPS = 4
_TILE = 4096  # elements of one [rows, group width] tile per program


def _rows(width: int) -> int:
    return max(1, _TILE // next_pow2(width))


def _extent(y, groups: int):
    """Rows, channels and group width of y [..., C] as the kernels see it ([rows, C])."""
    c = y.shape[-1]
    return y.size // c, c, c // groups


def _tile(n: int, width: int):
    """The program's rows and its group's columns; masks of the tile, of its rows and of its columns."""
    m, g = pl.program_id(0), pl.program_id(1)
    rows = _rows(width)
    r = m * rows + iota(rows)[:, None]
    c = iota(next_pow2(width))[None, :]
    return r, g * width + c, (r < n) & (c < width), r[:, 0] < n, c < width


def _gated(y_ref, z_ref, r, col, mask):
    f32 = jnp.float32
    y = plgpu.load(y_ref.at[r, col], mask=mask, other=0.0).astype(f32)
    z = plgpu.load(z_ref.at[r, col], mask=mask, other=0.0).astype(f32)
    gate = jax.nn.sigmoid(z)
    return y, z, gate, y * z * gate


def _fwd_kernel(y_ref, z_ref, w_ref, out_ref, rstd_ref, *, n, width, eps):
    r, col, mask, row_ok, col_ok = _tile(n, width)
    _, _, _, gated = _gated(y_ref, z_ref, r, col, mask)
    rstd = jax.lax.rsqrt(jnp.sum(gated * gated, axis=1, keepdims=True) / width + eps)  # [rows, 1]
    w = plgpu.load(w_ref.at[col], mask=col_ok, other=0.0).astype(jnp.float32)
    plgpu.store(out_ref.at[r, col], (gated * rstd * w).astype(out_ref.dtype), mask=mask)
    plgpu.store(rstd_ref.at[r[:, 0], pl.program_id(1)], rstd[:, 0], mask=row_ok)


def _bwd_kernel(y_ref, z_ref, w_ref, rstd_ref, dout_ref, dy_ref, dz_ref, dw_ref, *, n, width):
    r, col, mask, row_ok, col_ok = _tile(n, width)
    y, z, gate, gated = _gated(y_ref, z_ref, r, col, mask)
    rstd = plgpu.load(rstd_ref.at[r[:, 0], pl.program_id(1)], mask=row_ok, other=0.0)[:, None]
    w = plgpu.load(w_ref.at[col], mask=col_ok, other=0.0).astype(jnp.float32)
    dout = plgpu.load(dout_ref.at[r, col], mask=mask, other=0.0).astype(jnp.float32)
    normed = gated * rstd
    dnormed = dout * w
    dgated = rstd * (dnormed - normed * (jnp.sum(dnormed * normed, axis=1, keepdims=True) / width))
    plgpu.store(dy_ref.at[r, col], (dgated * z * gate).astype(dy_ref.dtype), mask=mask)
    dz = dgated * y * gate * (1.0 + z * (1.0 - gate))
    plgpu.store(dz_ref.at[r, col], dz.astype(dz_ref.dtype), mask=mask)
    plgpu.store(dw_ref.at[pl.program_id(0), col], jnp.sum(dout * normed, axis=0, keepdims=True), mask=col_ok)


def _launch(kernel, args, out_shape, n, width, groups, interpret, name):
    return pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(pl.cdiv(n, _rows(width)), groups),
        compiler_params=triton_params(_NUM_WARPS, 1),
        interpret=interpret,
        name=name,
    )(*args)


def _forward(y, z, weight, groups, eps, interpret):
    n, c, width = _extent(y, groups)
    out_shape = (jax.ShapeDtypeStruct((n, c), y.dtype), jax.ShapeDtypeStruct((n, groups), jnp.float32))
    kernel = functools.partial(_fwd_kernel, n=n, width=width, eps=eps)
    out, rstd = _launch(
        kernel, (y.reshape(n, c), z.reshape(n, c), weight), out_shape, n, width, groups, interpret, "gated_norm_fwd"
    )
    return out.reshape(y.shape), rstd


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _gated_norm(y, z, weight, groups, eps, interpret):
    return _forward(y, z, weight, groups, eps, interpret)[0]


def _gated_norm_fwd(y, z, weight, groups, eps, interpret):
    out, rstd = _forward(y, z, weight, groups, eps, interpret)
    return out, (y, z, weight, rstd)


def _gated_norm_bwd(groups, eps, interpret, res, dout):
    y, z, weight, rstd = res
    n, c, width = _extent(y, groups)
    programs = pl.cdiv(n, _rows(width))
    out_shape = (
        jax.ShapeDtypeStruct((n, c), y.dtype),
        jax.ShapeDtypeStruct((n, c), z.dtype),
        jax.ShapeDtypeStruct((programs, c), jnp.float32),
    )
    args = (y.reshape(n, c), z.reshape(n, c), weight, rstd, dout.reshape(n, c))
    kernel = functools.partial(_bwd_kernel, n=n, width=width)
    dy, dz, dw = _launch(kernel, args, out_shape, n, width, groups, interpret, "gated_norm_bwd")
    return dy.reshape(y.shape), dz.reshape(z.shape), jnp.sum(dw, axis=0).astype(weight.dtype)


_gated_norm.defvjp(_gated_norm_fwd, _gated_norm_bwd)


def gated_norm_pallas_gpu(y, z, weight, *, groups: int, eps: float, interpret: bool = False):
    """``api.gated_norm`` as one kernel launch forward and one backward; ``interpret``: in the
    Pallas interpreter."""
    return _gated_norm(y, z, weight, groups, eps, interpret)
