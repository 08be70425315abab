"""Context parallelism: Attamba's layers with the length split over the mesh's ``context`` axis.

The length is cut into 2c pieces of P = T/(2c) positions (a multiple of K: the model pads the
length up to a multiple of 2c·K at its end, where causality keeps the padding from every real
token), and device i of the c devices of the ``context`` axis holds pieces i and 2c-1-i. That
balances causal attention: a query sees the boundary keys before it, so a piece's attention costs
about its position, and every device's two pieces add up to the same. The model lays the whole
length out in that order, the *context order* (``ContextRows.order``), from the embedding to the
loss: only the SSMs and the attention read positions, and they read them explicitly.

Attamba needs little from the other devices, because its SSMs restart every K tokens and a query
sees only boundary keys and its window:

  halo        each piece also takes the last ``halo`` positions of the piece before it (the layer
              input, ``dim`` wide): enough for the SSM state at its first token (its chunk started
              at most K-1 positions earlier) and for the keys of its first queries' windows;
  boundaries  the ⌈T/K⌉ boundary keys and values of the whole row, gathered from every device;
  documents   the key and value of each document's first token, one per piece.

That is about K times less than gathering every key and value. (An all-gather, not a ring: a
piece needs the boundaries of every piece before it, and the gathered array, 1/K of the keys, is
small enough to hold whole; a ring would move the same bytes in c-1 dependent steps.) Each piece
and its halo become one row of a [2c·B, halo + P] array (``ContextRows``, rows ordered device,
batch row, piece), whose rows are split over (context, data, fsdp), so that every device already
holds its rows: the halo is then the end of another row, and every op that runs on independent
rows runs unchanged. XLA
turns the halos into collective permutes and the boundaries into one all-gather.

A piece row reads the SSM on the layer's grid from its first position, which is a multiple of K
positions before the row's piece: its chunks are the row's from there on, except that the grid's
first chunks (token 0 alone, then ``[1, f]``) also start the row; those fall in the halo, whose
outputs are dropped. The packed-documents layout (``pallas_kernels.documents``) carries the rest:
the row's real tokens form documents of their own, and for the first piece the halo is a
document apart (it holds another piece's tokens).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from attamba_jax import sharding
from pallas_kernels.boundary_window_attention import ROW_IMPLEMENTATIONS, boundary_window_attention_of_rows
from pallas_kernels.boundary_window_attention.xla import window_block_size
from pallas_kernels.chunk_grid import ChunkGrid
from pallas_kernels.documents import at_document_start


def context_shards() -> int:
    """The size of the active mesh's ``context`` axis (1 outside a mesh)."""
    active = sharding.active_mesh()
    return 1 if active is None else int(active[0].shape.get("context", 1))


def padded_length(length: int, shards: int, token_chunk: int) -> int:
    """The length a model pads a row to for ``shards`` context devices: a multiple of 2c·K."""
    unit = 2 * shards * token_chunk
    return -(-length // unit) * unit


def context_order(length: int, shards: int) -> np.ndarray:
    """[T]: the position in the row of each position of the context order, the length in 2c
    pieces with device i holding pieces i and 2c-1-i (``length`` a multiple of 2c)."""
    c, piece = shards, length // (2 * shards)
    piece_of_slot = np.stack([np.arange(c), 2 * c - 1 - np.arange(c)], axis=1).reshape(-1)
    return (piece_of_slot[:, None] * piece + np.arange(piece)).reshape(-1)


def in_context_order(x: jax.Array, order: np.ndarray) -> jax.Array:
    """[B, T, ...] in the row's order -> [B, T', ...] in context ``order`` (T' >= T: zeros at the padding)."""
    x = jnp.pad(x, [(0, 0), (0, order.size - x.shape[1])] + [(0, 0)] * (x.ndim - 2))
    return jnp.take(x, jnp.asarray(order), axis=1)


@dataclasses.dataclass(frozen=True)
class ContextRows:
    """[B, T] rows in context order cut into their 2c pieces, each with the ``halo`` positions
    before it: [2c·B, halo + P] rows, row ``(i·B + b)·2 + j`` = piece ``piece_of_slot[2i + j]``
    of row b (device i holds slots 2i and 2i+1: pieces i and 2c-1-i)."""

    shards: int
    piece_length: int
    halo: int

    @classmethod
    def plan(cls, length: int, shards: int, grid: ChunkGrid, window: int) -> ContextRows:
        k = grid.token_chunk
        if length % (2 * shards * k):
            raise ValueError(
                f"a context-parallel length must be a multiple of 2 x {shards} devices x K={k}, got {length}"
            )
        # SSM: the K positions before a piece hold its first chunk's start; window: W more keys
        # (and at least the attention's query block) whose SSM outputs must be right too.
        halo = -(-(k + max(window, window_block_size(window))) // k) * k
        piece = length // (2 * shards)
        if piece < halo:
            raise ValueError(
                f"context pieces of {piece} positions ({length} / 2 x {shards} devices) are shorter than the {halo} "
                f"positions each needs from the one before it (K={k} + window {window}); use fewer context devices"
            )
        return cls(shards, piece, halo)

    @property
    def row_length(self) -> int:
        return self.halo + self.piece_length

    @property
    def order(self) -> np.ndarray:
        """[T]: ``context_order`` of this split."""
        return context_order(2 * self.shards * self.piece_length, self.shards)

    @property
    def piece_of_slot(self) -> np.ndarray:
        """[2c]: the piece (in the row's order) at each place of the context order."""
        return self.order[:: self.piece_length] // self.piece_length

    def _slots(self, x: jax.Array) -> jax.Array:
        """[B, T, ...] (context order) -> [c, B, 2, P, ...]."""
        b = x.shape[0]
        return jnp.swapaxes(x.reshape(b, self.shards, 2, self.piece_length, *x.shape[2:]), 0, 1)

    def _rows(self, x: jax.Array) -> jax.Array:
        """[c, B, 2, ...] -> [2c·B, ...], split over the devices."""
        rows = x.reshape(-1, *x.shape[3:])
        return sharding.constrain(rows, ("context_rows",) + (None,) * (rows.ndim - 1))

    def to_rows(self, x: jax.Array) -> jax.Array:
        """[B, T, ...] -> [2c·B, halo + P, ...]; the first piece's halo holds the last piece's end."""
        own = self._slots(x)
        tails = own[:, :, :, self.piece_length - self.halo :]
        # the piece before piece i (slot 2i) is piece i-1 (slot 2i-2); the one before piece 2c-1-i
        # (slot 2i+1) is piece 2c-2-i (slot 2i+3), or piece c-1 (slot 2c-2) for i = c-1.
        # (Rolls along the device axis: one collective permute each; piece 0's halo is never read.)
        before_first = jnp.roll(tails[:, :, 0], 1, axis=0)
        last = (jnp.arange(self.shards) == self.shards - 1).reshape((-1,) + (1,) * (tails.ndim - 2))
        before_second = jnp.where(last, tails[:, :, 0], jnp.roll(tails[:, :, 1], -1, axis=0))
        halos = jnp.stack([before_first, before_second], axis=2)
        return self._rows(jnp.concatenate([halos, own], axis=3))

    def split(self, x: jax.Array) -> jax.Array:
        """[B, T, ...] -> [2c·B, P, ...]: the pieces as rows, without halos (``join``'s inverse)."""
        return self._rows(self._slots(x))

    def shards_of(self, rows: jax.Array) -> jax.Array:
        """[2c·B, halo + P, ...] -> [B, T, ...]: each row's own piece, its halo dropped."""
        return self.join(rows[:, self.halo :])

    def join(self, own: jax.Array) -> jax.Array:
        """[2c·B, n, ...] (n per piece) -> [B, 2c·n, ...], in context order."""
        return self.by_row(own).reshape(own.shape[0] // (2 * self.shards), -1, *own.shape[2:])

    def by_row(self, x: jax.Array) -> jax.Array:
        """[2c·B, ...] -> [B, 2c, ...] (the context order's slots)."""
        c = self.shards
        return jnp.swapaxes(x.reshape(c, x.shape[0] // (2 * c), 2, *x.shape[1:]), 0, 1).reshape(-1, 2 * c, *x.shape[1:])

    def row_of(self, piece: jax.Array, batch_row: jax.Array, batch: int) -> jax.Array:
        """The row of ``piece`` (in the row's order) of batch row ``batch_row`` (of ``batch``)."""
        slot = jnp.asarray(np.argsort(self.piece_of_slot), jnp.int32)[piece]
        return ((slot // 2) * batch + batch_row) * 2 + slot % 2

    def per_row(self, x: jax.Array) -> jax.Array:
        """[B, ...] -> [2c·B, ...]: the same for every piece of a row."""
        c = self.shards
        return jnp.broadcast_to(x[None, :, None], (c, x.shape[0], 2, *x.shape[1:])).reshape(-1, *x.shape[1:])

    def offsets(self, batch: int) -> jax.Array:
        """[2c·B] int32: the position in its row of each piece row's first position (negative for
        the first piece's halo)."""
        first = self.piece_of_slot.reshape(self.shards, 1, 2) * self.piece_length - self.halo
        return jnp.asarray(np.broadcast_to(first, (self.shards, batch, 2)).reshape(-1), jnp.int32)

    def row_starts(self, document_start: jax.Array) -> jax.Array:
        """[B, T] document starts (positions in the row, context order) -> [2c·B, halo + P] starts in
        each piece row's own positions, for the ops that read them there: documents that began
        before the row start at its position 0, and the first piece's halo is a document of its own."""
        b = document_start.shape[0]
        offset = self.offsets(b)[:, None]
        local = jnp.maximum(self.to_rows(document_start) - offset, 0)
        first_halo = (offset < 0) & (jnp.arange(self.row_length) < self.halo)
        return jnp.where(first_halo, 0, local)

    def natural(self, x: jax.Array) -> jax.Array:
        """[B, T, ...] in context order -> the row's order."""
        return jnp.take(x, jnp.asarray(np.argsort(self.order)), axis=1)


def _attention_of_rows(q, k, v, kb, vb, kd, vd, starts, offsets, **kw):
    """``boundary_window_attention_of_rows`` with flat array arguments (``sharding.call_op`` shards each)."""
    return boundary_window_attention_of_rows(q, k, v, (kb, vb), (kd, vd, starts), row_offset=offsets, **kw)


def boundary_window_attention(
    q, k, v, rows: ContextRows, *, grid: ChunkGrid, window: int, document_start, implementation: str = "auto"
):
    """Boundary + window attention of context piece rows.

    Args:
      q: [2c·B, P, H, D], each row's own queries; k, v: [2c·B, halo + P, Hkv, D], the keys of
        the halo and of the piece (after RoPE), right from position K of the row on.
      document_start: [B, T] int (context order), each token's document start in its row
        (zeros: one document).
      implementation: ``boundary_window_attention_of_rows``'s: a kernel named here runs on each
        device's rows (and heads over ``tensor``); ``auto`` takes the XLA path under a mesh.

    Returns:
      [2c·B, P, H, D]: ``boundary_window_attention`` of the whole rows, piece by piece.
    """
    b = q.shape[0] // (2 * rows.shards)
    kk = grid.token_chunk
    own = lambda a: a[:, rows.halo :]
    # The row's grid points f + jK: K-periodic, P/K per piece (P is a multiple of K), one strided
    # slice of each piece, gathered whole for every piece and put in the row's order: its
    # boundaries in arrival order, after token 0 when that is apart from the grid (f > 0), which
    # is never seen there (it is every row's first document start) and held as zeros.
    natural = jnp.asarray(np.argsort(rows.piece_of_slot))
    kb, vb = (jnp.take(rows.by_row(own(a)[:, grid.first :: kk]), natural, axis=1) for a in (k, v))
    kb, vb = (a.reshape(b, -1, *a.shape[3:]) for a in (kb, vb))  # [B, T/K, Hkv, D]
    if grid.first:
        kb, vb = (jnp.pad(a, ((0, 0), (1, 0), (0, 0), (0, 0))) for a in (kb, vb))
    kb, vb = (sharding.constrain(a, ("batch", None, None, None)) for a in (kb, vb))
    per_row = rows.per_row

    # Each query's document-first key: from its own row when the document starts in the row's
    # piece, else (the piece's first document, begun before it) from the piece that holds the
    # start, whose last document it is. Both are taken so that no two queries' gradients meet in
    # a scatter: within the row by ``at_document_start`` on the row's own layout, and from the
    # holder once per row, broadcast over the row's queries.
    offset = rows.offsets(b)
    st = own(rows.to_rows(document_start))  # [2c·B, P], positions in the whole row
    in_row = st - offset[:, None] >= rows.halo
    local_starts = rows.row_starts(document_start)
    last_start = st[:, -1] - offset - rows.halo  # in the piece's own positions
    has_start = last_start >= 0  # the piece's last document starts in the piece
    take = lambda a, idx: jnp.take_along_axis(a, idx.reshape(idx.shape + (1,) * (a.ndim - 2)), axis=1)
    exported = [take(own(a), jnp.maximum(last_start, 0)[:, None])[:, 0] for a in (k, v)]  # [2c·B, Hkv, D]
    exported = [jnp.where(has_start[:, None, None], a, 0) for a in exported]
    exported = [sharding.constrain(a, (None, None, None)) for a in exported]  # every row's, on every device
    holder = rows.row_of(st[:, 0] // rows.piece_length, rows.per_row(jnp.arange(b, dtype=jnp.int32)), b)
    kd, vd = (
        jnp.where(in_row[..., None, None], own(at_document_start(a, local_starts)), e[holder][:, None])
        for a, e in zip((k, v), exported)
    )

    # The window part reads the Q keys before each piece's first query from the halo.
    keys = lambda a: a[:, rows.halo - window_block_size(window) :]
    heads = "kv" if sharding.splits("kv", k.shape[2]) else None
    axes = ("context_rows", None, heads, None)
    args = (q, keys(k), keys(v), per_row(kb), per_row(vb), kd, vd, st, offset + rows.halo)
    arg_axes = (axes,) * 7 + (("context_rows", None), ("context_rows",))
    return sharding.call_op(
        _attention_of_rows,
        ROW_IMPLEMENTATIONS,
        implementation,
        args,
        arg_axes,
        axes,
        grid=grid,
        window=window,
    )
