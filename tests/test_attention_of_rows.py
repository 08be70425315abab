"""Boundary + window attention of rows that are slices of longer sequences (a context shard's
pieces, ``boundary_window_attention_of_rows``): cut from whole rows, with their boundary and
document-first keys gathered from the whole rows, every implementation equals the dense reference
of the whole rows, forward and gradient, in float32 and bfloat16, for packed documents crossing
the slices, GQA, grid offsets and windows longer than K; the kernel writes every element."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.boundary_window_attention import (
    boundary_window_attention_of_rows,
    pallas_gpu,
    pallas_tpu,
    reference,
)
from pallas_kernels.boundary_window_attention.block_sizes import GpuBlocks, TpuBlocks
from pallas_kernels.boundary_window_attention.xla import window_block_size
from pallas_kernels.chunk_grid import ChunkGrid
from pallas_kernels.common import gather_boundaries, tpu_interpret_params
from pallas_kernels.documents import at_document_start
from tests.helpers import assert_close, grads_of, lower_for, packed_layout, value_and_grads

SMALL = GpuBlocks(block_q=16, block_kb=16, block_kw=16, block_q_bwd=16, block_kb_bwd=16, block_kw_bwd=16)
IMPLEMENTATIONS = {
    "compressed": functools.partial(boundary_window_attention_of_rows, implementation="compressed"),
    "pallas_gpu_interpret": functools.partial(boundary_window_attention_of_rows, implementation="pallas_gpu_interpret"),
    # Small tiles: a piece spans several query and key blocks; poisoned outputs show any unwritten element.
    "pallas_gpu_small": lambda *a, **kw: pallas_gpu.attention_of_rows_pallas_gpu(
        *a, **kw, interpret=True, blocks=SMALL, poison=True
    ),
    "pallas_tpu_interpret": functools.partial(boundary_window_attention_of_rows, implementation="pallas_tpu_interpret"),
    # (the TPU interpreter starts every buffer as NaN: an unwritten element shows)
    "pallas_tpu_small": lambda *a, **kw: pallas_tpu.attention_of_rows_pallas_tpu(
        *a, **kw, interpret=tpu_interpret_params(), blocks=TpuBlocks(block_q=16, block_k=8)
    ),
}


def _slices(q, k, v, starts, grid: ChunkGrid, window: int, pieces: int, lead: int):
    """Whole rows [B, L] -> their ``pieces`` slices as rows [pieces·B, L/pieces] (row p·B + b is
    slice p of row b), with the keys each needs from outside it, and the slices' offsets."""
    b, length = q.shape[:2]
    p = length // pieces
    kb, vb = gather_boundaries(grid, k, v)
    kd, vd = at_document_start(k, starts), at_document_start(v, starts)
    # Positions below 0 are never seen: they hold the rows' ends, as a context shard's first piece
    # has them, so a gradient that leaked there would show.
    front = lambda a: jnp.concatenate([a[:, length - lead :], a], axis=1)
    cut = lambda a, i, n, lo=0: a[:, lo + i * p : lo + i * p + n]
    stack = lambda parts: jnp.concatenate(parts, axis=0)
    rows_q = stack([cut(q, i, p) for i in range(pieces)])
    rows_k, rows_v = (stack([cut(front(a), i, lead + p) for i in range(pieces)]) for a in (k, v))
    rows_kd, rows_vd = (stack([cut(a, i, p) for i in range(pieces)]) for a in (kd, vd))
    rows_st = stack([cut(starts, i, p) for i in range(pieces)])
    boundaries = (jnp.tile(kb, (pieces, 1, 1, 1)), jnp.tile(vb, (pieces, 1, 1, 1)))
    offsets = jnp.repeat(jnp.arange(pieces, dtype=jnp.int32) * p, b)
    return rows_q, rows_k, rows_v, boundaries, (rows_kd, rows_vd, rows_st), offsets


def _joined(rows, pieces):
    """[pieces·B, P, ...] -> [B, pieces·P, ...]."""
    return jnp.concatenate(jnp.split(rows, pieces, axis=0), axis=1)


# (K, offset, W, L, pieces, H, Hkv): windows shorter and longer than K and than the kernel's tiles,
# a grid offset with f > 0 and one with f = 0 (o = K-1), GQA 2 and 1.
CASES = [
    (4, 1, 6, 96, 3, 4, 2),
    (8, 7, 20, 128, 4, 2, 1),
    (8, 3, 3, 96, 2, 2, 2),
]


@functools.cache
def _case(k, offset, window, length, h, hkv, dtype_name, seed=0, d=16):
    grid = ChunkGrid(k, offset)
    ks = jax.random.split(jax.random.key(seed + length), 4)
    dtype = jnp.dtype(dtype_name)
    q = jax.random.normal(ks[0], (2, length, h, d)).astype(dtype)
    kk = jax.random.normal(ks[1], (2, length, hkv, d)).astype(dtype)
    v = jax.random.normal(ks[2], (2, length, hkv, d)).astype(dtype)
    cot = jax.random.normal(ks[3], (2, length, h, d))
    starts, _ = packed_layout(seed + k, 2, length, k, window)  # documents at multiples of K, crossing slices
    starts = jnp.asarray(starts)
    dense = lambda *a: reference.attention_dense(*a, grid=grid, window=window, document_start=starts)
    return grid, (q, kk, v), starts, cot, value_and_grads(dense, (q, kk, v), cot)


# The XLA path and the GPU kernel at small tiles on every case; the public entry's kernels (default
# tiles: one block per slice) on one.
# (The TPU interpreter is the slowest: its kernel at small tiles on the case with f = 0 and a window
# longer than its tiles.)
RUNS = [(name, c, "float32", 1e-5) for c in CASES for name in ("compressed", "pallas_gpu_small")]
RUNS += [("pallas_tpu_small", CASES[1], "float32", 1e-5)]
RUNS += [(name, CASES[0], "bfloat16", 2e-2) for name in ("compressed", "pallas_gpu_small")]
RUNS += [(name, CASES[0], "float32", 1e-5) for name in ("pallas_gpu_interpret", "pallas_tpu_interpret")]


@pytest.mark.parametrize("name, case, dtype_name, tol", RUNS)
def test_attention_of_slices_equals_the_whole_rows(name, case, dtype_name, tol):
    # Given whole packed rows and the dense reference of the whole rows
    k, offset, window, length, pieces, h, hkv = case
    grid, args, starts, cot, (o_ref, grads_ref) = _case(k, offset, window, length, h, hkv, dtype_name)
    lead = window_block_size(window)

    # When the rows are cut into slices, each with the keys it needs from outside, and attend
    def sliced(q, kk, v):
        rq, rk, rv, boundaries, documents, offsets = _slices(q, kk, v, starts, grid, window, pieces, lead)
        out = IMPLEMENTATIONS[name](rq, rk, rv, boundaries, documents, grid=grid, window=window, row_offset=offsets)
        return _joined(out, pieces)

    o, grads = value_and_grads(sliced, args, cot)
    # Then the slices' outputs are the whole rows', and so are the gradients through every key given
    assert o.dtype == args[0].dtype
    assert_close(o, o_ref, tol)
    assert_close(grads, grads_ref, tol)


def test_bad_rows_are_refused_naming_the_shapes():
    grid, (q, kk, v), starts, _, _ = _case(*CASES[0][:4], *CASES[0][5:], "float32")
    rq, rk, rv, boundaries, documents, offsets = _slices(q, kk, v, starts, grid, 6, 3, 8)
    with pytest.raises(ValueError, match="k and v need"):
        boundary_window_attention_of_rows(
            rq, rk[:, 4:], rv[:, 4:], boundaries, documents, grid=grid, window=6, row_offset=offsets
        )
    with pytest.raises(ValueError, match="unknown implementation 'dense'"):
        boundary_window_attention_of_rows(
            rq, rk, rv, boundaries, documents, grid=grid, window=6, row_offset=offsets, implementation="dense"
        )
    np.testing.assert_array_equal(offsets, np.repeat([0, 32, 64], 2))


def _paper_rows(dtype, length=640, pieces=4, seed=3):
    """The paper's heads (8 of 64, GQA 8/2), K = 8 with an offset, W = 8: slices of packed rows."""
    grid, args, starts, cot, ref = _case(8, 5, 8, length, 8, 2, jnp.dtype(dtype).name, seed, d=64)
    return grid, args, starts, cot, ref, pieces


def test_kernel_of_rows_lowers_through_triton():
    # Given slices of packed rows of the paper's shape
    grid, (q, kk, v), starts, _, _, pieces = _paper_rows(jnp.bfloat16)
    rows = _slices(q, kk, v, starts, grid, 8, pieces, 8)

    def kernel(rq, rk, rv, kb, vb, kd, vd):
        boundaries, documents = (kb, vb), (kd, vd, rows[4][2])
        return pallas_gpu.attention_of_rows_pallas_gpu(
            rq, rk, rv, boundaries, documents, grid=grid, window=8, row_offset=rows[5], poison=True
        )

    # When its forward and backward lower for a GPU: four Triton kernels, every output poisoned
    text = lower_for("cuda", grads_of(kernel), *rows[:3], *rows[3], *rows[4][:2])
    assert text.count("__gpu$xla.gpu.triton") == 4
    assert text.count("output_operand_alias<") == 9


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_tpu_kernel_of_rows_lowers_through_mosaic(dtype):
    # Given slices of packed rows of the paper's shape, at the TPU kernel's default tiles
    grid, (q, kk, v), starts, _, _, pieces = _paper_rows(dtype)
    rows = _slices(q, kk, v, starts, grid, 8, pieces, 8)

    def kernel(rq, rk, rv, kb, vb, kd, vd):
        boundaries, documents = (kb, vb), (kd, vd, rows[4][2])
        return pallas_tpu.attention_of_rows_pallas_tpu(
            rq, rk, rv, boundaries, documents, grid=grid, window=8, row_offset=rows[5]
        )

    # Then its forward and backward lower through Mosaic: the forward, dq and dk/dv kernels
    text = lower_for("tpu", grads_of(kernel), *rows[:3], *rows[3], *rows[4][:2])
    assert text.count("tpu_custom_call") >= 3


@pytest.mark.gpu
@pytest.mark.parametrize("dtype_name, tol", [("float32", 1e-5), ("bfloat16", 1e-2)])
def test_kernel_of_rows_on_the_device_equals_the_whole_rows(on_gpu, dtype_name, tol):
    # Given slices of packed rows on the GPU and the dense reference of the whole rows computed there
    grid, args, starts, cot, (o_ref, grads_ref), pieces = _paper_rows(dtype_name, length=2048, pieces=4)

    # When the compiled kernel runs on the slices forward and backward at its default tiles, outputs poisoned
    def sliced(q, kk, v):
        rq, rk, rv, boundaries, documents, offsets = _slices(q, kk, v, starts, grid, 8, pieces, 8)
        out = pallas_gpu.attention_of_rows_pallas_gpu(
            rq, rk, rv, boundaries, documents, grid=grid, window=8, row_offset=offsets, poison=True
        )
        return _joined(out, pieces)

    o, grads = value_and_grads(sliced, args, cot)
    # Then it gives the whole rows' outputs and gradients, every element written
    assert_close(o, o_ref, tol)
    assert_close(grads, grads_ref, tol)
