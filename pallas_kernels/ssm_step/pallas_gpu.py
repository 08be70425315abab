"""One SSM decode step as a single Pallas kernel for GPUs (Triton lowering).

At batch 1 a decode step is bound by launches, not bytes: run as XLA ops, the conv, its SiLU,
softplus, the state update, the readout and the gated norm of one token are a dozen small
kernels per layer. Here one program per (batch row, stream) does all of it, between the
in-projection and out-projection matmuls that XLA keeps: it reads the token's projection, the
conv history and the scan state once, and writes the gated output, the state and the history
(those two in place: they alias their inputs).

A program owns one B/C group of one stream of one row: the group's I/G channels are also one
group of the gated norm, so programs share nothing. It works on channel vectors: x, the
state's rows and the gated output are laid out by channel c = head · P + p ([I/G] and
[I/G, N]); a channel's dt, A and D are loaded at its head. Every size is padded to a power of
two (Triton's tiles), the padding masked off.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.common import iota, next_pow2, triton_params

_NUM_WARPS = 4


def _silu(x):
    return x / (1.0 + jnp.exp(-x))


def _softplus(x):
    return jnp.where(x > 20.0, x, jnp.log1p(jnp.exp(jnp.minimum(x, 20.0))))


def _kernel(pos_ref, u_ref, conv_ref, scan_ref, w_ref, alog_ref, d_ref, bias_ref, nw_ref, *out_refs, sizes, width):
    """Refs: pos [B]; u [B, S, Wd]; conv [B, w-1, S, C]; scan [B, S, I, N]; w [S, C, w];
    A_log, D, dt_bias [S, H]; norm weight [S, I]. Outputs: out [B, S, I], scan, conv (aliased).
    Program (row, stream s, group g)."""
    out_ref, scan_out_ref, conv_out_ref = out_refs[:3]
    f32 = jnp.float32
    row, s, g = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    inner, n, p = sizes.inner, sizes.state, sizes.head_dim
    span = inner // sizes.groups  # the group's channels
    pos = pos_ref[row]
    restart = pos == 0
    r = iota(next_pow2(width))[:, None]  # window rows, oldest first: row r is lag w-1-r
    taps = (r < width) & ((width - 1) - r <= pos)  # no tap reaches before the chunk

    def conv_part(first: int, size: int):
        """silu(conv) [size2] of channels [first, first + size) of the stream's x|B|C, and
        the new history of those channels (the window shifted up one row) stored."""
        c = iota(next_pow2(size))[None, :]
        ch = c < size
        hist = plgpu.load(
            conv_ref.at[row, jnp.minimum(r, width - 2), s, first + c],
            mask=(r < width - 1) & ch & ~restart,
            other=0.0,
        )
        new = plgpu.load(u_ref.at[row, s, inner + first + c], mask=ch, other=0.0)  # [1, size2]
        window = jnp.where(r == width - 1, new, hist)
        weight = plgpu.load(w_ref.at[s, first + c, jnp.minimum(r, width - 1)], mask=(r < width) & ch, other=0.0)
        # Row r of the window becomes row r - 1 of the history (rows past the end: out of range, masked).
        up = jnp.where(r >= 1, r - 1, width)
        plgpu.store(
            conv_out_ref.at[row, up, s, first + c], window.astype(conv_out_ref.dtype), mask=(r >= 1) & (r < width) & ch
        )
        conv = jnp.sum(jnp.where(taps & ch, window.astype(f32) * weight.astype(f32), 0.0), axis=0)
        return _silu(conv)

    x = conv_part(g * span, span)  # [I2], zero past the group's channels
    b = conv_part(inner + g * n, n)  # [N2]
    cm = conv_part(inner + (sizes.groups + g) * n, n)

    c = g * span + iota(next_pow2(span))  # the stream's channels of this group
    ch = c < (g + 1) * span
    head = jnp.minimum(c // p, sizes.heads - 1)
    dt_raw = plgpu.load(u_ref.at[row, s, inner + sizes.conv_channels + head], mask=ch, other=0.0).astype(f32)
    dt = _softplus(dt_raw + plgpu.load(bias_ref.at[s, head], mask=ch, other=0.0))
    a = -jnp.exp(plgpu.load(alog_ref.at[s, head], mask=ch, other=0.0))
    d = plgpu.load(d_ref.at[s, head], mask=ch, other=0.0)
    decay = jnp.where(restart, 0.0, jnp.exp(dt * a))

    k = iota(next_pow2(n))[None, :]
    cell = ch[:, None] & (k < n)
    state = plgpu.load(scan_ref.at[row, s, c[:, None], k], mask=cell, other=0.0)  # [I2, N2]
    state = decay[:, None] * state + (dt * x)[:, None] * b[None, :]
    plgpu.store(scan_out_ref.at[row, s, c[:, None], k], state, mask=cell)
    y = jnp.sum(state * cm[None, :], axis=1) + d * x  # [I2]

    z = plgpu.load(u_ref.at[row, s, c], mask=ch, other=0.0).astype(f32)
    gated = y * _silu(z)  # zero past I
    normed = gated * jax.lax.rsqrt(jnp.sum(gated * gated) / span + sizes.eps)
    out = normed * plgpu.load(nw_ref.at[s, c], mask=ch, other=0.0)
    plgpu.store(out_ref.at[row, s, c], out.astype(out_ref.dtype), mask=ch)


def ssm_step_pallas_gpu(
    zxbcdt, conv, scan, conv_weight, A_log, D, dt_bias, norm_weight, position_in_chunk, *, sizes, interpret=False
):
    """``api.ssm_step`` as one kernel launch; ``interpret``: in the Pallas interpreter."""
    b = zxbcdt.shape[0]
    s, h = sizes.streams, sizes.heads
    width = conv_weight.shape[1]
    f32 = jnp.float32
    args = (
        position_in_chunk.astype(jnp.int32),
        zxbcdt.reshape(b, s, sizes.projection),
        conv.reshape(b, width - 1, s, sizes.conv_channels),
        scan.astype(f32).reshape(b, s, sizes.inner, sizes.state),
        conv_weight.reshape(s, sizes.conv_channels, width),
        A_log.astype(f32).reshape(s, h),
        D.astype(f32).reshape(s, h),
        dt_bias.astype(f32).reshape(s, h),
        norm_weight.astype(f32).reshape(s, sizes.inner),
    )
    out_shape = (
        jax.ShapeDtypeStruct((b, s, sizes.inner), zxbcdt.dtype),
        jax.ShapeDtypeStruct(args[3].shape, f32),
        jax.ShapeDtypeStruct(args[2].shape, conv.dtype),
    )
    out, new_scan, new_conv = pl.pallas_call(
        functools.partial(_kernel, sizes=sizes, width=width),
        out_shape=out_shape,
        grid=(b, s, sizes.groups),
        input_output_aliases={3: 1, 2: 2},
        compiler_params=triton_params(_NUM_WARPS, 1),
        interpret=interpret,
        name="ssm_step",
    )(*args)
    return out, new_scan.reshape(scan.shape), new_conv.reshape(conv.shape)
