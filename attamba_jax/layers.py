"""Small building blocks: projections, embeddings, RMSNorm, rotary embeddings.

Every parameter carries ``logical_axes`` metadata (embed, heads, kv, mlp, vocab,
ssm_inner, ssm_heads, ...) so that sharding is a table of rules, not model code.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from pallas_kernels.gated_norm import group_rms_norm


def truncated_normal(key, shape, std: float, dtype=jnp.float32) -> jax.Array:
    """N(0, std²) truncated at ±3 std (PyTorch's ``trunc_normal_(std, -3std, 3std)``)."""
    return (std * jax.random.truncated_normal(key, -3.0, 3.0, shape, jnp.float32)).astype(dtype)


class Dense(nnx.Module):
    """``y = x @ W`` without bias; W [in, out] float32, computed in ``dtype``."""

    def __init__(self, in_features: int, out_features: int, *, std: float, axes: tuple, dtype, rngs: nnx.Rngs):
        self.kernel = nnx.Param(truncated_normal(rngs.params(), (in_features, out_features), std), logical_axes=axes)
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.einsum("...i,io->...o", x.astype(self.dtype), self.kernel[...].astype(self.dtype))


def dense_of_one_input(x: jax.Array, layers: tuple[Dense, ...]) -> jax.Array:
    """``concatenate([layer(x) for layer in layers], -1)``: one matmul over their kernels side by side.

    For a single token, where a step is bound by kernel launches rather than bytes and XLA
    runs each matrix-vector product as two kernels. The layers share ``dtype``.
    """
    dtype = layers[0].dtype
    kernels = [layer.kernel[...].astype(dtype) for layer in layers]
    return jnp.einsum("...i,io->...o", x.astype(dtype), jnp.concatenate(kernels, axis=1))


class Embedding(nnx.Module):
    def __init__(self, vocab_size: int, dim: int, *, std: float, dtype, rngs: nnx.Rngs):
        self.embedding = nnx.Param(
            truncated_normal(rngs.params(), (vocab_size, dim), std), logical_axes=("vocab", "embed")
        )
        self.dtype = dtype

    def __call__(self, tokens: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], tokens, axis=0).astype(self.dtype)


class RMSNorm(nnx.Module):
    """``x * rsqrt(mean(x²) + eps) * w`` in float32, over groups of ``dim // groups`` channels."""

    def __init__(self, dim: int, *, eps: float, axis_name: str = "embed", groups: int = 1):
        self.weight = nnx.Param(jnp.ones((dim,), jnp.float32), logical_axes=(axis_name,))
        self.eps = eps
        self.groups = groups

    def __call__(self, x: jax.Array) -> jax.Array:
        return group_rms_norm(x, self.weight[...], groups=self.groups, eps=self.eps).astype(x.dtype)


def apply_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding on interleaved pairs (x[2i], x[2i+1]) — the GPT-J / LLaMA layout.

    Args:
      x: [B, T, H, D]; positions: [T] or [B, T] integer positions.

    Returns:
      [B, T, H, D] in x.dtype (rotation computed in float32).
    """
    d = x.shape[-1]
    freqs = theta ** (-jnp.arange(0, d, 2, dtype=jnp.float32) / d)  # [D/2]
    angles = positions.astype(jnp.float32)[..., None] * freqs  # [(B,) T, D/2]
    if angles.ndim == 2:
        angles = angles[None]
    cos, sin = jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]  # [B|1, T, 1, D/2]
    pairs = x.astype(jnp.float32).reshape(x.shape[:-1] + (d // 2, 2))
    x0, x1 = pairs[..., 0], pairs[..., 1]
    out = jnp.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)
