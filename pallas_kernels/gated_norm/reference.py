"""The ground truth of the gated grouped RMSNorm, in plain jax.numpy: the gate in the inputs' dtype
(exact in float32), the norm in float32.

Over the last axis of C channels, in ``groups`` groups of C/groups consecutive channels:

    g = y * silu(z)
    out = g / sqrt(mean_group(g²) + eps) * weight

Mamba-2's gated norm, as ``StackedMamba2`` applies it to its S streams' outputs side by side
(S·G groups: each stream's groups are normalised alone).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def group_rms_norm(x, weight, *, groups: int, eps: float):
    """x [..., C] scaled per group of C/groups channels by its root mean square, then by
    ``weight`` [C]. Float32."""
    shape = x.shape
    by_group = x.astype(jnp.float32).reshape(shape[:-1] + (groups, shape[-1] // groups))
    normed = by_group * jax.lax.rsqrt(jnp.mean(jnp.square(by_group), axis=-1, keepdims=True) + eps)
    return normed.reshape(shape) * weight.astype(jnp.float32)


def gated_norm_reference(y, z, weight, *, groups: int, eps: float):
    """Args and returns: see ``api.gated_norm``. The gate in the inputs' dtype, the norm in float32."""
    return group_rms_norm(y * jax.nn.silu(z), weight, groups=groups, eps=eps).astype(y.dtype)
