"""The ground truth: full [T, T] masked softmax attention with the Attamba mask."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attamba_jax.chunking import ChunkGrid, attention_mask

_HI = jax.lax.Precision.HIGHEST


def dense_attention(q, k, v, mask):
    """Masked attention, softmax in float32.

    Args:
      q: [B, T, H, D]; k, v: [B, S, Hkv, D] with H % Hkv == 0 (query head h reads
        kv head h // (H // Hkv)).
      mask: [T, S] bool (or broadcastable to [B, 1, 1, T, S]); every row needs a True.

    Returns:
      [B, T, H, D] in q.dtype.
    """
    b, t, h, d = q.shape
    hkv = k.shape[2]
    qg = q.reshape(b, t, hkv, h // hkv, d)
    scores = jnp.einsum("btkrd,bskd->bkrts", qg, k, preferred_element_type=jnp.float32, precision=_HI)
    scores = scores * (d**-0.5)
    scores = jnp.where(mask, scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bkrts,bskd->btkrd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32, precision=_HI)
    return out.reshape(b, t, h, d).astype(q.dtype)


def chunked_attention_dense(q, k, v, grid: ChunkGrid, window: int):
    """Attamba attention through the dense [T, T] mask (``chunking.attention_mask``)."""
    return dense_attention(q, k, v, jnp.asarray(attention_mask(q.shape[1], grid, window)))
