"""The Mamba-2 SSM that produces Attamba's keys (and, separately, values).

    [z | x | B | C | dt] = u @ W_in                    widths I, I, G·N, G·N, Hs
    x, B, C = silu(causal_depthwise_conv(x, B, C))      restarts at every chunk start
    y = SSD(x, dt=softplus(dt [+ dt_bias]), A=-exp(A_log), B, C, D)   restarts likewise
    out = W_out(RMSNorm(y * silu(z)))                   I -> dim

State and conv history restart at the start of every chunk of the layer's grid, so
the output at a boundary summarises exactly the chunk that ends there.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attamba_jax.chunking import ChunkGrid
from attamba_jax.config import ModelConfig
from attamba_jax.layers import Dense, RMSNorm, truncated_normal
from pallas_kernels.ssd import ssd


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


def _inverse_softplus(y: jax.Array) -> jax.Array:
    return y + jnp.log(-jnp.expm1(-y))


class Mamba2(nnx.Module):
    """One chunk-reset Mamba-2 SSM, ``dim -> dim``."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, inner = cfg.dim, cfg.ssm_inner_dim
        self.inner, self.state, self.heads, self.groups = inner, cfg.ssm_state_dim, cfg.ssm_heads, cfg.ssm_groups
        dtype = jnp.dtype(cfg.dtype)
        conv_ch = inner + 2 * self.groups * self.state
        self.in_proj = Dense(d, 2 * inner + 2 * self.groups * self.state + self.heads, std=d**-0.5, axes=("embed", "ssm_inner"), dtype=dtype, rngs=rngs)
        self.conv_weight = nnx.Param(truncated_normal(rngs.params(), (conv_ch, cfg.ssm_conv_width), 0.5), logical_axes=("ssm_inner", None))
        a = jax.random.uniform(rngs.params(), (self.heads,), jnp.float32, cfg.ssm_a_init_min, cfg.ssm_a_init_max)
        self.A_log = nnx.Param(jnp.log(a), logical_axes=("ssm_heads",))
        self.D = nnx.Param(jnp.ones((self.heads,), jnp.float32), logical_axes=("ssm_heads",))
        if cfg.ssm_dt_bias:
            # Mamba-2's dt initialisation: log-uniform in [1e-3, 0.1], floored at 1e-4.
            u = jax.random.uniform(rngs.params(), (self.heads,), jnp.float32)
            dt = jnp.maximum(jnp.exp(u * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)), 1e-4)
            self.dt_bias = nnx.Param(_inverse_softplus(dt), logical_axes=("ssm_heads",))
        else:
            self.dt_bias = None
        self.norm = RMSNorm(inner, eps=cfg.norm_eps, axis_name="ssm_inner", groups=self.groups)
        self.out_proj = Dense(inner, d, std=inner**-0.5, axes=("ssm_inner", "embed"), dtype=dtype, rngs=rngs)
        self.implementation = cfg.ssm_implementation

    def __call__(self, u: jax.Array, grid: ChunkGrid) -> jax.Array:
        """u: [B, T, dim] -> [B, T, dim], restarting at every chunk start of ``grid``."""
        b, t, _ = u.shape
        inner, gn, hs = self.inner, self.groups * self.state, self.heads
        zxbcdt = self.in_proj(u)  # [B, T, 2I + 2GN + Hs]
        z, xbc, dt = jnp.split(zxbcdt, [inner, 2 * inner + 2 * gn], axis=-1)
        position = jnp.asarray(grid.position_in_chunk(np.arange(t)))
        xbc = jax.nn.silu(chunk_causal_conv(xbc, self.conv_weight[...].astype(xbc.dtype), position))
        x, B, C = jnp.split(xbc, [inner, inner + gn], axis=-1)
        dt = dt.astype(jnp.float32)
        if self.dt_bias is not None:
            dt = dt + self.dt_bias[...]
        y = ssd(
            x.reshape(b, t, hs, inner // hs),
            jax.nn.softplus(dt),
            -jnp.exp(self.A_log[...]),
            B.reshape(b, t, self.groups, self.state),
            C.reshape(b, t, self.groups, self.state),
            self.D[...],
            grid=grid,
            implementation=self.implementation,
        ).reshape(b, t, inner)
        return self.out_proj(self.norm(y * jax.nn.silu(z)))
