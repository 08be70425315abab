"""The gated grouped RMSNorm as Pallas kernels for GPUs (Triton lowering), forward and backward.

A memory-bound op that XLA, differentiating the composition, spreads over several fusions (the
statistics, the normalisation, and a backward that recomputes both inside whatever consumes its
gradient). Here each direction is one pass over the rows: a program owns ``Launch.steps``
consecutive tiles of ``rows`` rows of one group and walks them in a loop, holding one tile in
registers at a time. (Triton does not software-pipeline that loop: its loads feed no matmul.)

Forward: read y and z, write the output and each row's 1/rms per group (float32, [rows, G]).
Backward: read y, z, 1/rms and the output's gradient, write dy and dz, and per program the
weight gradient of its rows (float32 [programs, C], summed over its tiles as it walks them; the
caller sums the few programs'), so no program reduces over all rows. Group widths are padded to
powers of two (Triton's tiles), the padding masked off.
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
    sweeps them). The defaults (16 rows of a 256-wide group a program, 4 at a time) are chosen by
    registers, not yet by time: 79 a thread in the backward against 189 for the 16 rows at once,
    so three times the warps per SM for the same bytes (``BENCHMARKS.md``, "Registers per thread
    without a GPU")."""

    tile: int = 1024  # elements of one [rows, group width] tile (rows: tile / width, at least 1)
    steps: int = 4  # consecutive tiles each program walks, in a loop
    num_warps: int = 4

    def __post_init__(self):
        if self.tile < 1 or self.tile & (self.tile - 1):
            raise ValueError(f"gated_norm Launch.tile must be a power of two, got {self.tile}")
        for name in ("steps", "num_warps"):
            if getattr(self, name) < 1:
                raise ValueError(f"gated_norm Launch.{name} must be >= 1, got {getattr(self, name)}")

    def rows(self, width: int) -> int:
        """Rows of one tile."""
        return max(1, self.tile // next_pow2(width))

    def programs(self, n: int, width: int) -> int:
        """Programs of one group over ``n`` rows."""
        return pl.cdiv(n, self.rows(width) * self.steps)


def _extent(y, groups: int):
    """Rows, channels and group width of y [..., C] as the kernels see it ([rows, C])."""
    c = y.shape[-1]
    return y.size // c, c, c // groups


def _columns(width: int):
    """The program's group, its columns [1, W] and their mask."""
    g, c = pl.program_id(1), iota(next_pow2(width))[None, :]
    return g, g * width + c, c < width


def _walk(n: int, rows: int, steps: int, col_ok, body, init):
    """``carry = body(r, mask, row_ok, carry)`` over the program's ``steps`` tiles: r [rows, 1] the
    tile's rows, mask of the [rows, W] tile, row_ok of its rows."""
    first = pl.program_id(0) * steps  # read outside the loop (the interpreter has no program ids inside)

    def step(i, carry):
        r = (first + i) * rows + iota(rows)[:, None]
        return body(r, (r < n) & col_ok, r[:, 0] < n, carry)

    return step(0, init) if steps == 1 else jax.lax.fori_loop(0, steps, step, init)


def _gated(y_ref, z_ref, r, col, mask):
    f32 = jnp.float32
    y = plgpu.load(y_ref.at[r, col], mask=mask, other=0.0).astype(f32)
    z = plgpu.load(z_ref.at[r, col], mask=mask, other=0.0).astype(f32)
    gate = jax.nn.sigmoid(z)
    return y, z, gate, y * z * gate


def _fwd_kernel(y_ref, z_ref, w_ref, out_ref, rstd_ref, *, n, width, rows, steps, eps):
    g, col, col_ok = _columns(width)
    w = plgpu.load(w_ref.at[col], mask=col_ok, other=0.0).astype(jnp.float32)

    def tile(r, mask, row_ok, carry):
        _, _, _, gated = _gated(y_ref, z_ref, r, col, mask)
        rstd = jax.lax.rsqrt(jnp.sum(gated * gated, axis=1, keepdims=True) / width + eps)  # [rows, 1]
        plgpu.store(out_ref.at[r, col], (gated * rstd * w).astype(out_ref.dtype), mask=mask)
        plgpu.store(rstd_ref.at[r[:, 0], g], rstd[:, 0], mask=row_ok)
        return carry

    _walk(n, rows, steps, col_ok, tile, 0)


def _bwd_kernel(y_ref, z_ref, w_ref, rstd_ref, dout_ref, dy_ref, dz_ref, dw_ref, *, n, width, rows, steps):
    g, col, col_ok = _columns(width)
    w = plgpu.load(w_ref.at[col], mask=col_ok, other=0.0).astype(jnp.float32)
    m = pl.program_id(0)

    def tile(r, mask, row_ok, dw):
        y, z, gate, gated = _gated(y_ref, z_ref, r, col, mask)
        rstd = plgpu.load(rstd_ref.at[r[:, 0], g], mask=row_ok, other=0.0)[:, None]
        dout = plgpu.load(dout_ref.at[r, col], mask=mask, other=0.0).astype(jnp.float32)
        normed = gated * rstd
        dnormed = dout * w
        dgated = rstd * (dnormed - normed * (jnp.sum(dnormed * normed, axis=1, keepdims=True) / width))
        plgpu.store(dy_ref.at[r, col], (dgated * z * gate).astype(dy_ref.dtype), mask=mask)
        dz = dgated * y * gate * (1.0 + z * (1.0 - gate))
        plgpu.store(dz_ref.at[r, col], dz.astype(dz_ref.dtype), mask=mask)
        return dw + dout * normed  # rows past the end read dout = 0

    dw = _walk(n, rows, steps, col_ok, tile, jnp.zeros((rows, next_pow2(width)), jnp.float32))
    plgpu.store(dw_ref.at[m, col], jnp.sum(dw, axis=0, keepdims=True), mask=col_ok)


def _launch(kernel, args, out_shape, n, width, groups, launch: Launch, interpret, name):
    return pl.pallas_call(
        functools.partial(kernel, n=n, width=width, rows=launch.rows(width), steps=launch.steps),
        out_shape=out_shape,
        grid=(launch.programs(n, width), groups),
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
    programs = launch.programs(n, width)
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
