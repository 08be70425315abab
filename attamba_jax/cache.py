"""Decode caches: Attamba's compressed KV cache and the transformer's, behind one interface.

Per Attamba layer l (SPEC §5, chunk resets of §3.2 on the fixed grid B_l):

    kv   post-RoPE k, v in one store of ⌈L/K⌉+1 + W+1 slots                    [B, Hkv, S, D]
         slots 0..⌈L/K⌉: every boundary so far, in arrival order (the j-th in slot j)
         then a ring of the last W+1 tokens (token t in ring slot t % (W+1))
    ssm  scan state [B, 2·Hs, P, N] (float32) and conv history of the current chunk
         [B, conv_width, 2·(I+2GN)], the K and V SSMs stacked: a ring, so that a decode step
         writes only its token's slot (SPEC's conv_width-1 rows, plus that slot)

Decoding token t writes its k, v to its ring slot and, when it ends a chunk, to its boundary
slot (one scatter per array), then attends to the store as one key set: the boundaries
b < t-W and the window t-W..t, which is exactly row t of ``Visibility(grid, W).dense``
(a boundary inside the window is seen through its ring slot only). Because the grid never
depends on the sequence length, a boundary's key is final the moment its token arrives.

A transformer layer keeps one ring: every token (capacity ``max_len``) or, with a sliding
window of S, the last S+1 tokens. The ``pseudo_chunk`` ablation attends causally, so it
keeps every token in its ring and no boundary slots.

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


def _ring_slot(size: int, positions: jax.Array) -> jax.Array:
    """The slot of a ring of ``size`` slots that token ``positions`` takes: t % size."""
    return positions % size


def _ring_positions(size: int, last: jax.Array) -> jax.Array:
    """[B, size]: the position each slot of a ring (``_ring_slot``) holds once token ``last`` [B]
    is written (< 0: empty)."""
    slots = jnp.arange(size)[None, :]
    return last[:, None] - _ring_slot(size, last[:, None] - slots)


class KVSlots(struct.PyTreeNode):
    """Post-RoPE k, v of a layer in ``size`` slots per row; which token a slot holds is the
    owning layer cache's rule."""

    k: jax.Array  # [B, Hkv, S, D]
    v: jax.Array  # [B, Hkv, S, D]

    @classmethod
    def zeros(cls, batch: int, size: int, heads: int, head_dim: int, dtype) -> KVSlots:
        shape = (batch, heads, size, head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))

    @property
    def size(self) -> int:
        return self.k.shape[2]

    def fill(self, k: jax.Array, v: jax.Array, positions: jax.Array, valid: jax.Array) -> KVSlots:
        """Slot s of row b <- token positions[b, s] of whole sequences k, v [B, T, Hkv, D]; zero where not valid."""
        return self.replace(k=_gather_kv(k, positions, valid), v=_gather_kv(v, positions, valid))

    def write(self, slots: jax.Array, k: jax.Array, v: jax.Array) -> KVSlots:
        """Store one token per row, k, v [B, Hkv, D], in each of its slots [B, n] (one scatter per
        array; a slot >= ``size`` is dropped)."""
        rows = jnp.arange(k.shape[0])[:, None]
        return self.replace(
            k=self.k.at[rows, :, slots].set(k[:, None], mode="drop"),
            v=self.v.at[rows, :, slots].set(v[:, None], mode="drop"),
        )


class AttambaLayerCache(struct.PyTreeNode):
    """One Attamba layer's keys and values in one store of ``boundary_slots`` + W+1 slots: the j-th
    boundary of the grid in slot j, then a ring of the last W+1 tokens (token t in slot
    ``boundary_slots`` + t % (W+1)); a decode step writes both of a token's slots at once and
    attends to the store as one key set."""

    kv: KVSlots
    ssm: SSMState
    boundary_slots: int = struct.field(pytree_node=False, default=0)

    @property
    def ring(self) -> int:
        return self.kv.size - self.boundary_slots

    def _slot_positions(self, grid: ChunkGrid, last: jax.Array) -> jax.Array:
        """[B, S]: the position held by each slot once token ``last`` [B] is written (boundary
        slots: their boundary's position, held once last reaches it)."""
        boundaries = jnp.broadcast_to(
            grid.position(jnp.arange(self.boundary_slots)), (last.shape[0], self.boundary_slots)
        )
        return jnp.concatenate([boundaries, _ring_positions(self.ring, last)], axis=1)

    def fill(self, grid: ChunkGrid, k, v, lengths, ssm: SSMState) -> AttambaLayerCache:
        """After a prefill: k, v [B, T, Hkv, D] post-RoPE, SSM states after each row's last token."""
        pos = self._slot_positions(grid, lengths - 1)
        valid = (pos >= 0) & (pos < lengths[:, None])
        return self.replace(kv=self.kv.fill(k, v, pos, valid), ssm=ssm)

    def append(self, grid: ChunkGrid, positions, k, v, ssm: SSMState) -> AttambaLayerCache:
        """After one decode step: k, v [B, Hkv, D] of the tokens at ``positions`` [B]."""
        slots = (self.boundary_slots + _ring_slot(self.ring, positions))[:, None]
        if self.boundary_slots:  # (none for the pseudo_chunk ablation, whose ring holds every token)
            # A token that ends no chunk has no boundary slot: it writes out of bounds, which is dropped.
            boundary = jnp.where(grid.is_boundary(positions), grid.count_before(positions), self.kv.size)
            slots = jnp.concatenate([boundary[:, None], slots], axis=1)
        return self.replace(kv=self.kv.write(slots, k, v), ssm=ssm)

    def key_set(self, visibility: Visibility, positions) -> KeySet:
        """Query t's keys (token t already written): the boundaries before its window — the first
        ``boundaries_seen`` boundary slots — and the window's held tokens; the two are disjoint."""
        seen = visibility.boundaries_seen(positions)  # [B]
        boundary = jnp.arange(self.boundary_slots)[None, :] < seen[:, None]
        window = _ring_positions(self.ring, positions) >= 0
        return self.kv.k, self.kv.v, jnp.concatenate([boundary, window], axis=1)


class TransformerLayerCache(struct.PyTreeNode):
    """A ring of each row's last ``size`` tokens (every token, without a sliding window): token t in slot t % size."""

    kv: KVSlots

    def fill(self, k, v, lengths) -> TransformerLayerCache:
        pos = _ring_positions(self.kv.size, lengths - 1)
        return self.replace(kv=self.kv.fill(k, v, pos, pos >= 0))

    def append(self, positions, k, v) -> TransformerLayerCache:
        return self.replace(kv=self.kv.write(_ring_slot(self.kv.size, positions)[:, None], k, v))

    def key_set(self, positions) -> KeySet:
        return self.kv.k, self.kv.v, _ring_positions(self.kv.size, positions) >= 0


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
        layer = lambda: TransformerLayerCache(kv=KVSlots.zeros(batch, ring, heads, hd, dtype))
    else:
        k = cfg.token_chunk if token_chunk is None else token_chunk
        inner, gn = cfg.ssm_inner_dim, cfg.ssm_groups * cfg.ssm_state_dim
        ssm = lambda: SSMState(  # the K and V SSMs, stacked
            scan=jnp.zeros((batch, 2 * cfg.ssm_heads, inner // cfg.ssm_heads, cfg.ssm_state_dim), jnp.float32),
            conv=jnp.zeros((batch, cfg.ssm_conv_width, 2 * (inner + 2 * gn)), dtype),
        )
        layer = lambda: AttambaLayerCache(
            kv=KVSlots.zeros(batch, n_boundaries + ring, heads, hd, dtype), ssm=ssm(), boundary_slots=n_boundaries
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
    dtype, plus (I+2GN) for the slot the history ring adds (``SSMState``). Transformer:
    2·Hkv·hd values per cached token (max_len, or window+1).
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
            + cfg.ssm_conv_width * (inner + 2 * gn) * item  # SPEC's conv_width-1 rows and the ring's slot
        )
        per_layer = kv + 2 * ssm
    return batch * cfg.n_layers * per_layer
