"""Chunk boundaries: the one source of truth for where Attamba's chunks start and end.

Layer ``l`` of ``N_L`` splits the sequence on a fixed grid shifted by an offset
``o_l = min(K - 1, l * (K // N_L))``. Its boundary set is

    B_l = {0} ∪ {K - 1 - o_l + j*K : j >= 0}

so token 0 is a chunk of its own, the next chunk is ``[1, K-1-o_l]`` (empty when
``o_l = K-1``), and every later chunk is ``[b+1, b+K]``. The grid never depends on
the sequence length: a token's chunk is the same in a 12-token prompt and in a
1M-token document, which is what lets a decoder cache boundaries as they arrive.

The SSMs restart at every chunk start (``t = 0`` or ``t - 1 ∈ B_l``), and query
``t`` attends to key ``s`` iff ``(s < t and s ∈ B_l) or max(0, t-W) <= s <= t``.

Everything here works on NumPy (static shapes, host-side masks) and on jax.numpy
(traced positions in a decoder) alike.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np


def _where(cond, a, b):
    """``np.where`` on host values, ``jnp.where`` on traced ones."""
    if any(isinstance(v, jax.Array) for v in (cond, a, b)):
        return jnp.where(cond, a, b)
    return np.where(cond, a, b)


def layer_offset(layer: int, token_chunk: int, n_layers: int) -> int:
    """The cyclic grid offset of ``layer``: ``min(K-1, layer * (K // N_L))``."""
    if not 0 <= layer < n_layers:
        raise ValueError(f"layer must be in [0, {n_layers}), got {layer}")
    return min(token_chunk - 1, layer * (token_chunk // n_layers))


@dataclasses.dataclass(frozen=True)
class ChunkGrid:
    """The fixed boundary grid of one layer.

    Attributes:
      token_chunk: K, the chunk length (the paper's P).
      offset: o, the layer's grid offset, ``0 <= o < K``.
    """

    token_chunk: int
    offset: int = 0

    def __post_init__(self):
        if self.token_chunk < 1:
            raise ValueError(f"token_chunk must be >= 1, got {self.token_chunk}")
        if not 0 <= self.offset < self.token_chunk:
            raise ValueError(
                f"offset must be in [0, token_chunk={self.token_chunk}), got {self.offset}"
            )

    @classmethod
    def for_layer(cls, layer: int, token_chunk: int, n_layers: int) -> "ChunkGrid":
        return cls(token_chunk, layer_offset(layer, token_chunk, n_layers))

    # --- per-position predicates (NumPy or jax.numpy integer arrays) -------------

    def is_boundary(self, pos):
        """True where a chunk ends at ``pos`` (its output is a boundary key)."""
        return (pos == 0) | ((pos + self.offset + 1) % self.token_chunk == 0)

    def is_chunk_start(self, pos):
        """True where the SSM state and conv history restart before ``pos``."""
        return (pos == 0) | self.is_boundary(pos - 1)

    def chunk_id(self, pos):
        """A chunk index that is equal for two positions iff they share a chunk.

        Token 0 is chunk 0; position ``t >= 1`` is chunk ``(t + o) // K + 1``. Ids
        are increasing but may skip one (when ``o = K-1`` the chunk ``[1, K-1-o]``
        is empty).
        """
        return _where(pos == 0, 0, (pos + self.offset) // self.token_chunk + 1)

    def position_in_chunk(self, pos):
        """Distance from the chunk's first token: 0 at every chunk start."""
        # Full chunks start at K - o + jK, i.e. where (pos + o) % K == 0; positions
        # 1 .. K-1-o form a short chunk that starts at 1.
        in_chunk = (pos + self.offset) % self.token_chunk
        short = pos < self.token_chunk - self.offset
        return _where(pos == 0, 0, _where(short, pos - 1, in_chunk))

    def num_boundaries_before(self, pos):
        """``#{b ∈ B : b < pos}``: the index a boundary at ``pos`` takes in arrival order."""
        first = self.token_chunk - 1 - self.offset
        on_grid = (pos - first + self.token_chunk - 1) // self.token_chunk  # grid points first + jK < pos
        on_grid = _where(on_grid > 0, on_grid, 0)
        # Token 0 is a boundary of its own unless the grid already starts there.
        return on_grid + _where((pos > 0) & (first != 0), 1, 0)

    # --- whole-sequence views (static, NumPy) --------------------------------------

    def boundaries(self, length: int) -> np.ndarray:
        """Sorted boundary positions ``< length`` (int32)."""
        first = self.token_chunk - 1 - self.offset
        grid = np.arange(first, length, self.token_chunk, dtype=np.int32)
        if length > 0 and first != 0:
            grid = np.concatenate([np.zeros(1, np.int32), grid])
        return grid

    def num_boundaries(self, length: int) -> int:
        return int(self.boundaries(length).shape[0])

    def max_boundaries(self, length: int) -> int:
        """An upper bound on ``num_boundaries`` usable as a cache capacity."""
        return math.ceil(length / self.token_chunk) + 1

    def chunk_layout(self, length: int) -> "ChunkLayout":
        return ChunkLayout(self, length)


@dataclasses.dataclass(frozen=True)
class ChunkLayout:
    """Places a length-T sequence into independent, equally sized chunks of K slots.

    Slot layout (u = slot index on the padded axis, chunk c = u // K):
      chunk 0:   [token 0, pad × (K-1)]
      chunk 1:   [pad × (o+1), tokens 1 .. K-1-o]
      chunk 2..: tokens in order, K per chunk, the last one padded at the end.
    Every real chunk of the grid occupies exactly one slot-chunk, and padding only
    ever precedes a chunk's first token or follows the sequence's last, so a
    causal per-chunk computation on zero-padded inputs gives the chunk-reset
    result at every real token.
    """

    grid: ChunkGrid
    length: int

    @property
    def lead(self) -> int:
        """Slots before token 1: chunk 0 plus the o+1 pads that open chunk 1."""
        return self.grid.token_chunk + self.grid.offset + 1

    @property
    def num_chunks(self) -> int:
        k = self.grid.token_chunk
        return max(1, -(-(self.lead + self.length - 1) // k))

    @property
    def padded_length(self) -> int:
        return self.num_chunks * self.grid.token_chunk

    def to_chunks(self, x):
        """[B, T, ...] -> [B, C, K, ...], zero padded."""
        b, _, *rest = x.shape
        zeros = lambda n: jnp.zeros((b, n, *rest), x.dtype)
        tail = self.padded_length - self.lead - (self.length - 1)
        y = jnp.concatenate([x[:, :1], zeros(self.lead - 1), x[:, 1:], zeros(tail)], axis=1)
        return y.reshape(b, self.num_chunks, self.grid.token_chunk, *rest)

    def from_chunks(self, y):
        """Inverse of ``to_chunks``: [B, C, K, ...] -> [B, T, ...]."""
        b, _, _, *rest = y.shape
        y = y.reshape(b, self.padded_length, *rest)
        return jnp.concatenate([y[:, :1], y[:, self.lead : self.lead + self.length - 1]], axis=1)


# --- attention visibility -----------------------------------------------------------


def attention_mask(length: int, grid: ChunkGrid | None, window: int | None) -> np.ndarray:
    """The [T, T] bool mask: query t (row) may attend key s (column).

    ``grid=None`` gives plain causal attention (the transformer, and Attamba's
    ``pseudo_chunk`` ablation); ``window`` alone gives a causal sliding window of
    ``window + 1`` keys.
    """
    t = np.arange(length)[:, None]
    s = np.arange(length)[None, :]
    causal = s <= t
    if window is None:
        local = causal
    else:
        local = causal & (s >= t - window)
    if grid is None:
        return local
    return local | ((s < t) & grid.is_boundary(s))


def keys_per_query(length: int, grid: ChunkGrid | None, window: int | None) -> np.ndarray:
    """How many keys each query attends to (row sums of ``attention_mask``), in O(T)."""
    t = np.arange(length)
    local = t + 1 if window is None else np.minimum(t, window) + 1
    if grid is None or window is None:
        return local
    # boundaries strictly before the window's first key t-W
    return local + np.searchsorted(grid.boundaries(length), t - window, side="left")
