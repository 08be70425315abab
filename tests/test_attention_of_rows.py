"""Boundary + window attention of rows that are slices of longer sequences (a context shard's
pieces, ``boundary_window_attention_of_rows``): cut from whole rows, with their boundary and
document-first keys gathered from the whole rows, every implementation equals the dense reference
of the whole rows, forward and gradient, in float32 and bfloat16, for packed documents crossing
the slices, GQA, grid offsets and windows longer than K; the kernel writes every element."""

import dataclasses
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
from pallas_kernels.visibility import Visibility
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


@pytest.mark.parametrize("k, offset, window, length, pieces", [(4, 1, 6, 96, 3), (8, 7, 20, 256, 4), (8, 3, 3, 160, 2)])
def test_tpu_kernel_of_rows_computes_every_visible_block_and_no_masked_one(k, offset, window, length, pieces):
    # Given the TPU kernel's static tables for slices of one document (the whole row's boundaries
    # given) and, for each slice, its dense mask laid out like the stacked keys
    grid, vis = ChunkGrid(k, offset), Visibility(ChunkGrid(k, offset), window)
    p, lead, blocks = length // pieces, window_block_size(window), TpuBlocks(block_q=16, block_k=8)
    static = pallas_tpu.make_static(jnp.zeros((1, p, 1, 16)), grid, window, blocks, documents=True)
    st = dataclasses.replace(static, num_boundaries=grid.num_boundaries(length), rows=True, key_lead=lead)
    table, count = pallas_tpu.query_tables(st)
    ktable, kcount = pallas_tpu.key_tables(st)
    bq, bk = st.block_q, st.block_k
    bpos = grid.boundaries(length)
    for off in range(0, length, p):
        tq = off + np.arange(p)[:, None]
        stacked = np.zeros((st.q_padded, st.kb_padded + st.k_padded), bool)
        stacked[:p, : len(bpos)] = vis.before_window(tq, bpos[None, :], 0)  # one document from 0: not token 0
        s = off - lead + np.arange(st.keys)[None, :]
        stacked[:p, st.kb_padded : st.kb_padded + st.keys] = vis.window_visible(tq, s, 0)
        needed = stacked.reshape(st.q_padded // bq, bq, -1, bk).any(axis=(1, 3))  # [query block, key block]
        # When the index maps choose, per step, the block to fetch and whether to compute it
        ran = np.zeros_like(needed)
        for i in range(table.shape[0]):
            for j in range(count[i]):
                entry = int(table[i, j])
                if int(pallas_tpu._document_key_block(st, jnp.int32(entry), i, jnp.int32(0), jnp.int32(off))) == entry:
                    ran[i, entry] = True
        # Then the forward and dq compute exactly the key blocks holding a visible key
        np.testing.assert_array_equal(ran, needed, err_msg=f"slice at {off}")
        ran_t = np.zeros_like(needed.T)
        ends = pallas_tpu._query_ends(st, (jnp.zeros((1, p), jnp.int32), jnp.asarray([off], jnp.int32)))[0]
        for c in range(ktable.shape[0]):
            begin, end = (int(v) for v in pallas_tpu._query_span(st, jnp.int32(c), ends[c], jnp.int32(off)))
            for step in range(kcount[c]):
                if begin <= ktable[c, step] < end:
                    ran_t[c, ktable[c, step]] = True
        # and the dk/dv pass the query blocks that see each key block
        np.testing.assert_array_equal(ran_t, needed.T, err_msg=f"slice at {off}")


@pytest.mark.parametrize(
    "k, offset, window, length, pieces", [(4, 1, 6, 96, 3), (8, 7, 20, 256, 4), (8, 3, 8, 3000, 4)]
)
def test_gpu_walk_of_rows_visits_every_visible_block_and_no_masked_one(k, offset, window, length, pieces):
    # Given slices of one document, the whole row's boundaries given, and each slice's two parts of the mask
    grid, vis = ChunkGrid(k, offset), Visibility(ChunkGrid(k, offset), window)
    p, lead = length // pieces, window_block_size(window)
    blocks = SMALL if length < 1000 else GpuBlocks()
    static = pallas_gpu.make_static(jnp.zeros((1, p, 1, 16)), grid, window, blocks, documents=True)
    st = dataclasses.replace(static, num_boundaries=grid.num_boundaries(length), rows=True, key_lead=lead)
    bpos = grid.boundaries(length)
    bq, bkb, bkw = blocks.block_q, blocks.block_kb, blocks.block_kw
    for off in range(0, length, p):
        tq = off + np.arange(p)[:, None]
        boundary_part = vis.before_window(tq, bpos[None, :], 0)  # [P, NB] (one document from 0)
        keys = off - lead + np.arange(lead + p)[None, :]  # the slice's key rows' positions
        window_part = vis.window_visible(tq, keys, 0)  # [P, lead + P]
        for q0 in range(0, p, bq):
            # When the forward / dq walk of one query block is laid out
            walk = pallas_gpu.document_key_blocks(st, jnp.int32(off + q0), jnp.int32(0), jnp.bool_(False), off)
            a, u0, u1, end, s0, window_blocks = (int(v) for v in walk)
            sees_b, sees_w = boundary_part[q0 : q0 + bq], window_part[q0 : q0 + bq]
            visited_b = np.zeros(len(bpos), bool)
            visited_b[a * bkb : end * bkb] = True
            row0 = s0 - off + lead  # the walk's first key row
            visited_w = np.zeros(lead + p, bool)
            visited_w[row0 : row0 + window_blocks * bkw] = True
            # Then every visible key lies in a visited block, the unmasked blocks are visible to every
            # query of the block, and every visited block holds a key some query sees
            assert not (sees_b.any(axis=0) & ~visited_b).any(), (off, q0)
            assert not (sees_w.any(axis=0) & ~visited_w).any(), (off, q0)
            assert sees_b[:, u0 * bkb : u1 * bkb].all(), (off, q0)
            for j in range(a, end):
                assert sees_b[:, j * bkb : (j + 1) * bkb].any(), (off, q0, "boundary block", j)
            for j in range(window_blocks):
                assert sees_w[:, row0 + j * bkw : row0 + (j + 1) * bkw].any(), (off, q0, "window block", j)
