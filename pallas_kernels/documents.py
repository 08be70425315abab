"""Packed documents: several documents in one row, each computed as if it were alone.

A row's layout is one int32 per token, ``document_start`` [B, T]: the position in the row of
the first token of the token's document (0 everywhere for a row that is one document). Every
op that takes it follows one rule, which makes a packed row equal to its documents run alone
from position 0:

  SSM        the scan state and the conv history restart at a document's first token, and
             then at the chunk starts of the document's own grid (the grid reads a token's
             position minus its document's start: ``ChunkGrid.chunk_start_in_document``);
  attention  query t sees key s only when s >= document_start[t], under ``Visibility`` read at
             positions relative to that start (``Visibility.visible(t, s, start)``).

RoPE is relative, so absolute positions stay.

Alignment. The references (``sequential`` and ``associative`` SSD, ``dense`` attention) hold
the rule for any layout. The fast paths need each document to start at a multiple of the chunk
length K (``check_aligned``), which the data pipeline's packer guarantees (``data.py``): then a
document's chunks lie inside the row's chunks and its boundaries are the row's boundaries after
its first token plus that first token itself, so every fast path keeps its blocks and its
boundary gather and adds a same-document mask and one key per query (the document's first token,
once it has left the window).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def from_segment_ids(segment_ids: jax.Array, slices: int = 1) -> jax.Array:
    """[B, T] segment ids -> [B, T] int32 document starts.

    A document starts at position 0 and wherever the id changes to a non-zero value. Id 0 is
    padding: it continues the document before it (padding after a document's last token is
    never seen by that document, and nothing after it sees the padding).

    ``slices``: the same result, computed on that many equal slices of the length, each from its
    own ids plus the last id and the last start of the slices before it — what each device needs
    when the length is split over devices (a row is never gathered whole).
    """
    seg = jnp.asarray(segment_ids)
    b, t = seg.shape
    if t % slices:
        raise ValueError(f"from_segment_ids: {slices} slices do not divide the length {t}")
    seg = seg.reshape(b, slices, t // slices)
    pos = jnp.arange(t, dtype=jnp.int32).reshape(slices, t // slices)
    before = jnp.roll(seg[:, :, -1:], 1, axis=1)  # each slice's previous id (the first slice: unread)
    prev = jnp.concatenate([before, seg[:, :, :-1]], axis=2)
    starts = (pos == 0) | ((seg != prev) & (seg != 0))
    own = jax.lax.cummax(jnp.where(starts, pos, 0), axis=2)  # [B, S, T/S]
    carried = jax.lax.cummax(jnp.pad(own[:, :-1, -1], ((0, 0), (1, 0))), axis=1)  # the starts before each slice
    return jnp.maximum(own, carried[:, :, None]).reshape(b, t)


def check_aligned(document_start, token_chunk: int) -> None:
    """Raises ValueError unless every document of a concrete layout starts at a multiple of K."""
    start = np.asarray(document_start)
    bad = start % token_chunk != 0
    if bad.any():
        row, pos = (int(i[0]) for i in np.nonzero(bad))
        raise ValueError(
            f"documents must start at multiples of token_chunk={token_chunk} for the fast paths; row {row} has a "
            f"document starting at {int(start[row, pos])} (pack with data.document_align a multiple of {token_chunk})"
        )


def check_layout(document_start: jax.Array, batch: int, length: int) -> None:
    """Shape and dtype checks for an op's ``document_start`` argument."""
    if document_start.shape != (batch, length):
        raise ValueError(f"document_start must have shape {(batch, length)}, got {document_start.shape}")
    if not jnp.issubdtype(document_start.dtype, jnp.integer):
        raise ValueError(f"document_start must be integer, got {document_start.dtype}")


def next_starts(document_start: jax.Array, positions, token_chunk: int, row_offset=None) -> jax.Array:
    """[B, T] document starts at multiples of K, [J] positions p -> [B, J] int32: the first token at
    or after p whose document starts at or after p (T when none), for kernels' walks that stop at a
    document's end. ``row_offset`` [B] (multiples of K): the rows' tokens are at positions
    ``row_offset + 0..T-1`` of longer sequences (the result is a position, ``row_offset + T`` when none).

    Every K-block lies in one document, and the blocks whose document starts before p come first:
    the token sought is the first of the first block that is not one of them.
    """
    length = document_start.shape[1]
    firsts = document_start[:, ::token_chunk]  # [B, ceil(T/K)]: whole K-blocks lie in one document
    positions = jnp.asarray(positions, jnp.int32)
    count = jnp.sum(firsts[:, :, None] < positions, axis=1, dtype=jnp.int32)
    found = jnp.minimum(count * token_chunk, length)
    return found if row_offset is None else found + jnp.asarray(row_offset, jnp.int32)[:, None]


@jax.custom_vjp
def at_document_start(a: jax.Array, document_start: jax.Array) -> jax.Array:
    """[B, T, ...] -> [B, T, ...]: each token's row of ``a`` at its document's first token.

    A gather whose gradient is a scatter-add with every token of a document on one index (which
    serialises on a GPU); its backward here sums each document's cotangents with a segmented
    scan instead and puts the sum at the document's first token."""
    idx = document_start.reshape(document_start.shape + (1,) * (a.ndim - 2))
    return jnp.take_along_axis(a, idx, axis=1)


def _at_document_start_fwd(a, document_start):
    return at_document_start(a, document_start), document_start


def _at_document_start_bwd(document_start, g):
    b, t = document_start.shape
    pos = jax.lax.broadcasted_iota(jnp.int32, (b, t), 1)
    # A document's last token: the next token's document starts elsewhere (or the row ends).
    last = jnp.concatenate([document_start[:, 1:] != document_start[:, :-1], jnp.ones((b, 1), bool)], axis=1)
    expand = lambda x: x.reshape(x.shape + (1,) * (g.ndim - 2))

    def combine(left, right):  # a sum that restarts at a flagged element (reversed: at each document's last token)
        (vl, fl), (vr, fr) = left, right
        return jnp.where(fr, vr, vl + vr), fl | fr

    # Reversed, each document is a segment starting at its last token: the inclusive scan at the
    # document's first token is the sum over the document. Other documents' values are selected
    # away, never added, so a document's gradient does not depend on its neighbours.
    sums, _ = jax.lax.associative_scan(combine, (g[:, ::-1], expand(last[:, ::-1])), axis=1)
    sums = sums[:, ::-1]
    grad = jnp.where(expand(pos == document_start), sums, jnp.zeros((), g.dtype))
    return grad, np.zeros(document_start.shape, jax.dtypes.float0)


at_document_start.defvjp(_at_document_start_fwd, _at_document_start_bwd)
