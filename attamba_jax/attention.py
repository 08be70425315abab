"""Attention layers: Attamba's (SSM keys and values, boundary + window) and the transformer's.

Attamba, per layer l with grid B_l (see ``chunking``):

    q = xn @ Wq;  k = SSM_k(xn) + xn;  v = SSM_v(xn) + xn      (no Wk, Wv)
    q, k = RoPE(q), RoPE(k)                                     (v is not rotated)
    o = softmax(q kᵀ/√hd + mask_l) v;  out = o @ Wo
    mask_l: query t sees key s iff (s < t and s ∈ B_l) or t-W <= s <= t.

The transformer baseline projects q, k, v to ``n_heads * head_dim`` (the paper's
``attn_dim``) and attends causally, optionally within a sliding window.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from attamba_jax.chunking import ChunkGrid
from attamba_jax.config import ModelConfig
from attamba_jax.layers import Dense, apply_rope
from attamba_jax.ssm import Mamba2
from pallas_kernels.chunked_attention import chunked_attention


def causal_attention(q, k, v, *, window: int | None = None, implementation: str = "auto") -> jax.Array:
    """Causal (optionally sliding-window) attention through ``jax.nn.dot_product_attention``.

    ``auto`` picks cuDNN flash attention on a GPU when it applies (16-bit inputs,
    head_dim a multiple of 8 up to 256) and XLA otherwise.

    Args:
      q: [B, T, H, D]; k, v: [B, T, Hkv, D]; window: each query sees keys t-W .. t.
    """
    if implementation == "auto":
        d = q.shape[-1]
        usable = jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16) and d % 8 == 0 and d <= 256
        implementation = "cudnn" if usable else "xla"
    if implementation not in ("xla", "cudnn"):
        raise ValueError(f"causal_attention: implementation must be auto, xla or cudnn, got {implementation!r}")
    local = None if window is None else (window, 0)
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, local_window_size=local, implementation=implementation)


def _positions(positions: jax.Array | None, length: int) -> jax.Array:
    return jnp.arange(length) if positions is None else positions


class AttambaAttention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d = cfg.dim
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.resolved_kv_heads, cfg.resolved_head_dim
        dtype = jnp.dtype(cfg.dtype)
        self.wq = Dense(d, cfg.attn_dim, std=d**-0.5, axes=("embed", "heads"), dtype=dtype, rngs=rngs)
        self.ssm_k = Mamba2(cfg, rngs=rngs)
        self.ssm_v = Mamba2(cfg, rngs=rngs)
        self.wo = Dense(cfg.attn_dim, d, std=d**-0.5, axes=("heads", "embed"), dtype=dtype, rngs=rngs)
        self.window = cfg.leading_tokens
        self.pseudo_chunk = cfg.pseudo_chunk
        self.rope_theta = cfg.rope_theta
        self.implementation = cfg.attention_implementation

    def __call__(self, xn: jax.Array, grid: ChunkGrid, positions: jax.Array | None = None) -> jax.Array:
        """xn: [B, T, dim] (already normalised) -> [B, T, dim]."""
        b, t, _ = xn.shape
        pos = _positions(positions, t)
        q = self.wq(xn).reshape(b, t, self.n_heads, self.head_dim)
        k = (self.ssm_k(xn, grid) + xn).reshape(b, t, self.n_kv_heads, self.head_dim)
        v = (self.ssm_v(xn, grid) + xn).reshape(b, t, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, pos, self.rope_theta), apply_rope(k, pos, self.rope_theta)
        if self.pseudo_chunk:
            o = causal_attention(q, k, v)
        else:
            o = chunked_attention(q, k, v, grid=grid, window=self.window, implementation=self.implementation)
        return self.wo(o.reshape(b, t, -1))


class CausalSelfAttention(nnx.Module):
    """The transformer baseline: q, k, v, o projections of width ``n_heads * head_dim``."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d = cfg.dim
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.resolved_kv_heads, cfg.resolved_head_dim
        dtype = jnp.dtype(cfg.dtype)
        kv_width = self.n_kv_heads * self.head_dim
        self.wq = Dense(d, cfg.attn_dim, std=d**-0.5, axes=("embed", "heads"), dtype=dtype, rngs=rngs)
        self.wk = Dense(d, kv_width, std=d**-0.5, axes=("embed", "kv"), dtype=dtype, rngs=rngs)
        self.wv = Dense(d, kv_width, std=d**-0.5, axes=("embed", "kv"), dtype=dtype, rngs=rngs)
        self.wo = Dense(cfg.attn_dim, d, std=d**-0.5, axes=("heads", "embed"), dtype=dtype, rngs=rngs)
        self.window = cfg.sliding_window
        self.rope_theta = cfg.rope_theta
        self.implementation = cfg.attention_implementation

    def __call__(self, xn: jax.Array, positions: jax.Array | None = None) -> jax.Array:
        b, t, _ = xn.shape
        pos = _positions(positions, t)
        q = self.wq(xn).reshape(b, t, self.n_heads, self.head_dim)
        k = self.wk(xn).reshape(b, t, self.n_kv_heads, self.head_dim)
        v = self.wv(xn).reshape(b, t, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, pos, self.rope_theta), apply_rope(k, pos, self.rope_theta)
        o = causal_attention(q, k, v, window=self.window, implementation=self.implementation)
        return self.wo(o.reshape(b, t, -1))
