"""The SSMs' input side as Pallas kernels for GPUs (Triton lowering), forward and backward.

Differentiated as a composition, XLA spreads this over many fusions: the split of the
in-projection, the conv's shifted copies, SiLU and softplus forward; backward, the conv's
transpose, the conv weight's reduction over every token, and a concatenation that assembles the
in-projection's gradient from its pieces. Here each direction is one pass over the tokens.

A program owns ``Launch.rows`` consecutive tokens of one row and one stream and walks the stream's
channels in slabs. The conv reads each token's earlier (forward) or later (backward) neighbours
straight from the in-projection in memory, whichever program owns them (they are in cache), so
chunks need not align with the programs' tokens; the taps stop at the chunk start by position.

Forward: read the in-projection once, write z (passed through), x, B, C (after the conv and
SiLU) and dt (softplus, float32). Backward: read the in-projection and the gradients of the
five outputs, write the in-projection's gradient whole (z's columns copied from its gradient),
and per program its tokens' share of the conv weight and dt-bias gradients (float32; the caller
sums them), so no program reduces over all tokens. Channel counts are padded to powers of two
(Triton's tiles), the padding masked off.
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
    sweeps them). The slab is chosen by registers, not yet by time: 108 a thread in the backward
    against 179 for slabs of 64, so twice the warps per SM for the same bytes (``BENCHMARKS.md``,
    "Registers per thread without a GPU")."""

    rows: int = 16  # tokens per program
    slab: int = 32  # channels per step of a program's walk
    num_warps: int = 4

    def __post_init__(self):
        for name in ("rows", "slab"):
            v = getattr(self, name)
            if v < 1 or v & (v - 1):
                raise ValueError(f"ssm_conv Launch.{name} must be a power of two, got {v}")
        if self.num_warps < 1:
            raise ValueError(f"ssm_conv Launch.num_warps must be >= 1, got {self.num_warps}")


def _parts(sizes):
    """(first column in xBC, width, output index) of x, B and C."""
    gn = sizes.groups * sizes.state
    return ((0, sizes.inner, 0), (sizes.inner, gn, 1), (sizes.inner + gn, gn, 2))


def _slabs(size: int, launch: Launch):
    """Each slab's channel offsets [1, slab] and their mask."""
    slab = min(launch.slab, next_pow2(size))
    c = iota(slab)[None, :]
    return [(c0 + c, c0 + c < size) for c0 in range(0, size, slab)]


def _tokens(t: int, rows: int):
    """The program's row, token block and stream, its ``rows`` tokens [rows, 1] and their mask."""
    m, b, s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    r = m * rows + iota(rows)[:, None]
    return b, m, s, r, r < t


def _taps(w_ref, channels, ch, width):
    """The conv weight [1, slab] of each lag 0..w-1 (lag j: column w-1-j) of the stream's ``channels``."""
    return [
        plgpu.load(w_ref.at[channels, width - 1 - lag], mask=ch, other=0.0).astype(jnp.float32) for lag in range(width)
    ]


def _dt_raw(u_ref, bias_ref, b, r, ok, s, sizes):
    """The stream's dt columns [rows, H2] of the in-projection plus the bias (before softplus), their
    columns and mask."""
    heads, base = sizes.heads, s * sizes.projection + sizes.inner + sizes.conv_channels
    h = iota(next_pow2(heads))[None, :]
    hh = ok & (h < heads)
    raw = plgpu.load(u_ref.at[b, r, base + h], mask=hh, other=0.0).astype(jnp.float32)
    return raw + plgpu.load(bias_ref.at[s * heads + h], mask=h < heads, other=0.0), h, hh


class _Shifted:
    """The slab's conv inputs ``d`` tokens away from the program's tokens, each loaded (float32, zero
    outside the row) where it is first used: loaded all at once, the seven of a width-4 conv would
    be live together (more registers, fewer programs per SM: ``BENCHMARKS.md``)."""

    def __init__(self, u_ref, b, r, columns, mask, t):
        self.u_ref, self.b, self.r, self.columns, self.mask, self.t = u_ref, b, r, columns, mask, t
        self.loaded = {}

    def __getitem__(self, d: int):
        if d not in self.loaded:
            r = self.r + d
            ok = self.mask & (r >= 0) & (r < self.t)
            self.loaded[d] = plgpu.load(self.u_ref.at[self.b, r, self.columns], mask=ok, other=0.0).astype(jnp.float32)
        return self.loaded[d]


def _fwd_kernel(pos_ref, u_ref, w_ref, bias_ref, z_ref, x_ref, b_ref, c_ref, dt_ref, *, sizes, t, width, launch):
    f32 = jnp.float32
    b, _, s, r, ok = _tokens(t, launch.rows)
    inner, cc = sizes.inner, sizes.conv_channels
    base = s * sizes.projection  # the stream's first column of the in-projection
    pos = plgpu.load(pos_ref.at[b, r], mask=ok, other=0)
    for col, ch in _slabs(inner, launch):
        plgpu.store(z_ref.at[b, r, s * inner + col], plgpu.load(u_ref.at[b, r, base + col], mask=ok & ch), mask=ok & ch)
    outs = (x_ref, b_ref, c_ref)
    for first, size, k in _parts(sizes):
        for col, ch in _slabs(size, launch):
            acc = jnp.zeros((launch.rows, col.shape[1]), f32)
            for lag, w in enumerate(_taps(w_ref, s * cc + first + col, ch, width)):
                tap = ok & ch & (pos >= lag) & (r >= lag)  # no tap reaches before the chunk (or the row)
                acc = (
                    acc
                    + plgpu.load(u_ref.at[b, r - lag, base + inner + first + col], mask=tap, other=0.0).astype(f32) * w
                )
            plgpu.store(outs[k].at[b, r, s * size + col], jax.nn.silu(acc).astype(outs[k].dtype), mask=ok & ch)
    dt, h, hh = _dt_raw(u_ref, bias_ref, b, r, ok, s, sizes)
    plgpu.store(dt_ref.at[b, r, s * sizes.heads + h], jax.nn.softplus(dt), mask=hh)


def _bwd_kernel(
    pos_ref,
    u_ref,
    w_ref,
    bias_ref,
    dz_ref,
    dx_ref,
    db_ref,
    dc_ref,
    ddt_ref,
    du_ref,
    dw_ref,
    dbias_ref,
    *,
    sizes,
    t,
    width,
    launch,
):
    f32 = jnp.float32
    b, m, s, r, ok = _tokens(t, launch.rows)
    inner, cc, heads = sizes.inner, sizes.conv_channels, sizes.heads
    base = s * sizes.projection
    # The positions of the tokens j = 0..w-1 later (-1 past the end: no taps there).
    pos = [plgpu.load(pos_ref.at[b, r + j], mask=r + j < t, other=-1) for j in range(width)]
    for col, ch in _slabs(inner, launch):
        dz = plgpu.load(dz_ref.at[b, r, s * inner + col], mask=ok & ch)
        plgpu.store(du_ref.at[b, r, base + col], dz.astype(du_ref.dtype), mask=ok & ch)
    grads = (dx_ref, db_ref, dc_ref)
    for first, size, k in _parts(sizes):
        for col, ch in _slabs(size, launch):
            u_col = base + inner + first + col
            w = _taps(w_ref, s * cc + first + col, ch, width)  # w[lag]: the tap of lag ``lag``
            pre = _Shifted(u_ref, b, r, u_col, ch, t)  # the conv's inputs d tokens away, pre[d]
            dpre = jnp.zeros((launch.rows, col.shape[1]), f32)
            for j in range(width):
                # The gradient at the conv's output j tokens later, through SiLU, then its tap j.
                a = sum(w[lag] * jnp.where(pos[j] >= lag, pre[j - lag], 0.0) for lag in range(width))
                dact = plgpu.load(grads[k].at[b, r + j, s * size + col], mask=ch & (r + j < t), other=0.0).astype(f32)
                gate = jax.nn.sigmoid(a)
                g = dact * gate * (1.0 + a * (1.0 - gate))
                if j == 0:  # the program's own tokens' share of the weight gradient
                    for lag in range(width):
                        dw = jnp.sum(jnp.where(pos[0] >= lag, g * pre[-lag], 0.0), axis=0, keepdims=True)
                        plgpu.store(dw_ref.at[b, m, s * cc + first + col, width - 1 - lag], dw, mask=ch)
                dpre = dpre + jnp.where(pos[j] >= j, g, 0.0) * w[j]
            plgpu.store(du_ref.at[b, r, u_col], dpre.astype(du_ref.dtype), mask=ok & ch)
    raw, h, hh = _dt_raw(u_ref, bias_ref, b, r, ok, s, sizes)
    draw = plgpu.load(ddt_ref.at[b, r, s * heads + h], mask=hh, other=0.0) * jax.nn.sigmoid(raw)
    plgpu.store(du_ref.at[b, r, base + inner + cc + h], draw.astype(du_ref.dtype), mask=hh)
    plgpu.store(dbias_ref.at[b, m, s * heads + h], jnp.sum(draw, axis=0, keepdims=True), mask=h < heads)


def _launch(kernel, args, out_shape, b, t, sizes, launch: Launch, interpret, name):
    return pl.pallas_call(
        functools.partial(kernel, sizes=sizes, t=t, launch=launch),
        out_shape=out_shape,
        grid=(pl.cdiv(t, launch.rows), b, sizes.streams),  # token blocks first: the launch's largest axis
        compiler_params=triton_params(launch.num_warps, 1),
        interpret=interpret,
        name=name,
    )(*args)


def _bias(dt_bias, sizes):
    return jnp.zeros((sizes.streams * sizes.heads,), jnp.float32) if dt_bias is None else dt_bias.astype(jnp.float32)


def _forward(zxbcdt, conv_weight, dt_bias, position, sizes, launch, interpret):
    b, t = zxbcdt.shape[:2]
    s, gn, dtype = sizes.streams, sizes.groups * sizes.state, zxbcdt.dtype
    out_shape = (
        jax.ShapeDtypeStruct((b, t, s * sizes.inner), dtype),
        jax.ShapeDtypeStruct((b, t, s * sizes.inner), dtype),
        jax.ShapeDtypeStruct((b, t, s * gn), dtype),
        jax.ShapeDtypeStruct((b, t, s * gn), dtype),
        jax.ShapeDtypeStruct((b, t, s * sizes.heads), jnp.float32),
    )
    kernel = functools.partial(_fwd_kernel, width=conv_weight.shape[1])
    args = (position, zxbcdt, conv_weight, _bias(dt_bias, sizes))
    z, x, B, C, dt = _launch(kernel, args, out_shape, b, t, sizes, launch, interpret, "ssm_conv_fwd")
    bc = (b, t, s * sizes.groups, sizes.state)
    return z, x.reshape(b, t, s * sizes.heads, sizes.head_dim), B.reshape(bc), C.reshape(bc), dt


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _ssm_conv(zxbcdt, conv_weight, dt_bias, position, sizes, launch, interpret):
    return _forward(zxbcdt, conv_weight, dt_bias, position, sizes, launch, interpret)


def _ssm_conv_fwd(zxbcdt, conv_weight, dt_bias, position, sizes, launch, interpret):
    out = _forward(zxbcdt, conv_weight, dt_bias, position, sizes, launch, interpret)
    return out, (zxbcdt, conv_weight, dt_bias, position)


def _ssm_conv_bwd(sizes, launch, interpret, res, grads):
    zxbcdt, conv_weight, dt_bias, position = res
    dz, dx, dB, dC, ddt = grads
    b, t = zxbcdt.shape[:2]
    s, width = sizes.streams, conv_weight.shape[1]
    programs = pl.cdiv(t, launch.rows)
    out_shape = (
        jax.ShapeDtypeStruct(zxbcdt.shape, zxbcdt.dtype),
        jax.ShapeDtypeStruct((b, programs, s * sizes.conv_channels, width), jnp.float32),
        jax.ShapeDtypeStruct((b, programs, s * sizes.heads), jnp.float32),
    )
    flat = lambda a: a.reshape(b, t, -1)
    args = (
        position,
        zxbcdt,
        conv_weight,
        _bias(dt_bias, sizes),
        dz,
        flat(dx),
        flat(dB),
        flat(dC),
        ddt.astype(jnp.float32),
    )
    kernel = functools.partial(_bwd_kernel, width=width)
    du, dw, dbias = _launch(kernel, args, out_shape, b, t, sizes, launch, interpret, "ssm_conv_bwd")
    dw = jnp.sum(dw, axis=(0, 1)).astype(conv_weight.dtype)
    dbias = None if dt_bias is None else jnp.sum(dbias, axis=(0, 1)).astype(dt_bias.dtype)
    return du, dw, dbias, None


_ssm_conv.defvjp(_ssm_conv_fwd, _ssm_conv_bwd)


def ssm_conv_pallas_gpu(
    zxbcdt, conv_weight, dt_bias, position_in_chunk, *, sizes, interpret: bool = False, launch: Launch | None = None
):
    """``api.ssm_conv`` as one kernel launch forward and one backward; ``interpret``: in the
    Pallas interpreter; ``launch``: the programs' settings (default ``Launch()``)."""
    b, t = zxbcdt.shape[:2]
    position = jnp.broadcast_to(position_in_chunk.astype(jnp.int32), (b, t))
    return _ssm_conv(zxbcdt, conv_weight, dt_bias, position, sizes, launch or Launch(), interpret)
