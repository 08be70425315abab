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

    def window_start(self, t):
        """The first window key of query ``t``."""
        return 0 * t if self.window is None else _maximum(t - self.window, 0)

    def window_visible(self, t, s):
        """Key position ``s`` is in query ``t``'s window."""
        causal = s <= t
        return causal if self.window is None else causal & (s >= t - self.window)

    # --- the boundary part ------------------------------------------------------------------

    def boundaries_seen(self, t):
        """How many boundaries query ``t`` sees before its window: the first that many, in arrival order."""
        if self.grid is None:
            return 0 * t
        return self.grid.count_before(t - self.window)

    def boundary_visible(self, t, n):
        """The ``n``-th boundary is in query ``t``'s boundary part (needs a grid)."""
        return self.grid.position(n) < t - self.window

    def first_query_seeing(self, n):
        """The first query whose boundary part holds the ``n``-th boundary (needs a grid)."""
        return self.grid.position(n) + self.window + 1

    # --- the whole rule ---------------------------------------------------------------------

    def visible(self, t, s):
        """Query ``t`` sees key position ``s >= 0``: the union of the two parts."""
        local = self.window_visible(t, s)
        if self.grid is None:
            return local
        return local | ((s < t - self.window) & self.grid.is_boundary(s))

    def dense(self, length: int) -> np.ndarray:
        """The [T, T] bool mask: query t (row) sees key s (column)."""
        t = np.arange(length)[:, None]
        return self.visible(t, np.arange(length)[None, :])

    def keys_per_query(self, length: int) -> np.ndarray:
        """Row sums of ``dense`` in O(T): how many keys each query attends to."""
        t = np.arange(length)
        local = t + 1 if self.window is None else np.minimum(t, self.window) + 1
        return local + self.boundaries_seen(t)
