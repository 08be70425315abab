"""The chunk grid: where Attamba's chunks start and end, written once for every caller.

Layer ``l`` of ``N_L`` splits the sequence on a fixed grid shifted by an offset
``o_l = min(K - 1, l * (K // N_L))``. Its boundary set is

    B_l = {0} ∪ {f + j*K : j >= 0},   f = K - 1 - o_l

so token 0 is a chunk of its own, the next chunk is ``[1, f]`` (empty when ``o_l = K-1``),
and every later chunk is ``[b+1, b+K]``. The grid never depends on the sequence length: a
token's chunk is the same in a 12-token prompt and in a 1M-token document, which is what
lets a decoder cache boundaries as they arrive. The SSMs restart at every chunk start
(``t = 0`` or ``t - 1 ∈ B_l``); which keys a query sees is ``visibility.Visibility``.

Every rule is integer arithmetic on its argument, which may be a Python int, a NumPy array
(host-side block tables, static masks) or a jax array (decoder positions, and the bodies of
the Pallas kernels, where the same code lowers to Triton and to Mosaic). Divisions keep
their numerators >= 0 and truncate, which both kernel compilers take without sign fix-ups.

Every rule is a function of a token's position in its own sequence. Packed documents reuse
them unchanged: a token's position in its document (its position minus its document's
start) is what the grid reads, and a query sees only keys of its own document
(``documents`` says how a packed row is laid out). When every document starts at a multiple
of K, a document's chunks lie inside the row's chunks: its grid is the row's grid plus its
first token as a chunk of its own, so blocks placed by ``block_start`` still hold whole
chunks and every fast path keeps its layout.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np


def _traced(*values) -> bool:
    return any(isinstance(v, jax.Array) for v in values)


def _where(cond, a, b):
    """``np.where`` on host values, ``jnp.where`` on traced ones (Python ints as int32: Triton's
    lowering takes a select of two weakly typed constants for a boolean)."""
    if not _traced(cond, a, b):
        return np.where(cond, a, b)
    as_int32 = lambda v: jnp.int32(v) if isinstance(v, int) else v
    return jnp.where(cond, as_int32(a), as_int32(b))


def _maximum(a, b):
    return jnp.maximum(a, b) if _traced(a, b) else np.maximum(a, b)


def _div(a, k: int):
    """``a // k`` for ``a >= 0``: truncating division in kernels (no floor fix-ups)."""
    return jax.lax.div(jnp.asarray(a, jnp.int32), jnp.int32(k)) if _traced(a) else np.asarray(a) // k


def layer_offset(layer: int, token_chunk: int, n_layers: int) -> int:
    """The cyclic grid offset of ``layer``: ``min(K-1, layer * (K // N_L))`` (SPEC §3.1)."""
    if not 0 <= layer < n_layers:
        raise ValueError(f"layer must be in [0, {n_layers}), got {layer}")
    return min(token_chunk - 1, layer * (token_chunk // n_layers))


@dataclasses.dataclass(frozen=True)
class ChunkGrid:
    """The fixed boundary grid of one layer (hashable: kernels specialise on it).

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
            raise ValueError(f"offset must be in [0, token_chunk={self.token_chunk}), got {self.offset}")

    @classmethod
    def for_layer(cls, layer: int, token_chunk: int, n_layers: int) -> ChunkGrid:
        return cls(token_chunk, layer_offset(layer, token_chunk, n_layers))

    @property
    def first(self) -> int:
        """f = K-1-o: the first grid boundary (0 when o = K-1, where it coincides with token 0)."""
        return self.token_chunk - 1 - self.offset

    # --- chunks ----------------------------------------------------------------------------

    def chunk_id(self, pos):
        """A chunk index, equal for two positions iff they share a chunk.

        Token 0 is chunk 0 and position ``t >= 1`` is chunk ``(t + o) // K + 1`` (ids increase
        and skip 1 when the chunk ``[1, f]`` is empty). Positions below 0 (a kernel's front
        padding) are chunks of their own, numbered by their (negative) position.
        """
        return _where(pos <= 0, pos, _div(_maximum(pos, 0) + self.offset, self.token_chunk) + 1)

    def chunk_start(self, pos):
        """The first position of the chunk of ``pos >= 0``."""
        start = _maximum(_div(pos + self.offset, self.token_chunk) * self.token_chunk - self.offset, 1)
        return _where(pos == 0, 0, start)

    def position_in_chunk(self, pos):
        """Distance of ``pos >= 0`` from its chunk's first token: 0 at every chunk start."""
        return pos - self.chunk_start(pos)

    def is_chunk_start(self, pos):
        """True where the SSM state and conv history restart before ``pos >= 0``."""
        return self.position_in_chunk(pos) == 0

    def is_boundary(self, pos):
        """True where a chunk ends at ``pos >= 0``: its output is a boundary key."""
        return self.is_chunk_start(pos + 1)

    def chunk_start_in_document(self, pos, start):
        """The first position of the chunk of ``pos`` in its document, which starts at ``start <= pos``:
        where the SSM state and the conv history last restarted before ``pos`` (absolute positions)."""
        return start + self.chunk_start(pos - start)

    # --- boundaries by index (arrival order) -------------------------------------------------

    def count_before(self, pos):
        """``#{b ∈ B : b < pos}`` for any ``pos`` (negative: 0): the index a boundary at ``pos`` takes."""
        k, f = self.token_chunk, self.first
        on_grid = _div(_maximum(pos - f, 0) + (k - 1), k)  # grid points f + jK < pos
        return on_grid + _where(pos > 0, 1, 0) if f != 0 else on_grid  # token 0 apart from the grid

    def position(self, n):
        """Position of the ``n``-th boundary (``n >= 0``; past the last one it keeps counting)."""
        k, f = self.token_chunk, self.first
        return n * k if f == 0 else _where(n == 0, 0, f + (n - 1) * k)

    def capacity(self, length: int) -> int:
        """An upper bound on the boundaries of ``length`` tokens, whatever the offset (a cache's size)."""
        return math.ceil(length / self.token_chunk) + 1

    def num_boundaries(self, length: int) -> int:
        return int(self.count_before(length))

    def boundaries(self, length: int) -> np.ndarray:
        """The sorted boundary positions ``< length`` (int32)."""
        return np.asarray(self.position(np.arange(self.num_boundaries(length))), np.int32)

    # --- blocks that no chunk straddles -------------------------------------------------------

    def block_start(self, m, size: int):
        """First position of block ``m`` of ``size`` tokens (a multiple of K) placed so that every
        chunk lies inside one block: blocks start at ``m * size - o`` (block 0 before token 0)."""
        if size % self.token_chunk:
            raise ValueError(f"block size {size} is not a multiple of token_chunk={self.token_chunk}")
        return m * size - self.offset

    def num_blocks(self, length: int, size: int) -> int:
        """Blocks of ``block_start`` that cover ``length`` tokens."""
        return -(-(length + self.offset) // size)

    def chunk_layout(self, length: int) -> ChunkLayout:
        return ChunkLayout(self, length)


@dataclasses.dataclass(frozen=True)
class ChunkLayout:
    """Places a length-T sequence into independent, equally sized chunks of K slots.

    Slot layout (u = slot index on the padded axis, chunk c = u // K):
      chunk 0:   [token 0, pad × (K-1)]
      chunk 1:   [pad × (o+1), tokens 1 .. f]
      chunk 2..: tokens in order, K per chunk, the last one padded at the end.
    Every real chunk of the grid occupies exactly one slot-chunk, and padding only ever
    precedes a chunk's first token or follows the sequence's last, so a causal per-chunk
    computation on zero-padded inputs gives the chunk-reset result at every real token.
    """

    grid: ChunkGrid
    length: int

    @property
    def lead(self) -> int:
        """Slots before token 1: chunk 0 plus the o+1 pads that open chunk 1."""
        return self.grid.token_chunk + self.grid.offset + 1

    @property
    def num_chunks(self) -> int:
        return max(1, -(-(self.lead + self.length - 1) // self.grid.token_chunk))

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
