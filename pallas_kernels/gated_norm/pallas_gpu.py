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

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.common import iota, next_pow2, triton_params


@dataclasses.dataclass(frozen=True)
class Launch:
    """How the kernels run their programs (constants, not tuned per call; ``bench_ssm_ops.py``
    sweeps them)."""

    tile: int = 4096  # elements of one program's [rows, group width] tile (rows: tile / width, at least 1)
    num_warps: int = 4

    def __post_init__(self):
        if self.tile < 1 or self.tile & (self.tile - 1):
            raise ValueError(f"gated_norm Launch.tile must be a power of two, got {self.tile}")
        if self.num_warps < 1:
            raise ValueError(f"gated_norm Launch.num_warps must be >= 1, got {self.num_warps}")

    def rows(self, width: int) -> int:
        return max(1, self.tile // next_pow2(width))


def _extent(y, groups: int):
    """Rows, channels and group width of y [..., C] as the kernels see it ([rows, C])."""
    c = y.shape[-1]
    return y.size // c, c, c // groups


def _tile(n: int, width: int, rows: int):
    """The program's ``rows`` rows and its group's columns; masks of the tile, of its rows and of its columns."""
    m, g = pl.program_id(0), pl.program_id(1)
    r = m * rows + iota(rows)[:, None]
    c = iota(next_pow2(width))[None, :]
    return r, g * width + c, (r < n) & (c < width), r[:, 0] < n, c < width


def _gated(y_ref, z_ref, r, col, mask):
    f32 = jnp.float32
    y = plgpu.load(y_ref.at[r, col], mask=mask, other=0.0).astype(f32)
    z = plgpu.load(z_ref.at[r, col], mask=mask, other=0.0).astype(f32)
    gate = jax.nn.sigmoid(z)
    return y, z, gate, y * z * gate


def _fwd_kernel(y_ref, z_ref, w_ref, out_ref, rstd_ref, *, n, width, rows, eps):
    r, col, mask, row_ok, col_ok = _tile(n, width, rows)
    _, _, _, gated = _gated(y_ref, z_ref, r, col, mask)
    rstd = jax.lax.rsqrt(jnp.sum(gated * gated, axis=1, keepdims=True) / width + eps)  # [rows, 1]
    w = plgpu.load(w_ref.at[col], mask=col_ok, other=0.0).astype(jnp.float32)
    plgpu.store(out_ref.at[r, col], (gated * rstd * w).astype(out_ref.dtype), mask=mask)
    plgpu.store(rstd_ref.at[r[:, 0], pl.program_id(1)], rstd[:, 0], mask=row_ok)


def _bwd_kernel(y_ref, z_ref, w_ref, rstd_ref, dout_ref, dy_ref, dz_ref, dw_ref, *, n, width, rows):
    r, col, mask, row_ok, col_ok = _tile(n, width, rows)
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


def _launch(kernel, args, out_shape, n, width, groups, launch: Launch, interpret, name):
    return pl.pallas_call(
        functools.partial(kernel, n=n, width=width, rows=launch.rows(width)),
        out_shape=out_shape,
        grid=(pl.cdiv(n, launch.rows(width)), groups),
        compiler_params=triton_params(launch.num_warps, 1),
        interpret=interpret,
        name=name,
    )(*args)


def _forward(y, z, weight, groups, eps, launch, interpret):
    n, c, width = _extent(y, groups)
    out_shape = (jax.ShapeDtypeStruct((n, c), y.dtype), jax.ShapeDtypeStruct((n, groups), jnp.float32))
    kernel = functools.partial(_fwd_kernel, eps=eps)
    args = (y.reshape(n, c), z.reshape(n, c), weight)
    out, rstd = _launch(kernel, args, out_shape, n, width, groups, launch, interpret, "gated_norm_fwd")
    return out.reshape(y.shape), rstd


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _gated_norm(y, z, weight, groups, eps, launch, interpret):
    return _forward(y, z, weight, groups, eps, launch, interpret)[0]


def _gated_norm_fwd(y, z, weight, groups, eps, launch, interpret):
    out, rstd = _forward(y, z, weight, groups, eps, launch, interpret)
    return out, (y, z, weight, rstd)


def _gated_norm_bwd(groups, eps, launch, interpret, res, dout):
    y, z, weight, rstd = res
    n, c, width = _extent(y, groups)
    programs = pl.cdiv(n, launch.rows(width))
    out_shape = (
        jax.ShapeDtypeStruct((n, c), y.dtype),
        jax.ShapeDtypeStruct((n, c), z.dtype),
        jax.ShapeDtypeStruct((programs, c), jnp.float32),
    )
    args = (y.reshape(n, c), z.reshape(n, c), weight, rstd, dout.reshape(n, c))
    dy, dz, dw = _launch(_bwd_kernel, args, out_shape, n, width, groups, launch, interpret, "gated_norm_bwd")
    return dy.reshape(y.shape), dz.reshape(z.shape), jnp.sum(dw, axis=0).astype(weight.dtype)


_gated_norm.defvjp(_gated_norm_fwd, _gated_norm_bwd)


def gated_norm_pallas_gpu(
    y, z, weight, *, groups: int, eps: float, interpret: bool = False, launch: Launch | None = None
):
    """``api.gated_norm`` as one kernel launch forward and one backward; ``interpret``: in the
    Pallas interpreter; ``launch``: the programs' settings (default ``Launch()``)."""
    return _gated_norm(y, z, weight, groups, eps, launch or Launch(), interpret)
