"""Attention layers: Attamba's (SSM keys and values, boundary + window) and the transformer's.

Attamba, per layer l with grid B_l (``pallas_kernels.chunk_grid``):

    q = xn @ Wq;  k = SSM_k(xn) + xn;  v = SSM_v(xn) + xn      (no Wk, Wv)
    q, k = RoPE(q), RoPE(k)                                     (v is not rotated)
    o = softmax(q kᵀ/√hd + mask_l) v;  out = o @ Wo
    mask_l: query t sees key s iff (s < t and s ∈ B_l) or t-W <= s <= t  (``pallas_kernels.visibility``).

The transformer baseline projects q, k, v to ``n_heads * head_dim`` (the paper's
``attn_dim``) and attends causally, optionally within a sliding window.

Both take the same arguments and run one body for the three uses of a layer:

    out, None  = attention(xn, positions, grid, document_start=starts)   training forward, [B, T]
    out, cache = attention(xn, positions, grid, cache, lengths=lengths)  prefill: the forward, cache filled
    out, cache = attention(xn, positions, grid, cache)                   decode: one token per row, [B, 1]

``grid`` is the layer's chunk grid (None for the transformer); ``positions`` [T] or [B, T];
``starts``: None (each row is one sequence) or the packed rows' ``document_start`` [B, T].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from attamba_jax import context_parallel, sharding
from attamba_jax.cache import AttambaLayerCache, KeySet, TransformerLayerCache
from attamba_jax.config import ModelConfig
from attamba_jax.layers import Dense, apply_rope, dense_of_one_input
from attamba_jax.ssm import StackedMamba2
from pallas_kernels.boundary_window_attention import IMPLEMENTATIONS, boundary_window_attention
from pallas_kernels.causal_attention import causal_attention
from pallas_kernels.chunk_grid import ChunkGrid
from pallas_kernels.visibility import Visibility


def _boundary_window_of_documents(q, k, v, document_start, **kw):
    """``boundary_window_attention`` with the packed layout as a positional array (``call_op`` shards it)."""
    return boundary_window_attention(q, k, v, document_start=document_start, **kw)


def _boundary_window(q, k, v, grid: ChunkGrid, window: int, implementation: str, document_start=None) -> jax.Array:
    """``boundary_window_attention`` under the active mesh: a named kernel runs per device on its
    batch rows and, where the kv heads divide over ``tensor``, its heads (query head h reads kv head
    h // (H/Hkv), so q's heads split only together with k's and v's)."""
    kv_heads = "kv" if sharding.splits("kv", k.shape[2]) else None
    q_axes = kv_axes = ("batch", None, kv_heads, None)
    args, axes, op = (q, k, v), (q_axes, kv_axes, kv_axes), boundary_window_attention
    if document_start is not None:
        args, axes, op = args + (document_start,), axes + (("batch", None),), _boundary_window_of_documents
    return sharding.call_op(op, IMPLEMENTATIONS, implementation, args, axes, q_axes, grid=grid, window=window)


def cached_attention(q: jax.Array, keys: KeySet) -> jax.Array:
    """Decode-time attention of one query per row over a layer's cached keys, read where they lie.

    Args:
      q: [B, 1, H, D]; keys: (k [B, Hkv, S, D], v [B, Hkv, S, D], visible [B, S]). Query head
        h reads kv head h // (H // Hkv); some key must be visible in each row.

    Returns:
      [B, 1, H, D] in q.dtype (softmax in float32, scale 1/sqrt(D)).
    """
    k, v, visible = keys
    b, _, h, d = q.shape
    hkv = k.shape[1]
    qg = q.reshape(b, hkv, h // hkv, d)  # [B, Hkv, R, D]
    scores = jnp.einsum("bkrd,bksd->bkrs", qg, k, preferred_element_type=jnp.float32) * (d**-0.5)
    probs = jax.nn.softmax(jnp.where(visible[:, None, None, :], scores, -jnp.inf), axis=-1)  # [B, Hkv, R, S]
    out = jnp.einsum("bkrs,bksd->bkrd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(b, 1, h, d).astype(q.dtype)


class AttambaAttention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d = cfg.dim
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.resolved_kv_heads, cfg.resolved_head_dim
        dtype = jnp.dtype(cfg.dtype)
        self.wq = Dense(d, cfg.attn_dim, std=d**-0.5, axes=("embed", "heads"), dtype=dtype, rngs=rngs)
        self.ssm = StackedMamba2(cfg, streams=2, rngs=rngs)  # stream 0 makes the keys, stream 1 the values
        self.wo = Dense(cfg.attn_dim, d, std=d**-0.5, axes=("heads", "embed"), dtype=dtype, rngs=rngs)
        self.window = cfg.window
        self.pseudo_chunk = cfg.pseudo_chunk
        self.rope_theta = cfg.rope_theta
        self.implementation = cfg.attention_implementation

    def __call__(
        self,
        xn,
        positions,
        grid: ChunkGrid,
        cache: AttambaLayerCache | None = None,
        *,
        lengths=None,
        document_start=None,
    ):
        """xn [B, T, dim] (already normalised) -> (out [B, T, dim], the layer cache or None).

        Prefill (``cache`` and ``lengths`` [B]: row i holds lengths[i] tokens) fills ``cache``,
        which supplies the capacities only. Decode (``cache`` alone, T = 1) runs both SSMs one
        step, stores the new k, v (as a boundary too when the token ends a chunk) and attends to
        the cached boundaries b < t-W plus the window t-W..t. ``document_start`` [B, T] (training
        forward only): the rows are packed documents, each computed as if alone
        (``pallas_kernels.documents``).
        """
        b, t, _ = xn.shape
        decode = cache is not None and lengths is None
        if document_start is not None and cache is not None:
            raise ValueError("document_start is for the training forward; a prompt is one document")
        if cache is None and context_parallel.context_shards() > 1:
            return self._context_parallel(xn, positions, grid, document_start), None
        if decode:
            q, zxbcdt, offset = self._decode_projections(xn)
            kv_ssm, ssm_state = self.ssm.step(zxbcdt[:, 0], grid, positions[:, 0], cache.ssm, offset=offset)
            q, (k, v) = self._q(q, positions), self._kv(xn, kv_ssm, positions)
            cache = cache.append(grid, positions[:, 0], k[:, 0], v[:, 0], ssm_state)
            o = cached_attention(q, cache.key_set(Visibility(grid, self.window), positions[:, 0]))
            return self.wo(o.reshape(b, t, -1)), cache
        if cache is None:
            kv_ssm, ssm_state = self.ssm(xn, grid, document_start), None
        else:
            kv_ssm, ssm_state = self.ssm.prefill(xn, grid, lengths)
        q, k, v = self._qkv(xn, kv_ssm, positions)
        if self.pseudo_chunk:
            o = causal_attention(q, k, v, document_start=document_start)
        else:
            o = _boundary_window(q, k, v, grid, self.window, self.implementation, document_start)
        cache = None if cache is None else cache.fill(grid, k, v, lengths, ssm_state)
        return self.wo(o.reshape(b, t, -1)), cache

    def _context_parallel(self, xn, positions, grid: ChunkGrid, document_start):
        """The training forward with the length split over the mesh's ``context`` axis, in context
        order (``context_parallel``): each piece and its halo as one row; the queries of the
        pieces alone. ``positions`` [T] or [B, T] and ``document_start`` are in context order too."""
        b, t, _ = xn.shape
        rows = context_parallel.ContextRows.plan(t, context_parallel.context_shards(), grid, self.window)
        starts = jnp.zeros((b, t), jnp.int32) if document_start is None else document_start
        positions = jnp.broadcast_to(positions, (b, t))
        xr = rows.to_rows(xn)
        kv_ssm = self.ssm(xr, grid, rows.row_starts(starts), rows="context_rows")  # [2c·B, halo + P, 2, dim]
        k, v = self._kv(xr, kv_ssm, rows.to_rows(positions))
        q = self._q(self.wq(xn), positions)
        if self.pseudo_chunk:  # every earlier key: the whole rows' keys in their order, as the transformer has them
            q, k, v = rows.natural(q), rows.natural(rows.shards_of(k)), rows.natural(rows.shards_of(v))
            ds = None if document_start is None else rows.natural(document_start)
            o = context_parallel.in_context_order(
                causal_attention(q, k, v, document_start=ds, partitioned=True), rows.order
            )
        else:
            o = context_parallel.boundary_window_attention(
                rows.split(q),
                k,
                v,
                rows,
                grid=grid,
                window=self.window,
                document_start=starts,
                implementation=self.implementation,
            )
            o = rows.join(o)
        return self.wo(o.reshape(b, t, -1))

    def _qkv(self, xn, kv_ssm, positions):
        """q [B,T,H,D], k, v [B,T,Hkv,D] from xn and the SSM outputs kv_ssm [B,T,2,dim]; q, k rotated at ``positions``."""
        return self._q(self.wq(xn), positions), *self._kv(xn, kv_ssm, positions)

    def _decode_projections(self, xn):
        """xn [B, 1, dim] -> (xn @ Wq, an array holding the SSMs' in-projection from column
        ``offset``, ``offset``): one matmul where the mesh splits neither's output columns (one
        token's step is bound by launches), whose output the SSM step reads in place; two where
        it does."""
        q_width = self.wq.kernel.shape[1]
        if sharding.splits("heads", q_width) or sharding.splits("ssm_inner", self.ssm.in_proj.kernel.shape[1]):
            return self.wq(xn), self.ssm.in_proj(xn), 0
        both = dense_of_one_input(xn, (self.wq, self.ssm.in_proj))
        return both[..., :q_width], both, q_width

    def _q(self, q, positions):
        """xn @ Wq [B, T, attn_dim] -> the rotated queries [B, T, H, D]."""
        b, t, _ = q.shape
        return apply_rope(q.reshape(b, t, self.n_heads, self.head_dim), positions, self.rope_theta)

    def _kv(self, xn, kv_ssm, positions):
        b, t, _ = xn.shape
        k = (kv_ssm[:, :, 0] + xn).reshape(b, t, self.n_kv_heads, self.head_dim)
        v = (kv_ssm[:, :, 1] + xn).reshape(b, t, self.n_kv_heads, self.head_dim)
        return apply_rope(k, positions, self.rope_theta), v


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

    def __call__(
        self,
        xn,
        positions,
        grid: None = None,
        cache: TransformerLayerCache | None = None,
        *,
        lengths=None,
        document_start=None,
    ):
        """Same interface as ``AttambaAttention``; ``grid`` is None (the transformer has no chunk grid)."""
        if grid is not None:
            raise ValueError("CausalSelfAttention has no chunk grid: pass grid=None")
        if document_start is not None and cache is not None:
            raise ValueError("document_start is for the training forward; a prompt is one document")
        b, t, _ = xn.shape
        q = apply_rope(self.wq(xn).reshape(b, t, self.n_heads, self.head_dim), positions, self.rope_theta)
        k = apply_rope(self.wk(xn).reshape(b, t, self.n_kv_heads, self.head_dim), positions, self.rope_theta)
        v = self.wv(xn).reshape(b, t, self.n_kv_heads, self.head_dim)
        if cache is not None and lengths is None:  # decode
            cache = cache.append(positions[:, 0], k[:, 0], v[:, 0])
            o = cached_attention(q, cache.key_set(positions[:, 0]))
        else:
            split = cache is None and context_parallel.context_shards() > 1
            if split:  # context parallelism, the plain form: every shard gathers all keys and values
                k, v = (sharding.constrain(a, ("batch", None, "kv", None)) for a in (k, v))
            o = causal_attention(
                q,
                k,
                v,
                window=self.window,
                document_start=document_start,
                implementation=self.implementation,
                partitioned=split,
            )
            cache = None if cache is None else cache.fill(k, v, lengths)
        return self.wo(o.reshape(b, t, -1)), cache
