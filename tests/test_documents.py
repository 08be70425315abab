"""Packed documents: every op computes each document of a packed row as if it were alone."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import documents
from pallas_kernels.boundary_window_attention import boundary_window_attention
from pallas_kernels.causal_attention import causal_attention
from pallas_kernels.chunk_grid import ChunkGrid
from pallas_kernels.ssd import ssd
from pallas_kernels.ssd.reference import random_inputs
from pallas_kernels.visibility import Visibility
from tests.helpers import assert_documents_independent, assert_packed_equals_alone, packed_layout

CASES = [  # batch, length, K, offset, W, heads, kv heads
    (2, 48, 4, 0, 6, 2, 2),
    (1, 64, 8, 5, 3, 4, 2),
    (2, 40, 8, 7, 10, 2, 1),
    (1, 33, 1, 0, 2, 2, 2),
    (1, 80, 16, 14, 16, 2, 2),
]


def _layout(case, seed=0):
    b, t, k, _, w, _, _ = case
    return packed_layout(seed + hash(case) % 1000, b, t, k, w)


def test_from_segment_ids():
    # Given rows with documents 1, 2, padding (0) and a row that starts with padding
    seg = jnp.array([[1, 1, 2, 2, 2, 0, 0, 3], [0, 0, 1, 1, 0, 2, 2, 2]])
    # Then a document starts at 0 and where the id changes to a non-zero one; padding continues the document
    np.testing.assert_array_equal(documents.from_segment_ids(seg), [[0, 0, 2, 2, 2, 2, 2, 7], [0, 0, 2, 2, 2, 5, 5, 5]])


@pytest.mark.parametrize("align", [1, 4])
def test_at_document_start_gradient_is_the_gathers(align):
    # Given a packed layout (any alignment) and a gather of each token's document's first row
    starts, _ = packed_layout(5, 3, 50, align, 6)
    a = jax.random.normal(jax.random.key(0), (3, 50, 2, 5))
    cot = jax.random.normal(jax.random.key(1), (3, 50, 2, 5))
    plain = lambda a: jnp.take_along_axis(a, jnp.asarray(starts)[:, :, None, None], axis=1)
    ours = lambda a: documents.at_document_start(a, jnp.asarray(starts))
    # Then the value and the segmented-scan gradient equal the gather's and its scatter-add
    np.testing.assert_array_equal(ours(a), plain(a))
    grad = lambda f: jax.grad(lambda a: jnp.sum(f(a) * cot))(a)
    np.testing.assert_allclose(grad(ours), grad(plain), rtol=1e-5, atol=1e-5)


def test_check_aligned_names_the_document():
    documents.check_aligned(np.array([[0, 0, 4, 4]]), 4)
    with pytest.raises(ValueError, match="row 0 has a document starting at 2"):
        documents.check_aligned(np.array([[0, 0, 2, 2]]), 4)


@pytest.mark.parametrize("case", CASES)
def test_layout_generator_covers_the_cases(case):
    starts, spans = _layout(case)
    k = case[2]
    assert all(s % k == 0 for _, s, _ in spans)
    lengths = [stop - start for _, start, stop in spans]
    assert min(lengths) >= 1 and (starts % k == 0).all()


@pytest.mark.parametrize("case", CASES)
def test_dense_rule_is_the_rule_of_each_document_alone(case):
    # Given a packed layout and the rule on its documents' own positions
    b, t, k, o, w, _, _ = case
    starts, spans = _layout(case)
    vis = Visibility(ChunkGrid(k, o), w)
    dense = vis.dense(t, starts)  # [B, T, T]
    for row, start, stop in spans:
        n = stop - start
        # Then each document's block is its alone mask, and nothing outside its document is seen
        np.testing.assert_array_equal(dense[row, start:stop, start:stop], vis.dense(n))
        assert not dense[row, start:stop, :start].any()


@pytest.mark.parametrize("case", CASES)
def test_boundary_parts_tile_the_rule_for_aligned_documents(case):
    # Given documents at multiples of K: the row's boundaries after the first token + the first token + the window
    b, t, k, o, w, _, _ = case
    starts, _ = _layout(case)
    grid = ChunkGrid(k, o)
    vis = Visibility(grid, w)
    tq = np.arange(t)[None, :, None]
    s = np.arange(t)[None, None, :]
    start = starts[:, :, None]
    n_of = grid.count_before(s)  # a boundary at s is the n-th
    boundary = grid.is_boundary(s) & vis.boundary_visible(tq, n_of, start)
    first = (s == start) & vis.document_key_visible(tq, start)
    window = vis.window_visible(tq, s, start)
    # Then the three parts are disjoint and their union is the dense rule
    assert not (boundary & first).any() and not (boundary & window).any() and not (first & window).any()
    np.testing.assert_array_equal(boundary | first | window, vis.dense(t, starts))
    # And the boundary part is the contiguous index range first_boundary(start) .. boundaries_seen(t)
    lo, hi = vis.first_boundary(starts), vis.boundaries_seen(np.arange(t))[None]
    np.testing.assert_array_equal(boundary.sum(-1), np.maximum(hi - lo, 0))


# The references on two cases, the fast paths on all.
SSD_RUNS = [(impl, case) for impl in ("sequential", "associative") for case in CASES[:2]] + [
    ("chunked", case) for case in CASES
]


@pytest.mark.parametrize("impl, case", SSD_RUNS)
def test_ssd_packed_equals_alone(impl, case):
    b, t, k, o, _, _, _ = case
    starts, spans = _layout(case)
    (x, dt, A, B, C, D), _ = random_inputs(jax.random.key(1), b, t, 4, 3, 2, 5)
    dt = dt * 20  # decays that underflow (and would overflow wherever a masked pair were computed)
    op = lambda x, dt, B, C, A, D, document_start: ssd(
        x, dt, A, B, C, D, grid=ChunkGrid(k, o), document_start=document_start, implementation=impl
    )
    assert_packed_equals_alone(op, [x, dt, B, C], [A, D], starts, spans, 1e-5)


ATTENTION_RUNS = [("dense", case) for case in CASES[:3]] + [("compressed", case) for case in CASES]


@pytest.mark.parametrize("impl, case", ATTENTION_RUNS)
def test_attention_packed_equals_alone(impl, case):
    b, t, k, o, w, h, hkv = case
    starts, spans = _layout(case)
    ks = jax.random.split(jax.random.key(2), 3)
    q = jax.random.normal(ks[0], (b, t, h, 8))
    kk, v = (jax.random.normal(key, (b, t, hkv, 8)) for key in ks[1:])
    op = lambda q, k_, v, document_start: boundary_window_attention(
        q, k_, v, grid=ChunkGrid(k, o), window=w, document_start=document_start, implementation=impl
    )
    assert_packed_equals_alone(op, [q, kk, v], [], starts, spans, 1e-5)


@pytest.mark.parametrize("impl", ["sequential", "chunked"])
def test_ssd_packed_equals_alone_bf16(impl):
    b, t, k, o, _, _, _ = case = CASES[1]
    starts, spans = _layout(case, seed=2)
    (x, dt, A, B, C, D), _ = random_inputs(jax.random.key(8), b, t, 4, 3, 2, 5, dtype=jnp.bfloat16)
    op = lambda x, dt, B, C, A, D, document_start: ssd(
        x, dt, A, B, C, D, grid=ChunkGrid(k, o), document_start=document_start, implementation=impl
    )
    assert_packed_equals_alone(op, [x, dt, B, C], [A, D], starts, spans, 1e-2)


@pytest.mark.parametrize("impl", ["dense", "compressed"])
def test_attention_packed_equals_alone_bf16(impl):
    b, t, k, o, w, h, hkv = case = CASES[2]
    starts, spans = _layout(case, seed=2)
    ks = jax.random.split(jax.random.key(9), 3)
    q = jax.random.normal(ks[0], (b, t, h, 8)).astype(jnp.bfloat16)
    kk, v = (jax.random.normal(key, (b, t, hkv, 8)).astype(jnp.bfloat16) for key in ks[1:])
    op = lambda q, k_, v, document_start: boundary_window_attention(
        q, k_, v, grid=ChunkGrid(k, o), window=w, document_start=document_start, implementation=impl
    )
    assert_packed_equals_alone(op, [q, kk, v], [], starts, spans, 1e-2)


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("case", CASES[:3])
def test_causal_attention_packed_equals_alone(window, case):
    b, t, _, _, _, h, hkv = case
    starts, spans = packed_layout(3, b, t, 1, 4)  # the transformer needs no alignment
    ks = jax.random.split(jax.random.key(3), 3)
    q = jax.random.normal(ks[0], (b, t, h, 8))
    kk, v = (jax.random.normal(key, (b, t, hkv, 8)) for key in ks[1:])
    op = lambda q, k_, v, document_start: causal_attention(q, k_, v, window=window, document_start=document_start)
    assert_packed_equals_alone(op, [q, kk, v], [], starts, spans, 1e-5)


def test_unaligned_documents_are_exact_in_the_references():
    # Given documents at arbitrary starts: the references read each document's own grid
    b, t, k, o, w = 1, 30, 4, 1, 3
    starts, spans = packed_layout(5, b, t, 1, w)
    assert any(s % k for _, s, _ in spans)
    (x, dt, A, B, C, D), _ = random_inputs(jax.random.key(4), b, t, 2, 2, 1, 3)
    op = lambda x, dt, B, C, A, D, document_start: ssd(
        x, dt, A, B, C, D, grid=ChunkGrid(k, o), document_start=document_start, implementation="sequential"
    )
    assert_packed_equals_alone(op, [x, dt, B, C], [A, D], starts, spans, 1e-5)
    q = jax.random.normal(jax.random.key(5), (b, t, 2, 8))
    att = lambda q, k_, v, document_start: boundary_window_attention(
        q, k_, v, grid=ChunkGrid(k, o), window=w, document_start=document_start, implementation="dense"
    )
    assert_packed_equals_alone(att, [q, q, q], [], starts, spans, 1e-5)


@pytest.mark.parametrize("impl", ["sequential", "associative", "chunked"])
def test_ssd_documents_are_independent(impl):
    case = CASES[1]
    b, t, k, o, _, _, _ = case
    starts, spans = _layout(case, seed=4)
    (x, dt, A, B, C, D), _ = random_inputs(jax.random.key(6), b, t, 4, 3, 2, 5)
    grid = ChunkGrid(k, o)
    run = jax.jit(lambda x, dt, B, C: ssd(x, dt, A, B, C, D, grid=grid, document_start=starts, implementation=impl))
    assert_documents_independent(run, [x, jnp.abs(dt), B, C], spans)


@pytest.mark.parametrize("impl", ["dense", "compressed"])
def test_attention_documents_are_independent(impl):
    case = CASES[2]
    b, t, k, o, w, h, hkv = case
    starts, spans = _layout(case, seed=4)
    ks = jax.random.split(jax.random.key(7), 3)
    q = jax.random.normal(ks[0], (b, t, h, 8))
    kk, v = (jax.random.normal(key, (b, t, hkv, 8)) for key in ks[1:])
    grid = ChunkGrid(k, o)
    run = jax.jit(
        lambda q, k_, v: boundary_window_attention(
            q, k_, v, grid=grid, window=w, document_start=starts, implementation=impl
        )
    )
    assert_documents_independent(run, [q, kk, v], spans)


@pytest.mark.gpu
@pytest.mark.parametrize("window", [None, 100])
def test_cudnn_packed_equals_alone_on_the_device(on_gpu, window):
    # Given packed rows of the transformer baseline's shape on cuDNN (bf16, heads of 64): documents
    # enter jax.nn.dot_product_attention as a mask, since it takes no segment ids
    starts, spans = packed_layout(11, 2, 1000, 1, 300)
    ks = jax.random.split(jax.random.key(11), 3)
    q = jax.random.normal(ks[0], (2, 1000, 8, 64)).astype(jnp.bfloat16)
    kk, v = (jax.random.normal(key, (2, 1000, 8, 64)).astype(jnp.bfloat16) for key in ks[1:])
    op = lambda q, k_, v, document_start: causal_attention(
        q, k_, v, window=window, document_start=document_start, implementation="cudnn"
    )
    # Then each document computes as if alone, forward and gradient
    assert_packed_equals_alone(op, [q, kk, v], [], starts, spans, 1e-2)
