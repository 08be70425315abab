"""Which keys a query sees: the one attention rule, for the references, the XLA paths, both
Pallas kernels (their masks and their block tables) and the decode cache.

Attamba (SPEC §4): query t sees key s iff ``(s < t and s ∈ B) or t - W <= s <= t``. It is
computed as two disjoint parts, which is how every fast path walks it:

  boundary part   the n-th boundary, for every n with ``position(n) < t - W``: the first
                  ``boundaries_seen(t)`` boundaries in arrival order;
  window part     the raw keys ``max(0, t - W) .. t``.

A boundary inside the window belongs to the window part only, so the union is the rule
above. Without a grid the boundary part is empty: ``Visibility(None, W)`` is a causal
sliding window of W + 1 keys and ``Visibility(None, None)`` plain causal attention (the
transformer, and Attamba's ``pseudo_chunk`` ablation).

Packed documents (``documents``): a query sees only keys of its own document, which starts at
``start <= t``, and the rule is read at positions relative to it. Methods that take ``start``
(None: the row is one document) give the two parts for documents that start at multiples of K:

  boundary part   the row's boundaries n with ``start < position(n) < t - W`` — the contiguous
                  range ``first_boundary(start) .. boundaries_seen(t)`` in arrival order — plus
                  the document's first token, a boundary of its own grid, once ``start < t - W``
                  (``document_key_visible``);
  window part     the raw keys ``max(t - W, start) .. t``.

With start = 0 this is the rule above (the first token is boundary 0).

Like ``chunk_grid``, every method is integer arithmetic that runs on ints, NumPy arrays and
jax arrays (inside kernels too); arguments broadcast against each other.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from pallas_kernels.chunk_grid import ChunkGrid, _maximum


@dataclasses.dataclass(frozen=True)
class Visibility:
    """The keys query t sees (hashable: kernels specialise on it).

    Attributes:
      grid: the layer's chunk grid; None = no boundary keys.
      window: W >= 0, the window is the W + 1 keys up to the query; None = every earlier key.
    """

    grid: ChunkGrid | None
    window: int | None

    def __post_init__(self):
        if self.window is not None and self.window < 0:
            raise ValueError(f"window must be >= 0, got {self.window}")
        if self.grid is not None and self.window is None:
            raise ValueError("boundary keys need a window (with every earlier key visible they add nothing)")

    # --- the window part --------------------------------------------------------------------

    def window_start(self, t, start=None):
        """The first window key of query ``t`` (in a document that starts at ``start``)."""
        lo = 0 * t if start is None else start + 0 * t
        return lo if self.window is None else _maximum(t - self.window, lo)

    def window_visible(self, t, s, start=None):
        """Key position ``s`` is in query ``t``'s window."""
        visible = s <= t
        if self.window is not None:
            visible = visible & (s >= t - self.window)
        return visible if start is None else visible & (s >= start)

    # --- the boundary part ------------------------------------------------------------------

    def boundaries_seen(self, t):
        """How many boundaries query ``t`` sees before its window: the first that many, in arrival order."""
        if self.grid is None:
            return 0 * t
        return self.grid.count_before(t - self.window)

    def first_boundary(self, start):
        """The first row boundary a query of the document starting at ``start`` may see: the ones
        after its first token (needs a grid; the first token itself is ``document_key_visible``)."""
        return self.grid.count_before(start + 1)

    def boundary_visible(self, t, n, start=None):
        """The ``n``-th boundary is in query ``t``'s boundary part (needs a grid)."""
        return self.before_window(t, self.grid.position(n), start)

    def before_window(self, t, p, start=None):
        """A boundary at position ``p`` is in query ``t``'s boundary part: before its window (and
        after its document's first token, which is ``document_key_visible``)."""
        visible = p < t - self.window
        return visible if start is None else visible & (p > start)

    def document_key_visible(self, t, start):
        """The first token of query ``t``'s document (at ``start``) is in its boundary part."""
        if self.grid is None:
            return 0 * t != 0
        return start < t - self.window

    def first_query_seeing(self, n):
        """The first query whose boundary part holds the ``n``-th boundary (needs a grid)."""
        return self.grid.position(n) + self.window + 1

    # --- the whole rule ---------------------------------------------------------------------

    def visible(self, t, s, start=None):
        """Query ``t`` sees key position ``s >= 0``: the union of the two parts.

        With ``start`` the rule is read in the query's document, for any layout: positions
        relative to ``start``, keys before it hidden.
        """
        if start is not None:
            return self.visible(t - start, s - start) & (s >= start)
        local = self.window_visible(t, s)
        if self.grid is None:
            return local
        return local | ((s < t - self.window) & self.grid.is_boundary(s))

    def dense(self, length: int, start=None) -> np.ndarray:
        """The [T, T] bool mask: query t (row) sees key s (column); with ``start`` [..., T]
        (each query's document start) the [..., T, T] mask of a packed row."""
        t = np.arange(length)[:, None]
        s = np.arange(length)[None, :]
        if start is None:
            return self.visible(t, s)
        return self.visible(t, s, start[..., :, None])

    def keys_per_query(self, length: int) -> np.ndarray:
        """Row sums of ``dense`` in O(T): how many keys each query attends to."""
        t = np.arange(length)
        local = t + 1 if self.window is None else np.minimum(t, self.window) + 1
        return local + self.boundaries_seen(t)
