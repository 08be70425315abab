"""Softmax attention under an explicit [T, S] mask: the ground truth both attention ops are held to."""

from __future__ import annotations

import jax
import jax.numpy as jnp

_HI = jax.lax.Precision.HIGHEST


def masked_attention(q, k, v, mask):
    """Masked attention, scale 1/sqrt(D), softmax in float32.

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
    scores = jnp.where(mask, scores * (d**-0.5), -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bkrts,bskd->btkrd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32, precision=_HI)
    return out.reshape(b, t, h, d).astype(q.dtype)
