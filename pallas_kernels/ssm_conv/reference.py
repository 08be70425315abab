"""The ground truth of the SSMs' input side, in plain jax.numpy: the conv in the in-projection's
dtype (exact in float32; in bfloat16 what XLA makes of it, the model's training forward when the
kernel is not named), softplus in float32.

Per token and stream s, with the stream's in-projection ``[z | xBC | dt]`` (widths I, I + 2GN, H)
and ``p`` the token's position in its chunk:

    x, B, C = silu(sum over lags j <= min(p, w-1) of weight[:, w-1-j] * xBC[t-j])
    dt = softplus(dt + dt_bias)

The conv's taps never reach into an earlier chunk (SPEC: the conv restarts with the state). z
passes through. This is ``StackedMamba2``'s forward before the SSD; its decode step
(``pallas_kernels.ssm_step``) computes the same for one token from a history ring.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def chunk_causal_conv(x: jax.Array, weight: jax.Array, position_in_chunk: jax.Array) -> jax.Array:
    """Depthwise causal conv whose taps never reach into an earlier chunk.

    out[t] = sum_j weight[:, W-1-j] * x[t-j] over lags j <= position_in_chunk[t].

    Args:
      x: [B, T, C]; weight: [C, W] (last tap = current token);
      position_in_chunk: [T] or [B, T] ints (0 at each chunk start).
    """
    width = weight.shape[1]
    pos = position_in_chunk[..., None] if position_in_chunk.ndim == 2 else position_in_chunk[None, :, None]
    out = x * weight[:, width - 1]
    for lag in range(1, width):
        shifted = jnp.pad(x, ((0, 0), (lag, 0), (0, 0)))[:, : x.shape[1]]
        out = out + jnp.where(pos >= lag, shifted, 0) * weight[:, width - 1 - lag]
    return out


def ssm_conv_reference(zxbcdt, conv_weight, dt_bias, position_in_chunk, *, sizes):
    """Args and returns: see ``api.ssm_conv``."""
    f32 = jnp.float32
    b, t = zxbcdt.shape[:2]
    s, inner, gn = sizes.streams, sizes.inner, sizes.groups * sizes.state
    u = zxbcdt.reshape(b, t, s, sizes.projection)
    z, xbc, dt = u[..., :inner], u[..., inner : inner + sizes.conv_channels], u[..., inner + sizes.conv_channels :]
    xbc = xbc.reshape(b, t, -1)
    act = jax.nn.silu(chunk_causal_conv(xbc, conv_weight.astype(xbc.dtype), position_in_chunk))
    act = act.reshape(b, t, s, sizes.conv_channels)
    x = act[..., :inner].reshape(b, t, s * sizes.heads, sizes.head_dim)
    B, C = (
        act[..., inner + i * gn : inner + (i + 1) * gn].reshape(b, t, s * sizes.groups, sizes.state) for i in (0, 1)
    )
    dt = dt.reshape(b, t, s * sizes.heads).astype(f32)
    if dt_bias is not None:
        dt = dt + dt_bias.astype(f32)
    return z.reshape(b, t, s * inner), x, B, C, jax.nn.softplus(dt)
