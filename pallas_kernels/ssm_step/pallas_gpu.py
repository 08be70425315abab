"""One SSM decode step as a Pallas kernel for GPUs (Triton lowering) and a grouped-norm epilogue.

At batch 1 a decode step is bound by launches and latency, not bytes: run as XLA ops, the conv,
its SiLU, softplus, the state update, the readout and the gate of one token are a dozen small
kernels per layer. Here one kernel does all of it, between the in-projection and out-projection
matmuls that XLA keeps: it reads the token's projection, the conv history and the scan state
once, and writes the gated output and, in place (aliasing their inputs), the state and the
token's slot of the history ring. The heads of a group read their B/C history while its first
head writes it, and programs run in no fixed order: the ring is what makes that safe, since the
slot written holds no token the step reads (a restart, which reads none, also zeroes the rest).
The grouped RMSNorm of the gated output is left to XLA (one small fusion), since its statistic
spans heads that different programs own.

A program owns one head of one stream of one row (S·H programs per row: 16 for the paper's K and
V SSMs at batch 1, each a [P, N] state), so that no program walks a whole group. It also
convolves its group's B and C channels (each head of the group does, a few hundred
multiply-adds); the group's first head writes their slot. Every load is issued before the
token's position is known (the whole history ring is read, its rows then picked by position), so
loads do not wait on one another. Sizes are padded to powers of two (Triton's tiles), the padding
masked off.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.common import iota, next_pow2, triton_params
from pallas_kernels.gated_norm.reference import group_rms_norm
from pallas_kernels.ssm_step import reference

_NUM_WARPS = 1  # a program's work is one head: [P, N] of state


def _silu(x):
    return x / (1.0 + jnp.exp(-x))


def _softplus(x):
    return jnp.where(x > 20.0, x, jnp.log1p(jnp.exp(jnp.minimum(x, 20.0))))


def _kernel(pos_ref, u_ref, conv_ref, scan_ref, w_ref, alog_ref, d_ref, bias_ref, *out_refs, sizes, width, offset):
    """Refs: pos [B]; u [B, offset + S·Wd] (stream s's in-projection from column offset + s·Wd);
    conv [B, w, S, C] (a ring); scan [B, S, I, N]; w [S, C, w];
    A_log, D, dt_bias [S, H]. Outputs: gated [B, S, I] f32, scan and conv (both aliased).
    Program (row, stream s, head h)."""
    gated_ref, scan_out_ref, conv_out_ref = out_refs[:3]
    f32 = jnp.float32
    row, s, h = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    inner, n, p = sizes.inner, sizes.state, sizes.head_dim
    g = h // (sizes.heads // sizes.groups)  # the head's B/C group
    first_of_group = h % (sizes.heads // sizes.groups) == 0  # writes the group's B/C history
    pos = pos_ref[row]
    restart = pos == 0
    r = iota(next_pow2(width))[:, None]  # window rows, oldest first: row r is lag w-1-r
    lag = (width - 1) - r
    taps = (r < width) & (lag <= pos)  # no tap reaches before the chunk
    slots = reference.history_slot(pos - lag, width)  # each window row's slot (rows past the end: masked)
    own_slot = reference.history_slot(pos, width)
    u_of = lambda column: u_ref.at[row, offset + s * sizes.projection + column]  # the stream's in-projection

    def conv_part(first: int, size: int, owner):
        """silu(conv) [size2] of channels [first, first + size) of the stream's x|B|C; where
        ``owner``, the token's raw inputs are stored in its history slot."""
        c = iota(next_pow2(size))[None, :]
        ch = c < size
        # The whole ring, loaded whatever the position (no load waits on it), then each window row
        # picked from its slot; the taps drop what precedes the chunk.
        ring = [plgpu.load(conv_ref.at[row, k, s, first + c], mask=ch, other=0.0) for k in range(width)]
        hist = functools.reduce(jnp.add, [jnp.where(slots == k, ring[k], 0.0) for k in range(width)])
        new = plgpu.load(u_of(inner + first + c), mask=ch, other=0.0)  # [1, size2]
        weight = plgpu.load(w_ref.at[s, first + c, jnp.minimum(r, width - 1)], mask=(r < width) & ch, other=0.0)
        # The token's slot; at a restart the others are zeroed too (no program reads them then).
        for k in range(width):
            mine = own_slot == k
            plgpu.store(
                conv_out_ref.at[row, k, s, first + c],
                jnp.where(mine, new, 0.0).astype(conv_out_ref.dtype),
                mask=(mine | restart) & ch & owner,
            )
        window = jnp.where(r == width - 1, new, hist)
        conv = jnp.sum(jnp.where(taps & ch, window.astype(f32) * weight.astype(f32), 0.0), axis=0)
        return _silu(conv)

    x = conv_part(h * p, p, True)  # [P2], zero past P
    b = conv_part(inner + g * n, n, first_of_group)  # [N2]
    cm = conv_part(inner + (sizes.groups + g) * n, n, first_of_group)

    c = iota(next_pow2(p))
    ch = c < p
    channel = h * p + c  # the head's channels of the stream
    dt = _softplus(plgpu.load(u_of(inner + sizes.conv_channels + h)).astype(f32) + bias_ref[s, h])
    decay = jnp.where(restart, 0.0, jnp.exp(dt * -jnp.exp(alog_ref[s, h])))

    k = iota(next_pow2(n))[None, :]
    cell = ch[:, None] & (k < n)
    state = plgpu.load(scan_ref.at[row, s, channel[:, None], k], mask=cell, other=0.0)  # [P2, N2]
    state = decay * state + (dt * x)[:, None] * b[None, :]
    plgpu.store(scan_out_ref.at[row, s, channel[:, None], k], state, mask=cell)
    y = jnp.sum(state * cm[None, :], axis=1) + d_ref[s, h] * x  # [P2]
    z = plgpu.load(u_of(channel), mask=ch, other=0.0).astype(f32)
    plgpu.store(gated_ref.at[row, s, channel], y * _silu(z), mask=ch)


def ssm_step_pallas_gpu(
    zxbcdt,
    conv,
    scan,
    conv_weight,
    A_log,
    D,
    dt_bias,
    norm_weight,
    position_in_chunk,
    *,
    sizes,
    offset=0,
    interpret=False,
):
    """``api.ssm_step`` as one kernel launch; ``interpret``: in the Pallas interpreter."""
    b = zxbcdt.shape[0]
    s, h = sizes.streams, sizes.heads
    width = conv_weight.shape[1]
    f32 = jnp.float32
    args = (
        position_in_chunk.astype(jnp.int32),
        zxbcdt,
        conv.reshape(b, width, s, sizes.conv_channels),
        scan.astype(f32).reshape(b, s, sizes.inner, sizes.state),
        conv_weight.reshape(s, sizes.conv_channels, width),
        A_log.astype(f32).reshape(s, h),
        D.astype(f32).reshape(s, h),
        dt_bias.astype(f32).reshape(s, h),
    )
    out_shape = (
        jax.ShapeDtypeStruct((b, s, sizes.inner), f32),
        jax.ShapeDtypeStruct(args[3].shape, f32),
        jax.ShapeDtypeStruct(args[2].shape, conv.dtype),
    )
    gated, new_scan, new_conv = pl.pallas_call(
        functools.partial(_kernel, sizes=sizes, width=width, offset=offset),
        out_shape=out_shape,
        grid=(b, s, h),
        input_output_aliases={2: 2, 3: 1},  # the history ring and the scan state, in place
        compiler_params=triton_params(_NUM_WARPS, 1),
        interpret=interpret,
        name="ssm_step",
    )(*args)
    out = group_rms_norm(gated.reshape(b, -1), norm_weight, groups=s * sizes.groups, eps=sizes.eps)  # the epilogue
    out = out.reshape(b, s, sizes.inner).astype(zxbcdt.dtype)
    return out, new_scan.reshape(scan.shape), new_conv.reshape(conv.shape)
