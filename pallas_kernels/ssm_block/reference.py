"""The plain composition of the Mamba-2 block core, piece by piece (the fused kernel's reference).

Per stream, the input projection's output row is laid out ``[z | x | B | C | dt]`` with widths
I, I, G·N, G·N, Hs (``SsmDims``). From it:

    dt = softplus(dt [+ dt_bias])                      float32
    x, B, C = silu(chunk_causal_conv([x | B | C]))     restarts at every chunk start
    y = SSD(x, dt, A, B, C, D)                         restarts likewise
    out = RMSNorm_G(y * silu(z)) * norm_weight         each of the G groups of I/G channels alone

``out`` feeds the output projection. The pieces are also what prefill and decode run.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from attamba_jax.chunking import ChunkGrid
from attamba_jax.layers import rms_norm
from pallas_kernels.ssd import ssd


class SsmDims(NamedTuple):
    """Per-stream sizes: inner width I, heads Hs, B/C groups G, state N."""

    inner: int
    heads: int
    groups: int
    state: int

    @property
    def head_dim(self) -> int:
        return self.inner // self.heads

    @property
    def conv_channels(self) -> int:
        return self.inner + 2 * self.groups * self.state

    @property
    def width(self) -> int:
        """Columns of one stream's projection row: [z | x | B | C | dt]."""
        return 2 * self.inner + 2 * self.groups * self.state + self.heads


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


def split_projection(zxbcdt: jax.Array, dims: SsmDims, dt_bias: jax.Array | None):
    """[B, T, S, width] -> z [B, T, S·I], xbc [B, T, S·(I+2GN)] (pre-conv), dt [B, T, S·Hs] (f32, softplus)."""
    b, t = zxbcdt.shape[:2]
    z, xbc, dt = jnp.split(zxbcdt, [dims.inner, dims.inner + dims.conv_channels], axis=-1)
    dt = dt.reshape(b, t, -1).astype(jnp.float32)
    if dt_bias is not None:
        dt = dt + dt_bias
    return z.reshape(b, t, -1), xbc.reshape(b, t, -1), jax.nn.softplus(dt)


def conv_silu(xbc: jax.Array, weight: jax.Array, position: jax.Array, dims: SsmDims):
    """Chunk-causal conv + silu of xbc [B, T, S·(I+2GN)] -> x [B, T, S·Hs, P], B and C [B, T, S·G, N]."""
    b, t, _ = xbc.shape
    gn = dims.groups * dims.state
    xbc = jax.nn.silu(chunk_causal_conv(xbc, weight.astype(xbc.dtype), position))
    xbc = xbc.reshape(b, t, -1, dims.conv_channels)
    x, B, C = jnp.split(xbc, [dims.inner, dims.inner + gn], axis=-1)
    return (
        x.reshape(b, t, -1, dims.head_dim),
        B.reshape(b, t, -1, dims.state),
        C.reshape(b, t, -1, dims.state),
    )


def gated_norm(y: jax.Array, z: jax.Array, weight: jax.Array, *, eps: float, groups: int) -> jax.Array:
    """RMSNorm over ``groups`` channel groups of y·silu(z): y [B, T, H, P], z [B, T, H·P] -> [B, T, H·P]."""
    b, t = z.shape[:2]
    return rms_norm(y.reshape(b, t, -1) * jax.nn.silu(z), weight, eps=eps, groups=groups)


def ssm_block_composed(
    zxbcdt, conv_weight, dt_bias, A, D, norm_weight, *, dims: SsmDims, grid: ChunkGrid, eps: float,
    ssd_implementation="auto",
) -> jax.Array:
    """The block core as separate XLA ops around ``ssd(implementation=ssd_implementation)``.

    Args:
      zxbcdt: [B, T, S, width] (``SsmDims.width``), S independent streams.
      conv_weight: [S·(I+2GN), W]; dt_bias: [S·Hs] or None; A, D: [S·Hs]; norm_weight: [S·I].

    Returns:
      [B, T, S, I] in zxbcdt.dtype: the normalised, gated SSM output of each stream.
    """
    b, t, s, _ = zxbcdt.shape
    z, xbc, dt = split_projection(zxbcdt, dims, dt_bias)
    x, B, C = conv_silu(xbc, conv_weight, jnp.asarray(grid.position_in_chunk(np.arange(t))), dims)
    y = ssd(x, dt, A, B, C, D, grid=grid, implementation=ssd_implementation)
    return gated_norm(y, z, norm_weight, eps=eps, groups=s * dims.groups).reshape(b, t, s, dims.inner)
