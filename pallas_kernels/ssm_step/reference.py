"""The ground truth of one SSM decode step, in plain jax.numpy (float32 throughout).

Per row and stream s, with the token's in-projection ``[z | xBC | dt]`` (widths I, I + 2GN, H)
and ``p`` its position in its chunk (0: it starts one, and the state and conv history restart):

    window[w-1-j] = the raw conv input of the chunk's token p - j   (j = 0: xBC; history slot (p-j) % w)
    x, B, C = silu(sum over lags j <= p of weight[:, w-1-j] * window[w-1-j])
    dt = softplus(dt + dt_bias);  A = -exp(A_log)
    h = exp(dt A) [p > 0] h + dt x ⊗ B          (head k of the stream reads its group k // (H/G))
    y = h · C + D x
    out = RMSNorm_groups(y * silu(z)) * norm_weight                groups of I/G channels

The conv history is a ring of w slots: the chunk's token at position q holds slot q % w, and a
slot no token of the chunk has reached yet holds zero. The step writes its token's slot p % w,
which holds no token it reads, and at a restart (which reads none) zeroes the others, so a kernel
may update the history in place while other programs read it. This is ``StackedMamba2``'s decode
step (``attamba_jax.ssm``), the parallel forward's math for one token.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.gated_norm.reference import group_rms_norm

_HI = jax.lax.Precision.HIGHEST


def ssm_step_reference(
    zxbcdt, conv, scan, conv_weight, A_log, D, dt_bias, norm_weight, position_in_chunk, *, sizes, offset=0
):
    """Args and returns: see ``api.ssm_step`` (``sizes``: its ``SsmSizes``)."""
    f32 = jnp.float32
    b = zxbcdt.shape[0]
    s, h, p, n, g = sizes.streams, sizes.heads, sizes.head_dim, sizes.state, sizes.groups
    inner, width = sizes.inner, conv_weight.shape[1]
    u = zxbcdt[:, offset:].reshape(b, s, sizes.projection)
    z, xbc, dt = u[..., :inner], u[..., inner : inner + sizes.conv_channels], u[..., inner + sizes.conv_channels :]
    start = position_in_chunk == 0  # [B]
    ring = conv.reshape(b, width, s, sizes.conv_channels)
    lag = (width - 1) - jnp.arange(width)  # window row r holds lag w-1-r: oldest first
    taps = lag[None, :] <= position_in_chunk[:, None]  # [B, w]: no tap reaches before the chunk
    slots = history_slot(position_in_chunk[:, None] - lag[None, :], width)  # [B, w]
    window = jnp.take_along_axis(ring, slots[:, :, None, None], axis=1).at[:, -1].set(xbc)  # [B, w, S, C]
    window = jnp.where(taps[:, :, None, None], window, 0).astype(f32)
    weight = conv_weight.reshape(s, sizes.conv_channels, width).astype(f32)
    act = jax.nn.silu(jnp.einsum("bwsc,scw->bsc", window, weight, precision=_HI))
    x = act[..., :inner].reshape(b, s * h, p)
    B_, C_ = (act[..., inner + i * g * n : inner + (i + 1) * g * n].reshape(b, s, g, n) for i in (0, 1))
    heads_of_group = h // g
    B_, C_ = (jnp.repeat(m, heads_of_group, axis=2).reshape(b, s * h, n) for m in (B_, C_))
    dt = jax.nn.softplus(dt.reshape(b, s * h).astype(f32) + dt_bias.astype(f32))
    decay = jnp.exp(dt * -jnp.exp(A_log.astype(f32))) * (~start)[:, None]
    state = decay[..., None, None] * scan.astype(f32) + (dt[..., None] * x)[..., None] * B_[:, :, None, :]
    y = jnp.einsum("bkpn,bkn->bkp", state, C_, precision=_HI) + D.astype(f32)[:, None] * x
    gated = y.reshape(b, s * inner) * jax.nn.silu(z.reshape(b, s * inner).astype(f32))
    out = group_rms_norm(gated, norm_weight, groups=s * g, eps=sizes.eps).reshape(b, s, inner)
    rows = jnp.arange(b)
    ring = jnp.where(start[:, None, None, None], 0, ring).at[rows, history_slot(position_in_chunk, width)]
    ring = ring.set(xbc.astype(conv.dtype))
    return out.astype(zxbcdt.dtype), state, ring.reshape(conv.shape)


def history_slot(position_in_chunk, width: int):
    """The conv-history slot of the chunk's token at ``position_in_chunk`` (>= -(w-1)): its
    position modulo the conv width ``width``."""
    return (position_in_chunk + width) % width


def random_inputs(key, batch: int, sizes, width: int, dtype=jnp.float32, dt_bias: bool = True):
    """Random ``ssm_step`` arguments of realistic magnitudes (tests, benchmarks): the projection and
    conv history ~ N(0, 1) in ``dtype``, the scan state ~ N(0, 1), conv weights ~ N(0, 0.25), A in
    [-16, -1] (the paper's initialisation), D ~ N(0, 1), the norm weight ~ 1 + N(0, 0.01), and
    positions in their chunk from 0 (a restart) to past the conv's reach."""
    ks = jax.random.split(key, 9)
    s, f32 = sizes.streams, jnp.float32
    heads = s * sizes.heads
    return (
        jax.random.normal(ks[0], (batch, s * sizes.projection)).astype(dtype),
        jax.random.normal(ks[1], (batch, width, s * sizes.conv_channels)).astype(dtype),
        jax.random.normal(ks[2], (batch, heads, sizes.head_dim, sizes.state), f32),
        0.5 * jax.random.normal(ks[3], (s * sizes.conv_channels, width), f32),
        jnp.log(jax.random.uniform(ks[4], (heads,), f32, 1.0, 16.0)),
        jax.random.normal(ks[5], (heads,), f32),
        jax.random.normal(ks[6], (heads,), f32) if dt_bias else None,
        1.0 + 0.1 * jax.random.normal(ks[7], (s * sizes.inner,), f32),
        jax.random.randint(ks[8], (batch,), 0, width + 2),
    )
