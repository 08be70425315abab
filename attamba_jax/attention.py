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

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attamba_jax.cache import AttambaLayerCache, KeySet, TransformerLayerCache
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


def cached_attention(q: jax.Array, key_sets: Sequence[KeySet]) -> jax.Array:
    """Decode-time attention of one query per row over disjoint sets of cached keys.

    One softmax (float32, scale 1/sqrt(D)) runs over the union of the sets; each set is
    read where it lies, so no cache is ever copied into one buffer.

    Args:
      q: [B, 1, H, D]; key_sets: (k [B, Hkv, S, D], v [B, Hkv, S, D], visible [B, S]) each.
        Query head h reads kv head h // (H // Hkv); some key must be visible in each row.

    Returns:
      [B, 1, H, D] in q.dtype.
    """
    b, _, h, d = q.shape
    hkv = key_sets[0][0].shape[1]
    qg = q.reshape(b, hkv, h // hkv, d)  # [B, Hkv, R, D]
    scores = [
        jnp.where(visible[:, None, None, :], jnp.einsum("bkrd,bksd->bkrs", qg, k, preferred_element_type=jnp.float32), -jnp.inf)
        for k, _, visible in key_sets
    ]  # [B, Hkv, R, S_i] each
    probs = jax.nn.softmax(jnp.concatenate(scores, axis=-1) * (d**-0.5), axis=-1)
    splits = np.cumsum([s.shape[-1] for s in scores])[:-1]
    out = sum(
        jnp.einsum("bkrs,bksd->bkrd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        for p, (_, v, _) in zip(jnp.split(probs, splits, axis=-1), key_sets)
    )
    return out.reshape(b, 1, h, d).astype(q.dtype)


def _positions(positions: jax.Array | None, length: int) -> jax.Array:
    return jnp.arange(length) if positions is None else positions


class AttambaAttention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d = cfg.dim
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.resolved_kv_heads, cfg.resolved_head_dim
        dtype = jnp.dtype(cfg.dtype)
        self.wq = Dense(d, cfg.attn_dim, std=d**-0.5, axes=("embed", "heads"), dtype=dtype, rngs=rngs)
        self.ssm = Mamba2(cfg, streams=2, rngs=rngs)  # stream 0 makes the keys, stream 1 the values
        self.wo = Dense(cfg.attn_dim, d, std=d**-0.5, axes=("heads", "embed"), dtype=dtype, rngs=rngs)
        self.window = cfg.window
        self.pseudo_chunk = cfg.pseudo_chunk
        self.rope_theta = cfg.rope_theta
        self.implementation = cfg.attention_implementation

    def __call__(self, xn: jax.Array, grid: ChunkGrid, positions: jax.Array | None = None) -> jax.Array:
        """xn: [B, T, dim] (already normalised) -> [B, T, dim]."""
        pos = _positions(positions, xn.shape[1])
        return self._forward(xn, grid, pos, self.ssm(xn, grid))[0]

    def _forward(self, xn, grid: ChunkGrid, pos, kv_ssm):
        """The parallel attention given the SSM outputs: (out [B,T,dim], post-RoPE k, v)."""
        b, t, _ = xn.shape
        q, k, v = self._qkv(xn, kv_ssm, pos)
        if self.pseudo_chunk:
            o = causal_attention(q, k, v)
        else:
            o = chunked_attention(q, k, v, grid=grid, window=self.window, implementation=self.implementation)
        return self.wo(o.reshape(b, t, -1)), k, v

    def _qkv(self, xn, kv_ssm, pos):
        """q [B,T,H,D], k, v [B,T,Hkv,D] from xn and the SSM outputs kv_ssm [B,T,2,dim]; q, k rotated at ``pos``."""
        b, t, _ = xn.shape
        q = self.wq(xn).reshape(b, t, self.n_heads, self.head_dim)
        k = (kv_ssm[:, :, 0] + xn).reshape(b, t, self.n_kv_heads, self.head_dim)
        v = (kv_ssm[:, :, 1] + xn).reshape(b, t, self.n_kv_heads, self.head_dim)
        return apply_rope(q, pos, self.rope_theta), apply_rope(k, pos, self.rope_theta), v

    # --- inference (attamba_jax.cache) -------------------------------------------------------

    def prefill(self, xn: jax.Array, grid: ChunkGrid, lengths: jax.Array, cache: AttambaLayerCache):
        """The parallel forward over prompts of ``lengths`` [B] tokens, and the filled layer cache.

        Returns (out [B, T, dim], cache); ``cache`` supplies the capacities only.
        """
        kv_ssm, state = self.ssm.prefill(xn, grid, lengths)
        out, k, v = self._forward(xn, grid, jnp.arange(xn.shape[1]), kv_ssm)
        return out, cache.fill(grid, k, v, lengths, state)

    def decode(self, xn: jax.Array, grid: ChunkGrid, positions: jax.Array, cache: AttambaLayerCache):
        """One token per row: xn [B, 1, dim] at ``positions`` [B] -> (out [B, 1, dim], cache).

        Runs both SSMs one step, stores the new k, v (as a boundary too when the token
        ends a chunk) and attends to the boundaries b < t-W plus the window t-W..t.
        """
        b = xn.shape[0]
        kv_ssm, state = self.ssm.step(xn, grid, positions, cache.ssm)
        q, k, v = self._qkv(xn, kv_ssm, positions[:, None])
        cache = cache.append(grid, positions, k[:, 0], v[:, 0], state)
        o = cached_attention(q, cache.key_sets(grid, positions, self.window))
        return self.wo(o.reshape(b, 1, -1)), cache


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
        return self._forward(xn, _positions(positions, xn.shape[1]))[0]

    def _forward(self, xn, pos):
        """The parallel attention: (out [B,T,dim], post-RoPE k, v)."""
        b, t, _ = xn.shape
        q, k, v = self._qkv(xn, pos)
        o = causal_attention(q, k, v, window=self.window, implementation=self.implementation)
        return self.wo(o.reshape(b, t, -1)), k, v

    def _qkv(self, xn, pos):
        b, t, _ = xn.shape
        q = self.wq(xn).reshape(b, t, self.n_heads, self.head_dim)
        k = self.wk(xn).reshape(b, t, self.n_kv_heads, self.head_dim)
        v = self.wv(xn).reshape(b, t, self.n_kv_heads, self.head_dim)
        return apply_rope(q, pos, self.rope_theta), apply_rope(k, pos, self.rope_theta), v

    # --- inference (attamba_jax.cache) -------------------------------------------------------

    def prefill(self, xn: jax.Array, lengths: jax.Array, cache: TransformerLayerCache):
        """The parallel forward, and the layer cache filled with each row's first ``lengths`` tokens."""
        out, k, v = self._forward(xn, jnp.arange(xn.shape[1]))
        return out, cache.fill(k, v, lengths)

    def decode(self, xn: jax.Array, positions: jax.Array, cache: TransformerLayerCache):
        """One token per row: xn [B, 1, dim] at ``positions`` [B] -> (out [B, 1, dim], cache)."""
        b = xn.shape[0]
        q, k, v = self._qkv(xn, positions[:, None])
        cache = cache.append(positions, k[:, 0], v[:, 0])
        o = cached_attention(q, cache.key_sets(positions))
        return self.wo(o.reshape(b, 1, -1)), cache
