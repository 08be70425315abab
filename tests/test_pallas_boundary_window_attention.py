"""The boundary + window attention Pallas kernels (GPU/Triton and TPU/Mosaic, run in the Pallas interpreter)
against the dense masked reference: forward and gradients, float32 and bfloat16, GQA, offsets,
windows, lengths that are no multiple of the blocks, every output written, no masked block visited."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.boundary_window_attention import boundary_window_attention, pallas_gpu, pallas_tpu, reference
from pallas_kernels.boundary_window_attention.block_sizes import GpuBlocks, TpuBlocks
from pallas_kernels.chunk_grid import ChunkGrid
from pallas_kernels.common import tpu_interpret_params
from pallas_kernels.visibility import Visibility
from tests.helpers import (
    FAST_COMPILE,
    assert_close,
    assert_documents_independent,
    assert_packed_equals_alone,
    grads_of,
    lower_for,
    packed_layout,
    value_and_grads,
)

# Small tiles so that a few dozen tokens span several query and key blocks.
GPU_BLOCKS = GpuBlocks(block_q=16, block_kb=16, block_kw=16, block_q_bwd=16, block_kb_bwd=16, block_kw_bwd=16)
TPU_BLOCKS = TpuBlocks(block_q=16, block_k=8)
# The interpreters start every output buffer as NaN (tests/test_pallas_ssd.py checks this),
# so a finite result proves that every element was written.
KERNELS = {
    "gpu": lambda q, k, v, grid, window, **kw: pallas_gpu.attention_pallas_gpu(
        q, k, v, grid=grid, window=window, interpret=True, blocks=kw.pop("blocks", GPU_BLOCKS), **kw
    ),
    "tpu": lambda q, k, v, grid, window, **kw: pallas_tpu.attention_pallas_tpu(
        q, k, v, grid=grid, window=window, interpret=tpu_interpret_params(), blocks=kw.pop("blocks", TPU_BLOCKS), **kw
    ),
}


@functools.cache
def _case(k, offset, window, t, h, hkv, dtype_name, seed, d=16):
    """Inputs and the dense reference's output and gradients, shared by both kernels."""
    grid = ChunkGrid(k, offset)
    ks = jax.random.split(jax.random.key(seed), 4)
    dtype = jnp.dtype(dtype_name)
    q = jax.random.normal(ks[0], (2, t, h, d)).astype(dtype)
    kk = jax.random.normal(ks[1], (2, t, hkv, d)).astype(dtype)
    v = jax.random.normal(ks[2], (2, t, hkv, d)).astype(dtype)
    cot = jax.random.normal(ks[3], (2, t, h, d))
    ref = value_and_grads(lambda *a: reference.attention_dense(*a, grid=grid, window=window), (q, kk, v), cot)
    return grid, (q, kk, v), cot, ref


# (K, offset, W, T, H, Hkv): several K (one not a power of two) and offsets, windows 0, < block
# and > block, GQA ratios 1, 3 and 2, lengths no multiple of 16 and one shorter than a block (the
# bf16 case adds W = 8, offset 7, ratio 2).
CASES = [
    (8, 3, 2, 61, 2, 2),
    (4, 0, 0, 33, 3, 1),
    (16, 5, 20, 70, 2, 1),
    (6, 4, 3, 13, 2, 2),
]


@pytest.mark.parametrize("kernel", sorted(KERNELS))
@pytest.mark.parametrize("k, offset, window, t, h, hkv", CASES)
def test_kernel_matches_reference_f32(kernel, k, offset, window, t, h, hkv):
    # Given random float32 q, k, v and the dense masked reference
    grid, args, cot, (o_ref, grads_ref) = _case(k, offset, window, t, h, hkv, "float32", 10 * k + offset)
    # When the kernel runs forward and backward
    o, grads = value_and_grads(functools.partial(KERNELS[kernel], grid=grid, window=window), args, cot)
    # Then it agrees to float32 accuracy and every element is written
    assert_close(o, o_ref, 1e-5)
    assert_close(grads, grads_ref, 1e-5)


@pytest.mark.parametrize("kernel", sorted(KERNELS))
def test_kernel_matches_reference_bf16(kernel):
    grid, args, cot, (o_ref, grads_ref) = _case(8, 7, 8, 45, 4, 2, "bfloat16", 3)
    o, grads = value_and_grads(functools.partial(KERNELS[kernel], grid=grid, window=8), args, cot)
    assert o.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in grads)
    assert_close(o, o_ref, 1e-2)
    assert_close(grads, grads_ref, 1e-2)


@pytest.mark.parametrize("splits", [2, 3])
def test_gpu_boundary_dkv_split_into_query_shares(splits):
    # Given the boundary dk/dv pass cut into shares of the query walk (some shares empty)
    blocks = dataclasses.replace(GPU_BLOCKS, dkv_query_splits=splits)
    grid, args, cot, (o_ref, grads_ref) = _case(8, 3, 2, 61, 2, 2, "float32", 83)
    kernel = lambda q, k, v: pallas_gpu.attention_pallas_gpu(
        q, k, v, grid=grid, window=2, interpret=True, blocks=blocks
    )
    # When the kernel runs forward and backward
    o, grads = value_and_grads(kernel, args, cot)
    # Then the shares add up to the reference's gradients
    assert_close(o, o_ref, 1e-5)
    assert_close(grads, grads_ref, 1e-5)


@pytest.mark.parametrize("splits", [1, 3])
def test_gpu_kernels_overwrite_nan_buffers(splits):
    # Given every kernel output, forward and backward, aliased to a NaN-filled buffer (3 shares of
    # the boundary dk/dv pass: some of them empty)
    blocks = dataclasses.replace(GPU_BLOCKS, dkv_query_splits=splits)
    grid, args, cot, (o_ref, grads_ref) = _case(4, 0, 8, 50, 2, 1, "float32", 40)
    kernel = lambda q, k, v: pallas_gpu.attention_pallas_gpu(
        q, k, v, grid=grid, window=8, interpret=True, blocks=blocks, poison=True
    )
    # When the kernels write into them
    o, grads = value_and_grads(kernel, args, cot)
    # Then nothing is left unwritten and the values are right
    assert_close(o, o_ref, 1e-5)
    assert_close(grads, grads_ref, 1e-5)


def test_tpu_kernel_at_its_default_tiles():
    # Given the TPU kernel's own 128-row tiles: 150 tokens span two query and two key blocks
    grid, args, cot, (o_ref, grads_ref) = _case(8, 5, 8, 150, 4, 2, "float32", 77)
    kernel = lambda q, k, v: pallas_tpu.attention_pallas_tpu(
        q, k, v, grid=grid, window=8, interpret=tpu_interpret_params()
    )
    # When it runs forward and backward
    o, grads = value_and_grads(kernel, args, cot)
    # Then it agrees with the dense reference
    assert_close(o, o_ref, 1e-5)
    assert_close(grads, grads_ref, 1e-5)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_tpu_kernel_lowers_through_mosaic(dtype):
    # Given the paper's attention shape (8 query heads of 64, GQA with 2 kv heads here), K = 8, W = 8
    ks = jax.random.split(jax.random.key(5), 3)
    q = jax.random.normal(ks[0], (2, 300, 8, 64)).astype(dtype)
    k, v = (jax.random.normal(kk, (2, 300, 2, 64)).astype(dtype) for kk in ks[1:])
    kernel = lambda q, k, v: pallas_tpu.attention_pallas_tpu(q, k, v, grid=ChunkGrid(8, 5), window=8)
    # When the forward and backward are lowered for a TPU
    text = lower_for("tpu", grads_of(kernel), q, k, v)
    # Then Pallas put the forward, dq and dk/dv kernels in Mosaic's format
    assert text.count("tpu_custom_call") >= 3


@pytest.mark.parametrize("poison, aliases", [(False, 0), (True, 7)])
def test_gpu_kernels_lower_through_triton(poison, aliases):
    # Given the paper's attention shape in bf16 (GQA 8/2), K = 8, W = 8, the tuned tiles
    ks = jax.random.split(jax.random.key(6), 3)
    q = jax.random.normal(ks[0], (2, 300, 8, 64)).astype(jnp.bfloat16)
    k, v = (jax.random.normal(kk, (2, 300, 2, 64)).astype(jnp.bfloat16) for kk in ks[1:])
    kernel = lambda q, k, v: pallas_gpu.attention_pallas_gpu(q, k, v, grid=ChunkGrid(8, 5), window=8, poison=poison)
    # When the forward and backward are lowered for a GPU
    text = lower_for("cuda", grads_of(kernel), q, k, v)
    # Then the forward, dq and both dk/dv kernels are Triton calls, and poisoning aliases every
    # output (o and lse; dq; boundary dk, dv; window dk, dv)
    assert text.count("__gpu$xla.gpu.triton") == 4
    assert text.count("output_operand_alias<") == aliases


@pytest.mark.parametrize("k, offset, window, t", [(4, 0, 8, 100), (8, 5, 3, 77), (16, 9, 40, 130), (4, 3, 0, 64)])
def test_tpu_tables_visit_every_visible_block_and_no_masked_one(k, offset, window, t):
    # Given the TPU kernel's block tables and the dense mask laid out like its stacked keys
    grid = ChunkGrid(k, offset)
    st = pallas_tpu.make_static(jnp.zeros((1, t, 1, 16)), grid, window, TPU_BLOCKS)
    tq, s = np.arange(t)[:, None], np.arange(t)[None, :]
    bpos = grid.boundaries(t)
    boundary_part = bpos[None, :] < tq - window  # [T, NB]: boundaries before the window
    window_part = (s <= tq) & (s >= tq - window)  # [T, T]
    both = window_part.copy()
    both[:, bpos] |= boundary_part
    np.testing.assert_array_equal(both, Visibility(grid, window).dense(t))  # the two parts are the mask
    stacked = np.zeros((st.q_padded, st.kb_padded + st.k_padded), bool)
    stacked[:t, : len(bpos)] = boundary_part
    stacked[:t, st.kb_padded : st.kb_padded + t] = window_part
    bq, bk = st.block_q, st.block_k
    blocks = stacked.reshape(st.q_padded // bq, bq, -1, bk).any(axis=(1, 3))  # [query block, key block]
    # Then the query tables list exactly the key blocks holding a visible key, and the key tables their transpose
    table, count = pallas_tpu.query_tables(st)
    listed = np.zeros_like(blocks)
    for i, (row, n) in enumerate(zip(table, count)):
        listed[i, row[:n]] = True
    np.testing.assert_array_equal(listed, blocks)
    ktable, kcount = pallas_tpu.key_tables(st)
    listed_t = np.zeros_like(blocks.T)
    for c, (row, n) in enumerate(zip(ktable, kcount)):
        listed_t[c, row[:n]] = True
    np.testing.assert_array_equal(listed_t, blocks.T)


@pytest.mark.parametrize(
    "k, offset, window, t, blocks",
    [
        (4, 0, 8, 100, GPU_BLOCKS),
        (8, 5, 3, 77, GPU_BLOCKS),
        (16, 9, 40, 130, GPU_BLOCKS),
        (6, 3, 0, 64, GPU_BLOCKS),
        (8, 3, 8, 1500, GpuBlocks()),
    ],
)
def test_gpu_walk_visits_every_visible_block_and_no_masked_one(k, offset, window, t, blocks):
    # Given the two parts of the mask: boundary keys before the window, and the window of raw keys
    grid = ChunkGrid(k, offset)
    st = pallas_gpu.make_static(jnp.zeros((1, t, 1, 16)), grid, window, blocks)
    tq = np.arange(t)[:, None]
    bpos = grid.boundaries(t)
    boundary_part = bpos[None, :] < tq - window  # [T, NB]
    window_part = (np.arange(t)[None, :] <= tq) & (np.arange(t)[None, :] >= tq - window)  # [T, T]
    bq, bkb, bkw = blocks.block_q, blocks.block_kb, blocks.block_kw
    for q0 in range(0, t, bq):
        # When the forward / dq walk of one query block is laid out
        full, boundary_end, s0, window_blocks = (int(v) for v in pallas_gpu.key_blocks(st, q0))
        sees_b, sees_w = boundary_part[q0 : q0 + bq], window_part[q0 : q0 + bq]
        visited_b = np.zeros(len(bpos), bool)
        visited_b[: boundary_end * bkb] = True
        visited_w = np.zeros(t, bool)
        visited_w[s0 : s0 + window_blocks * bkw] = True
        # Then every visible key lies in a visited block, the unmasked blocks are visible to every
        # query of the block, and every visited block holds a key some query sees
        assert not (sees_b.any(axis=0) & ~visited_b).any() and not (sees_w.any(axis=0) & ~visited_w).any()
        assert sees_b[:, : full * bkb].all()
        for j in range(boundary_end):
            assert sees_b[:, j * bkb : (j + 1) * bkb].any(), (q0, "boundary block", j)
        for j in range(window_blocks):
            assert sees_w[:, s0 + j * bkw : s0 + (j + 1) * bkw].any(), (q0, "window block", j)


@pytest.mark.parametrize("name", ["pallas_gpu_interpret", "pallas_tpu_interpret"])
def test_public_api_routes_to_the_kernels(name):
    grid, (q, k, v), _, (o_ref, _) = _case(8, 3, 2, 61, 2, 2, "float32", 83)
    fn = jax.jit(functools.partial(boundary_window_attention, grid=grid, window=2, implementation=name))
    assert_close(fn.lower(q, k, v).compile(FAST_COMPILE)(q, k, v), o_ref, 1e-5)


# --- packed documents ---------------------------------------------------------------------------


@functools.cache
def _documents_case(k, offset, window, t, h, hkv, dtype_name, seed, d=16):
    """A packed layout (documents at multiples of K, rows cut mid-document), inputs, and the dense
    reference's output and gradients under it."""
    grid, args, cot, _ = _case(k, offset, window, t, h, hkv, dtype_name, seed, d)
    starts, spans = packed_layout(seed, 2, t, k, window)
    dense = lambda *a: reference.attention_dense(*a, grid=grid, window=window, document_start=jnp.asarray(starts))
    return grid, starts, spans, args, cot, value_and_grads(dense, args, cot)


@pytest.mark.parametrize("kernel", sorted(KERNELS))
@pytest.mark.parametrize(
    "case, dtype_name, tol",
    [(CASES[0], "float32", 1e-5), (CASES[2], "float32", 1e-5), ((8, 7, 8, 45, 4, 2), "bfloat16", 1e-2)],
)
def test_kernel_with_documents_matches_reference(kernel, case, dtype_name, tol):
    # Given a packed batch and the dense reference reading each query's rule in its own document
    k, offset, window, t, h, hkv = case
    grid, starts, _, args, cot, (o_ref, grads_ref) = _documents_case(*case, dtype_name, 3 * k + offset)
    # When the kernel runs forward and backward with the layout
    fn = functools.partial(KERNELS[kernel], grid=grid, window=window, document_start=jnp.asarray(starts))
    o, grads = value_and_grads(fn, args, cot)
    # Then it agrees with the reference and every element is written
    assert o.dtype == args[0].dtype and all(g.dtype == args[0].dtype for g in grads)
    assert_close(o, o_ref, tol)
    assert_close(grads, grads_ref, tol)


# (K, offset, W, T, H, Hkv, blocks): documents shorter than a query block, windows larger than a
# document, GQA; the TPU kernel's own 128-row tiles and the GPU's default tiles with the boundary
# dk/dv walk cut into query shares.
PACKED = [
    (4, 0, 6, 48, 2, 2, None),
    (8, 5, 3, 64, 2, 1, None),
    (8, 7, 8, 150, 2, 1, "default"),
    (4, 1, 2, 70, 2, 1, "splits"),
]


def _blocks(kernel, blocks):
    if blocks is None:
        return GPU_BLOCKS if kernel == "gpu" else TPU_BLOCKS
    if kernel == "gpu":
        return dataclasses.replace(GPU_BLOCKS, dkv_query_splits=3) if blocks == "splits" else GpuBlocks()
    return None if blocks == "default" else TPU_BLOCKS


@pytest.mark.parametrize(
    "kernel, k, offset, window, t, h, hkv, blocks",
    # ("splits" cuts the GPU kernel's walk; on the TPU kernel it is the tiles of the first cases)
    [(kernel, *case) for case in PACKED for kernel in sorted(KERNELS) if (kernel, case[-1]) != ("tpu", "splits")],
)
def test_kernel_packed_equals_alone(kernel, k, offset, window, t, h, hkv, blocks):
    # Given a packed batch and each of its documents alone from position 0
    starts, spans = packed_layout(k + t, 2, t, k, window)
    _, (q, kk, v), _, _ = _case(k, offset, window, t, h, hkv, "float32", k + t)
    op = lambda q, k_, v, document_start: KERNELS[kernel](
        q,
        k_,
        v,
        grid=ChunkGrid(k, offset),
        window=window,
        document_start=document_start,
        blocks=_blocks(kernel, blocks),
    )
    # Then the packed run equals the runs alone, forward and gradient, and padding gets zero gradient
    assert_packed_equals_alone(op, [q, kk, v], [], starts, spans, 1e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("kernel", sorted(KERNELS))
def test_kernel_documents_are_independent(kernel, dtype):
    # Given a packed row of several documents, some of them sharing a query block and a key block
    grid = ChunkGrid(8, 5)
    starts, spans = packed_layout(4, 1, 64, 8, 3)
    assert len(spans) >= 3
    _, (q, kk, v), _, _ = _case(8, 5, 3, 64, 4, 2, jnp.dtype(dtype).name, 6)
    q, kk, v = q[:1], kk[:1], v[:1]
    fn = functools.partial(KERNELS[kernel], grid=grid, window=3, document_start=jnp.asarray(starts))
    # Then perturbing one document changes its outputs and no other output, bit for bit: key blocks
    # of other documents are masked out exactly (or never loaded)
    assert_documents_independent(jax.jit(fn), [q, kk, v], spans)


@pytest.mark.parametrize("k, offset, window, t, seed", [(4, 0, 8, 100, 1), (8, 5, 3, 160, 2), (16, 9, 40, 200, 3)])
def test_gpu_document_walk_visits_only_the_blocks_of_its_documents(k, offset, window, t, seed):
    # Given a packed row and the dense mask read in each query's document
    grid = ChunkGrid(k, offset)
    starts, _ = packed_layout(seed, 1, t, k, window, max_docs=8)
    start = starts[0]
    st = pallas_gpu.make_static(jnp.zeros((1, t, 1, 16)), grid, window, GPU_BLOCKS, documents=True)
    vis = Visibility(grid, window)
    tq = np.arange(t)[:, None]
    bpos = grid.boundaries(t)
    boundary_part = np.asarray(vis.boundary_visible(tq, np.arange(len(bpos))[None, :], start[:, None]))  # [T, NB]
    window_part = np.asarray(vis.window_visible(tq, np.arange(t)[None, :], start[:, None]))  # [T, T]
    first_token = (np.arange(t)[None, :] == start[:, None]) & np.asarray(vis.document_key_visible(tq, start[:, None]))
    bq, bkb, bkw = GPU_BLOCKS.block_q, GPU_BLOCKS.block_kb, GPU_BLOCKS.block_kw
    for q0 in range(0, t, bq):
        # When the forward / dq walk of one query block is laid out
        last = min(q0 + bq, t) - 1
        first, inner = int(start[q0]), bool(start[last] > q0)
        a, u0, u1, end, s0, window_blocks = (int(x) for x in pallas_gpu.document_key_blocks(st, q0, first, inner))
        rows = slice(q0, q0 + bq)
        # (the first token of the block's first document comes in on its own, outside the walk)
        sees_b = boundary_part[rows]
        sees_w = window_part[rows] | (first_token[rows] & (start[rows] > q0)[:, None])
        visited_b = np.zeros(len(bpos), bool)
        visited_b[a * bkb : end * bkb] = True
        visited_w = np.zeros(t, bool)
        visited_w[s0 : s0 + window_blocks * bkw] = True
        # Then every visible key lies in a visited block, the unmasked blocks are seen whole by
        # every query, and no visited boundary block lies wholly before the document's first boundary
        assert not (sees_b.any(axis=0) & ~visited_b).any(), q0
        assert not (sees_w.any(axis=0) & ~visited_w).any(), q0
        assert sees_b[:, u0 * bkb : u1 * bkb].all(), q0
        assert a * bkb + bkb > vis.first_boundary(first), q0
        assert s0 >= first, q0


def _packed_paper_shape(dtype):
    ks = jax.random.split(jax.random.key(7), 3)
    q = jax.random.normal(ks[0], (2, 300, 8, 64)).astype(dtype)
    k, v = (jax.random.normal(kk, (2, 300, 2, 64)).astype(dtype) for kk in ks[1:])
    return (q, k, v), jnp.asarray(packed_layout(7, 2, 300, 8, 8)[0])


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_tpu_kernel_with_documents_lowers_through_mosaic(dtype):
    args, starts = _packed_paper_shape(dtype)
    kernel = lambda q, k, v: pallas_tpu.attention_pallas_tpu(
        q, k, v, grid=ChunkGrid(8, 5), window=8, document_start=starts
    )
    assert lower_for("tpu", grads_of(kernel), *args).count("tpu_custom_call") >= 3


# Poisoned, every output aliases a NaN buffer: the 7 of plain rows plus the dq kernel's per query
# block first-token dk, dv sums.
@pytest.mark.parametrize("poison, aliases", [(False, 0), (True, 9)])
def test_gpu_kernels_with_documents_lower_through_triton(poison, aliases):
    args, starts = _packed_paper_shape(jnp.bfloat16)
    kernel = lambda q, k, v: pallas_gpu.attention_pallas_gpu(
        q, k, v, grid=ChunkGrid(8, 5), window=8, document_start=starts, poison=poison
    )
    text = lower_for("cuda", grads_of(kernel), *args)
    assert text.count("__gpu$xla.gpu.triton") == 4
    assert text.count("output_operand_alias<") == aliases


# --- on a GPU: the real kernels (``pytest -m gpu``) ------------------------------------------------

# The paper's heads (8 of 64, GQA 8/2 in one case), K = 8 and 4 with offsets, W <, = and > K,
# T no multiple of the tiles, long enough for the boundary dk/dv walk to split into shares.
GPU_CASES = [(8, 5, 8, 1500, 8, 8), (4, 0, 32, 700, 8, 2), (16, 9, 3, 2100, 4, 4)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype_name, tol", [("float32", 1e-5), ("bfloat16", 1e-2)])
@pytest.mark.parametrize("k, offset, window, t, h, hkv", GPU_CASES)
def test_gpu_kernel_on_the_device_matches_reference(on_gpu, dtype_name, tol, k, offset, window, t, h, hkv):
    # Given fresh random inputs on the GPU and the dense masked reference computed there
    grid, args, cot, (o_ref, grads_ref) = _case(k, offset, window, t, h, hkv, dtype_name, 10 * k + offset, d=64)
    # When the compiled kernels run forward and backward at their default tiles, outputs poisoned
    kernel = lambda q, kk, v: pallas_gpu.attention_pallas_gpu(q, kk, v, grid=grid, window=window, poison=True)
    o, grads = value_and_grads(kernel, args, cot)
    # Then they agree with the reference and write every element
    assert_close(o, o_ref, tol)
    assert_close(grads, grads_ref, tol)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype_name, tol", [("float32", 1e-5), ("bfloat16", 1e-2)])
@pytest.mark.parametrize("k, offset, window, t, h, hkv", GPU_CASES)
def test_gpu_kernel_with_documents_on_the_device_matches_reference(
    on_gpu, dtype_name, tol, k, offset, window, t, h, hkv
):
    # Given a packed batch on the GPU and the dense reference under the layout computed there
    grid, starts, _, args, cot, (o_ref, grads_ref) = _documents_case(
        k, offset, window, t, h, hkv, dtype_name, 10 * k + offset, d=64
    )
    # When the compiled kernels run forward and backward at their default tiles, outputs poisoned
    kernel = lambda q, kk, v: pallas_gpu.attention_pallas_gpu(
        q, kk, v, grid=grid, window=window, document_start=jnp.asarray(starts), poison=True
    )
    o, grads = value_and_grads(kernel, args, cot)
    # Then they agree with the reference and write every element
    assert_close(o, o_ref, tol)
    assert_close(grads, grads_ref, tol)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gpu_kernel_documents_are_independent_on_the_device(on_gpu, dtype):
    # Given a packed row of the paper's shape at the default tiles
    grid = ChunkGrid(8, 3)
    starts, spans = packed_layout(5, 1, 700, 8, 8, max_docs=8)
    _, (q, kk, v), _, _ = _case(8, 3, 8, 700, 8, 2, jnp.dtype(dtype).name, 5, d=64)
    q, kk, v = q[:1], kk[:1], v[:1]
    run = jax.jit(
        lambda q, kk, v: pallas_gpu.attention_pallas_gpu(q, kk, v, grid=grid, window=8, document_start=starts)
    )
    # Then perturbing one document leaves every other output bit for bit
    assert_documents_independent(run, [q, kk, v], spans)
