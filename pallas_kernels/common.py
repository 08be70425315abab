"""Helpers every kernel uses: matmuls, launch parameters, tile padding, the boundary gather."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.chunk_grid import ChunkGrid


def matmul_precision(dtype) -> jax.lax.Precision | None:
    """Exact float32 matmuls for float32 inputs; the tensor cores' native precision otherwise."""
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def dot(a, b, precision, trans_a: bool = False, trans_b: bool = False) -> jax.Array:
    """2-D matmul with float32 accumulation; transposes folded into the dot (no relayout)."""
    dims = ((0,) if trans_a else (1,)), ((1,) if trans_b else (0,))
    return jax.lax.dot_general(a, b, (dims, ((), ())), precision=precision, preferred_element_type=jnp.float32)


def iota(n: int) -> jax.Array:
    """[n] int32 positions 0..n-1 inside a kernel."""
    return jax.lax.broadcasted_iota(jnp.int32, (n,), 0)


def index(i: int) -> jax.Array:
    """A static index as an int32 scalar: Triton takes one indexer kind per load, and the
    interpreter's load rule wants arrays."""
    return jnp.asarray(i, jnp.int32)


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def pad_last(a: jax.Array, size: int) -> jax.Array:
    """Zero-pads the last axis to ``size`` (Triton tiles need power-of-two sizes >= 16)."""
    extra = size - a.shape[-1]
    return a if extra == 0 else jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, extra)])


def triton_params(num_warps: int, num_stages: int):
    return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def mosaic_params(dimension_semantics: tuple[str, ...]):
    return pltpu.CompilerParams(dimension_semantics=dimension_semantics)


def tpu_interpret_params():
    """The TPU interpreter's settings for CPU runs: buffers start as NaN, so an unwritten output shows."""
    return pltpu.InterpretParams(uninitialized_memory="nan")


def boundary_positions(grid: ChunkGrid, length: int) -> jax.Array:
    """[NB] int32: the boundaries of ``length`` tokens, in arrival order."""
    return jnp.asarray(grid.boundaries(length))


def gather_boundaries(grid: ChunkGrid, *arrays: jax.Array) -> tuple[jax.Array, ...]:
    """[B, T, ...] -> [B, NB, ...]: each array at the boundary positions of its length."""
    bpos = boundary_positions(grid, arrays[0].shape[1])
    return tuple(a[:, bpos] for a in arrays)


def add_at_boundaries(grid: ChunkGrid, dense: jax.Array, at_boundaries: jax.Array) -> jax.Array:
    """The transpose of ``gather_boundaries``: ``dense`` [B, T, ...] plus ``at_boundaries``
    [B, NB, ...] added at the boundary positions (a gradient's two parts, folded together)."""
    return dense.at[:, boundary_positions(grid, dense.shape[1])].add(at_boundaries.astype(dense.dtype))
