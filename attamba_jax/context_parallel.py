"""Context parallelism: Attamba's layers with the length split over the mesh's ``context`` axis.

Each of the c devices of the ``context`` axis holds a contiguous slice of every row, ``T/c``
positions (a multiple of K: the model pads the length up to a multiple of c·K at its end, where
causality keeps the padding from every real token). Attamba needs little from the other shards,
because its SSMs restart every K tokens and a query sees only boundary keys and its window:

  halo        each shard also takes the last ``halo`` positions of the shard before it (the layer
              input, ``dim`` wide): enough for the SSM state at its first token (its chunk started
              at most K-1 positions earlier) and for the keys of its first queries' windows;
  boundaries  the ⌈T/K⌉ boundary keys and values of the whole row, gathered from every shard;
  documents   the key and value of each document's first token, one per shard.

That is about K times less than gathering every key and value. Each shard and its halo become one
row of a [c·B, halo + T/c] array (``ContextRows``, shard-major), whose rows are split over
(context, data, fsdp), so that every device already holds its rows:
the halo is then a slice of the row before it, and every op that runs on independent rows runs
unchanged. XLA turns the halo into a collective permute and the boundaries into one all-gather.

A shard row reads the SSM on the layer's grid from its first position, which is a multiple of K
positions before the row's shard: its chunks are the row's from there on, except that the grid's
first chunks (token 0 alone, then ``[1, f]``) also start the row; those fall in the halo, whose
outputs are dropped. The packed-documents layout (``pallas_kernels.documents``) carries the rest:
the row's real tokens form documents of their own, and on the first shard the halo is a document
apart (it holds the last shard's tokens).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from attamba_jax import sharding
from pallas_kernels.boundary_window_attention.xla import attention_of_rows, window_block_size
from pallas_kernels.chunk_grid import ChunkGrid


def context_shards() -> int:
    """The size of the active mesh's ``context`` axis (1 outside a mesh)."""
    active = sharding.active_mesh()
    return 1 if active is None else int(active[0].shape.get("context", 1))


def padded_length(length: int, shards: int, token_chunk: int) -> int:
    """The length a model pads a row to for ``shards`` context shards: a multiple of c·K."""
    unit = shards * token_chunk
    return -(-length // unit) * unit


@dataclasses.dataclass(frozen=True)
class ContextRows:
    """[B, T] rows cut into ``shards`` slices of ``shard_length`` positions, each with the ``halo``
    positions before it: [c·B, halo + T/c] rows, row ``i·B + b`` = shard i of row b."""

    shards: int
    shard_length: int
    halo: int

    @classmethod
    def plan(cls, length: int, shards: int, grid: ChunkGrid, window: int) -> ContextRows:
        k = grid.token_chunk
        if length % (shards * k):
            raise ValueError(f"a context-parallel length must be a multiple of {shards} shards x K={k}, got {length}")
        # SSM: the K positions before a shard hold its first chunk's start; window: W more keys
        # (and at least the attention's query block) whose SSM outputs must be right too.
        halo = -(-(k + max(window, window_block_size(window))) // k) * k
        shard_length = length // shards
        if shard_length < halo:
            raise ValueError(
                f"context shards of {shard_length} positions ({length} / {shards}) are shorter than the {halo} "
                f"positions each needs from the one before it (K={k} + window {window}); use fewer context shards"
            )
        return cls(shards, shard_length, halo)

    @property
    def row_length(self) -> int:
        return self.halo + self.shard_length

    def to_rows(self, x: jax.Array) -> jax.Array:
        """[B, T, ...] -> [c·B, halo + T/c, ...]; the first shard's halo holds the last shard's end."""
        b, c = x.shape[0], self.shards
        rows = jnp.swapaxes(x.reshape(b, c, self.shard_length, *x.shape[2:]), 0, 1)  # [c, B, T/c, ...]
        halo = jnp.roll(rows[:, :, self.shard_length - self.halo :], 1, axis=0)
        rows = jnp.concatenate([halo, rows], axis=2).reshape(c * b, self.row_length, *x.shape[2:])
        return sharding.constrain(rows, ("context_rows", None) + (None,) * (x.ndim - 2))

    def split(self, x: jax.Array) -> jax.Array:
        """[B, T, ...] -> [c·B, T/c, ...]: each row's shards as rows, without halos (``join``'s inverse)."""
        b = x.shape[0]
        own = jnp.swapaxes(x.reshape(b, self.shards, self.shard_length, *x.shape[2:]), 0, 1)
        own = own.reshape(self.shards * b, self.shard_length, *x.shape[2:])
        return sharding.constrain(own, ("context_rows", None) + (None,) * (x.ndim - 2))

    def shards_of(self, rows: jax.Array) -> jax.Array:
        """[c·B, halo + T/c, ...] -> [B, T, ...]: each row's own shard, its halo dropped."""
        return self.join(rows[:, self.halo :])

    def join(self, own: jax.Array) -> jax.Array:
        """[c·B, T/c, ...] (the shards' own positions) -> [B, T, ...]."""
        return self.by_row(own).reshape(own.shape[0] // self.shards, -1, *own.shape[2:])

    def by_row(self, x: jax.Array) -> jax.Array:
        """[c·B, ...] -> [B, c, ...]."""
        return jnp.swapaxes(x.reshape(self.shards, x.shape[0] // self.shards, *x.shape[1:]), 0, 1)

    def per_row(self, x: jax.Array) -> jax.Array:
        """[B, ...] -> [c·B, ...]: the same for every shard of a row."""
        return jnp.tile(x, (self.shards,) + (1,) * (x.ndim - 1))

    def offsets(self, batch: int) -> jax.Array:
        """[c·B] int32: the position in its row of each shard row's first position (negative for
        the first shard's halo)."""
        shard = jnp.repeat(jnp.arange(self.shards, dtype=jnp.int32), batch)
        return shard * self.shard_length - self.halo

    def row_starts(self, document_start: jax.Array) -> jax.Array:
        """[B, T] document starts (positions in the row) -> [c·B, halo + T/c] starts in each shard
        row's own positions, for the ops that read them there: documents that began before the row
        start at its position 0, and the first shard's halo is a document of its own."""
        b = document_start.shape[0]
        offset = self.offsets(b)[:, None]
        local = jnp.maximum(self.to_rows(document_start) - offset, 0)
        first_halo = (offset < 0) & (jnp.arange(self.row_length) < self.halo)
        return jnp.where(first_halo, 0, local)


def boundary_window_attention(q, k, v, rows: ContextRows, *, grid: ChunkGrid, window: int, document_start):
    """Boundary + window attention of context shard rows.

    Args:
      q: [c·B, T/c, H, D], each row's own queries; k, v: [c·B, halo + T/c, Hkv, D], the keys of
        the halo and of the shard (after RoPE), right from position K of the row on.
      document_start: [B, T] int, each token's document start in its row (zeros: one document).

    Returns:
      [c·B, T/c, H, D]: ``boundary_window_attention`` of the whole rows, shard by shard.
    """
    b = q.shape[0] // rows.shards
    kk = grid.token_chunk
    own = lambda a: a[:, rows.halo :]
    # The row's boundaries after token 0 are f + jK: K-periodic, T/(cK) per shard, one strided
    # slice of each shard, gathered whole for every shard (token 0 is the first document's key).
    whole = rows.join
    # (Position 0, a grid point when f = 0, is never seen there: it is every row's first document start.)
    kb, vb = (whole(own(a)[:, grid.first :: kk]) for a in (k, v))  # [B, NB, Hkv, D]
    kb, vb = (sharding.constrain(a, ("batch", None, None, None)) for a in (kb, vb))
    bpos = grid.first + kk * jnp.arange(kb.shape[1], dtype=jnp.int32)
    per_row = rows.per_row

    # Each query's document-first key: from its own row when the document starts in the row's
    # shard or halo, else from the shard that holds the start (its last document is this one).
    offset = rows.offsets(b)
    st = own(rows.to_rows(document_start))  # [c·B, T/c], positions in the whole row
    local = st - offset[:, None]
    in_row = local >= rows.halo
    take = lambda a, idx: jnp.take_along_axis(a, idx.reshape(idx.shape + (1,) * (a.ndim - 2)), axis=1)
    last_start = st[:, -1] - offset - rows.halo  # in the shard's own positions
    has_start = last_start >= 0  # the shard's last document starts in the shard
    exported = [take(own(a), jnp.maximum(last_start, 0)[:, None])[:, 0] for a in (k, v)]  # [c·B, Hkv, D]
    exported = [rows.by_row(jnp.where(has_start[:, None, None], a, 0)) for a in exported]  # [B, c, Hkv, D]
    exported = [sharding.constrain(a, ("batch", None, None, None)) for a in exported]
    holder = st // rows.shard_length  # [c·B, T/c]: the shard of each query's document start
    kd, vd = (
        jnp.where(in_row[..., None, None], take(a, jnp.clip(local, 0, rows.row_length - 1)), take(per_row(e), holder))
        for a, e in zip((k, v), exported)
    )

    # The window part reads the Q keys before each shard's first query from the halo.
    qb = window_block_size(window)
    keys = lambda a: a[:, rows.halo - qb :]
    return attention_of_rows(
        q,
        keys(k),
        keys(v),
        (per_row(kb), per_row(vb), bpos),
        (kd, vd, st),
        grid=grid,
        window=window,
        row_offset=offset + rows.halo,
    )
