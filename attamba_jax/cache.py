"""Decode caches: Attamba's compressed KV cache and the transformer's, behind one interface.

Per Attamba layer l (SPEC §5, chunk resets of §3.2 on the fixed grid B_l):

    boundaries  post-RoPE k, v of every boundary so far, in arrival order   [B, Hkv, ⌈L/K⌉+1, D]
    window      ring of the last W+1 tokens' k, v (token t in slot t % (W+1)) [B, Hkv, W+1, D]
    ssm         scan state [B, 2·Hs, P, N] (float32) and conv history
                [B, conv_width-1, 2·(I+2GN)] of the current chunk, the K and V SSMs stacked

Decoding token t attends to the boundaries b < t-W and to the window t-W..t, which is
exactly row t of ``Visibility(grid, W).dense``. Because the grid never depends on the
sequence length, a boundary's key is final the moment its token arrives.

A transformer layer keeps one ring: every token (capacity ``max_len``) or, with a sliding
window of S, the last S+1 tokens. The ``pseudo_chunk`` ablation attends causally, so it
keeps every token in its ring and no boundary store.

Every cache is a pytree of fixed shapes (usable under jit and in a ``while_loop``), and
rows may sit at different positions: ``Cache.positions`` [B] is the position the next
token of each row takes. Writing beyond ``max_len`` is not supported. K/V are laid out
heads-major, [B, Hkv, S, D], so that a decode step reads each head's keys contiguously.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from attamba_jax.config import ModelConfig
from attamba_jax.ssm import SSMState
from pallas_kernels.chunk_grid import ChunkGrid
from pallas_kernels.visibility import Visibility

# A set of cached keys, their values and which of them a query may see:
# (k [B, Hkv, S, D], v [B, Hkv, S, D], visible [B, S] bool).
KeySet = tuple[jax.Array, jax.Array, jax.Array]


def _gather_rows(x: jax.Array, idx: jax.Array, valid: jax.Array) -> jax.Array:
    """x [B, T, ...], idx/valid [B, S] -> [B, S, ...] with x[b, idx[b, s]] where valid, else 0."""
    rows = jnp.arange(x.shape[0])[:, None]
    out = x[rows, jnp.clip(idx, 0, x.shape[1] - 1)]
    return jnp.where(valid.reshape(valid.shape + (1,) * (x.ndim - 2)), out, 0).astype(x.dtype)


def _gather_kv(x: jax.Array, idx: jax.Array, valid: jax.Array) -> jax.Array:
    """k or v [B, T, Hkv, D] -> the cache layout [B, Hkv, S, D] at positions idx [B, S]."""
    return jnp.swapaxes(_gather_rows(x, idx, valid), 1, 2)


class KVRing(struct.PyTreeNode):
    """Post-RoPE k, v of each row's last ``size`` tokens; token t lives in slot t % size."""

    k: jax.Array  # [B, Hkv, S, D]
    v: jax.Array  # [B, Hkv, S, D]

    @classmethod
    def zeros(cls, batch: int, size: int, heads: int, head_dim: int, dtype) -> KVRing:
        shape = (batch, heads, size, head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))

    @property
    def size(self) -> int:
        return self.k.shape[2]

    def _slot_positions(self, last: jax.Array) -> jax.Array:
        """[B, S]: the position held by each slot once token ``last`` [B] is written (< 0: empty)."""
        slots = jnp.arange(self.size)[None, :]
        return last[:, None] - (last[:, None] - slots) % self.size

    def fill(self, k: jax.Array, v: jax.Array, lengths: jax.Array) -> KVRing:
        """From whole sequences k, v [B, T, Hkv, D] of which row i holds ``lengths[i]`` tokens."""
        pos = self._slot_positions(lengths - 1)
        valid = pos >= 0
        return self.replace(k=_gather_kv(k, pos, valid), v=_gather_kv(v, pos, valid))

    def write(self, positions: jax.Array, k: jax.Array, v: jax.Array) -> KVRing:
        """Store one token per row: k, v [B, Hkv, D] at ``positions`` [B]."""
        rows, slot = jnp.arange(k.shape[0]), positions % self.size
        return self.replace(k=self.k.at[rows, :, slot].set(k), v=self.v.at[rows, :, slot].set(v))

    def key_set(self, positions: jax.Array) -> KeySet:
        """The held tokens, as keys for the query at ``positions`` (already written)."""
        return self.k, self.v, self._slot_positions(positions) >= 0


class BoundaryKV(struct.PyTreeNode):
    """Post-RoPE k, v of every boundary so far: the j-th boundary of the grid in slot j."""

    k: jax.Array  # [B, Hkv, NB, D]
    v: jax.Array  # [B, Hkv, NB, D]

    @classmethod
    def zeros(cls, batch: int, capacity: int, heads: int, head_dim: int, dtype) -> BoundaryKV:
        shape = (batch, heads, capacity, head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def fill(self, grid: ChunkGrid, k: jax.Array, v: jax.Array, lengths: jax.Array) -> BoundaryKV:
        """From whole sequences k, v [B, T, Hkv, D] of which row i holds ``lengths[i]`` tokens."""
        pos = jnp.broadcast_to(
            grid.position(jnp.arange(self.capacity)), (k.shape[0], self.capacity)
        )  # slot j: boundary j
        valid = pos < lengths[:, None]
        return self.replace(k=_gather_kv(k, pos, valid), v=_gather_kv(v, pos, valid))

    def write(self, grid: ChunkGrid, positions: jax.Array, k: jax.Array, v: jax.Array) -> BoundaryKV:
        """Store k, v [B, Hkv, D] of the rows whose token at ``positions`` ends a chunk."""
        slot = jnp.where(grid.is_boundary(positions), grid.count_before(positions), self.capacity)
        rows = jnp.arange(k.shape[0])
        # Rows whose token is no boundary write out of bounds, which is dropped.
        return self.replace(
            k=self.k.at[rows, :, slot].set(k, mode="drop"), v=self.v.at[rows, :, slot].set(v, mode="drop")
        )

    def key_set(self, visibility: Visibility, positions: jax.Array) -> KeySet:
        """The boundary part of the query at ``positions``: the first ``boundaries_seen`` slots."""
        seen = visibility.boundaries_seen(positions)  # [B]
        return self.k, self.v, jnp.arange(self.capacity)[None, :] < seen[:, None]


class AttambaLayerCache(struct.PyTreeNode):
    boundaries: BoundaryKV
    window: KVRing
    ssm: SSMState

    def fill(self, grid: ChunkGrid, k, v, lengths, ssm: SSMState) -> AttambaLayerCache:
        """After a prefill: k, v [B, T, Hkv, D] post-RoPE, SSM states after each row's last token."""
        return AttambaLayerCache(
            boundaries=self.boundaries.fill(grid, k, v, lengths), window=self.window.fill(k, v, lengths), ssm=ssm
        )

    def append(self, grid: ChunkGrid, positions, k, v, ssm: SSMState) -> AttambaLayerCache:
        """After one decode step: k, v [B, Hkv, D] of the tokens at ``positions`` [B]."""
        return AttambaLayerCache(
            boundaries=self.boundaries.write(grid, positions, k, v), window=self.window.write(positions, k, v), ssm=ssm
        )

    def key_sets(self, visibility: Visibility, positions) -> list[KeySet]:
        """The disjoint key sets of query t: boundaries before its window, then the window."""
        return [self.boundaries.key_set(visibility, positions), self.window.key_set(positions)]


class TransformerLayerCache(struct.PyTreeNode):
    window: KVRing

    def fill(self, k, v, lengths) -> TransformerLayerCache:
        return TransformerLayerCache(window=self.window.fill(k, v, lengths))

    def append(self, positions, k, v) -> TransformerLayerCache:
        return TransformerLayerCache(window=self.window.write(positions, k, v))

    def key_sets(self, positions) -> list[KeySet]:
        return [self.window.key_set(positions)]


class Cache(struct.PyTreeNode):
    """All layers' caches plus each row's next position.

    ``token_chunk`` (the K the cache was laid out for, possibly a test-time K') and
    ``max_len`` are static, so a decode step can never read a cache with another grid.
    """

    layers: tuple  # one AttambaLayerCache or TransformerLayerCache per layer
    positions: jax.Array  # [B] int32: tokens seen so far = position of the next token
    token_chunk: int | None = struct.field(pytree_node=False, default=None)
    max_len: int = struct.field(pytree_node=False, default=0)


# --- construction and size ------------------------------------------------------------------


def _sizes(cfg: ModelConfig, max_len: int, token_chunk: int | None):
    """(boundary capacity, window ring size) per layer."""
    if cfg.arch == "transformer":
        return 0, max_len if cfg.sliding_window is None else min(max_len, cfg.sliding_window + 1)
    if cfg.pseudo_chunk:
        return 0, max_len
    k = cfg.token_chunk if token_chunk is None else token_chunk
    return ChunkGrid(k).capacity(max_len), cfg.window + 1


def init_cache(cfg: ModelConfig, batch: int, max_len: int, *, token_chunk: int | None = None) -> Cache:
    """An empty cache for ``batch`` rows of at most ``max_len`` tokens (prompt + generated).

    ``token_chunk`` runs an Attamba model at a chunk size K' other than the trained K.
    """
    cfg.validate()
    if max_len < 1:
        raise ValueError(f"init_cache: max_len must be >= 1, got {max_len}")
    if token_chunk is not None and (cfg.arch != "attamba" or token_chunk < 1):
        raise ValueError(f"init_cache: token_chunk={token_chunk} needs arch=attamba and a value >= 1")
    dtype = jnp.dtype(cfg.dtype)
    heads, hd = cfg.resolved_kv_heads, cfg.resolved_head_dim
    n_boundaries, ring = _sizes(cfg, max_len, token_chunk)
    if cfg.arch == "transformer":
        k = None
        layer = lambda: TransformerLayerCache(window=KVRing.zeros(batch, ring, heads, hd, dtype))
    else:
        k = cfg.token_chunk if token_chunk is None else token_chunk
        inner, gn = cfg.ssm_inner_dim, cfg.ssm_groups * cfg.ssm_state_dim
        ssm = lambda: SSMState(  # the K and V SSMs, stacked
            scan=jnp.zeros((batch, 2 * cfg.ssm_heads, inner // cfg.ssm_heads, cfg.ssm_state_dim), jnp.float32),
            conv=jnp.zeros((batch, cfg.ssm_conv_width - 1, 2 * (inner + 2 * gn)), dtype),
        )
        layer = lambda: AttambaLayerCache(
            boundaries=BoundaryKV.zeros(batch, n_boundaries, heads, hd, dtype),
            window=KVRing.zeros(batch, ring, heads, hd, dtype),
            ssm=ssm(),
        )
    layers = tuple(layer() for _ in range(cfg.n_layers))
    return Cache(layers=layers, positions=jnp.zeros((batch,), jnp.int32), token_chunk=k, max_len=max_len)


def cache_bytes(cache: Cache) -> int:
    """Bytes held by the layers' K/V and SSM states (the [B] position counter not included)."""
    return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(cache.layers))


def formula_bytes(cfg: ModelConfig, batch: int, max_len: int, *, token_chunk: int | None = None) -> int:
    """The SPEC §5 size of a cache for ``max_len`` tokens, from the config alone.

    Attamba, per layer and row: (n_b + W + 1)·2d values of K/V (n_b = the boundary
    capacity ⌈max_len/K⌉+1) in the compute dtype, plus for each of the two SSMs
    Hs·P·N float32 scan values and (conv_width-1)·(I+2GN) conv values in the compute
    dtype. Transformer: 2·Hkv·hd values per cached token (max_len, or window+1).
    """
    item = jnp.dtype(cfg.dtype).itemsize
    n_boundaries, ring = _sizes(cfg, max_len, token_chunk)
    if cfg.arch == "transformer":
        per_layer = ring * 2 * cfg.resolved_kv_heads * cfg.resolved_head_dim * item
    else:
        inner, gn = cfg.ssm_inner_dim, cfg.ssm_groups * cfg.ssm_state_dim
        kv = (n_boundaries + ring) * 2 * cfg.dim * item
        ssm = (
            cfg.ssm_heads * (inner // cfg.ssm_heads) * cfg.ssm_state_dim * 4
            + (cfg.ssm_conv_width - 1) * (inner + 2 * gn) * item
        )
        per_layer = kv + 2 * ssm
    return batch * cfg.n_layers * per_layer
