"""Where the boundary keys are, in closed form, for use inside kernels.

The boundaries of a grid (K, o) are ``{0} ∪ {f + jK}`` with ``f = K - 1 - o``. A kernel
that walks the gathered boundary keys needs two maps between positions and the
index a boundary has among them; both are a few integer ops on int32 scalars or
vectors, so they run in Triton and Mosaic alike (numerators are kept >= 0 because
the integer division truncates).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attamba_jax.chunking import ChunkGrid


class BoundaryIndex:
    def __init__(self, grid: ChunkGrid):
        self.k = grid.token_chunk
        self.first = grid.token_chunk - 1 - grid.offset  # f: the first grid boundary after 0

    def count_before(self, x):
        """``#{b : b < x}`` (int32 scalar or array ``x``, any sign)."""
        x = jnp.asarray(x, jnp.int32)
        ahead = jnp.maximum(x - self.first, 0)  # grid points f + jK < x  <=>  j < (x - f) / K
        count = jax.lax.div(ahead + (self.k - 1), jnp.int32(self.k))
        if self.first != 0:  # token 0 is a boundary of its own
            count = count + (x > 0).astype(jnp.int32)
        return count

    def position(self, n):
        """Position of the n-th boundary (n >= 0; past the last one it keeps counting)."""
        n = jnp.asarray(n, jnp.int32)
        if self.first == 0:
            return n * self.k
        return jnp.where(n == 0, 0, self.first + (n - 1) * self.k)
