"""The SSD Pallas kernels (GPU/Triton and TPU/Mosaic, run in the Pallas interpreter) against the
sequential reference: forward and every gradient, float32 and bfloat16, every output written."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl

from pallas_kernels.chunk_grid import ChunkGrid
from pallas_kernels.common import tpu_interpret_params
from pallas_kernels.ssd import pallas_gpu, pallas_tpu, reference, ssd
from pallas_kernels.ssd.block_sizes import GpuBlocks, GpuPass, TpuBlocks, default_gpu_blocks
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

# The interpreters start every output buffer as NaN (see test_interpreter_poisons_unwritten_outputs),
# so a finite result proves that every element was written.
KERNELS = {
    "gpu": lambda *a, grid, block_len, document_start=None: pallas_gpu.ssd_pallas_gpu(
        *a, grid=grid, document_start=document_start, interpret=True, blocks=GpuBlocks(block_len)
    ),
    "tpu": lambda *a, grid, block_len, document_start=None: pallas_tpu.ssd_pallas_tpu(
        *a, grid=grid, document_start=document_start, interpret=tpu_interpret_params(), blocks=TpuBlocks(block_len)
    ),
}


def _inputs(seed, b, t, h, g, p, n, dtype):
    """x [b, t, h, p], dt, A, B/C [b, t, g, n], D and a cotangent for y."""
    return reference.random_inputs(jax.random.key(seed), b, t, h, p, g, n, dtype)


# (K, offset, T, H, G, P, N, block_len): several K (incl. one not a power of two), offsets,
# T not a multiple of the block, several blocks per row, grouped B/C, padded head dims.
CASES = [
    (4, 0, 37, 2, 1, 16, 16, 16),
    (8, 5, 50, 4, 2, 16, 16, 16),
    (6, 2, 45, 2, 1, 12, 16, 24),
    (16, 15, 40, 2, 1, 16, 8, 16),
    (8, 2, 35, 6, 2, 16, 16, 16),  # 3 heads per group (not a power of two)
]


def _run(fn, *args):
    return jax.jit(fn).lower(*args).compile(FAST_COMPILE)(*args)


@functools.cache
def _case(k, offset, t, h, g, p, n, dtype_name, seed):
    """Inputs and the reference's value and gradients, shared by the GPU and TPU variants."""
    grid = ChunkGrid(k, offset)
    args, cot = _inputs(seed, 2, t, h, g, p, n, jnp.dtype(dtype_name))
    reset = jnp.broadcast_to(jnp.asarray(grid.is_chunk_start(np.arange(t))), (2, t))
    return grid, args, cot, value_and_grads(lambda *a: reference.ssd_sequential(*a, reset)[0], args, cot)


@pytest.mark.parametrize("kernel", sorted(KERNELS))
@pytest.mark.parametrize("k, offset, t, h, g, p, n, block_len", CASES)
def test_kernel_matches_reference_f32(kernel, k, offset, t, h, g, p, n, block_len):
    # Given fresh random float32 inputs on a grid with offset, and the sequential reference
    grid, args, cot, (y_ref, grads_ref) = _case(k, offset, t, h, g, p, n, "float32", k * 100 + offset)
    if kernel == "gpu" and block_len % 16:
        block_len = 16  # GPU tiles are powers of two
    # When the kernel runs forward and backward
    y, grads = value_and_grads(functools.partial(KERNELS[kernel], grid=grid, block_len=block_len), args, cot)
    # Then it agrees with the reference to float32 accuracy, every element written
    assert_close(y, y_ref, 1e-5)
    assert_close(grads, grads_ref, 1e-5)


@pytest.mark.parametrize("kernel", sorted(KERNELS))
def test_kernel_matches_reference_bf16(kernel):
    grid, args, cot, (y_ref, grads_ref) = _case(8, 3, 41, 2, 1, 16, 16, "bfloat16", 7)
    y, grads = value_and_grads(functools.partial(KERNELS[kernel], grid=grid, block_len=16), args, cot)
    assert y.dtype == jnp.bfloat16 and grads[0].dtype == jnp.bfloat16
    assert_close(y, y_ref, 1e-2)
    assert_close(grads, grads_ref, 1e-2)


@pytest.mark.parametrize("tiles", [2, 3])
def test_gpu_kernel_runs_several_tiles_per_program(tiles):
    # Given programs that each run `tiles` consecutive tiles of a row of 4 (with 3, the last
    # program runs past the row's end; the interpreter ignores pipelining, see the lowering test)
    grid, args, cot, (y_ref, grads_ref) = _case(8, 5, 50, 4, 2, 16, 16, "float32", 805)
    blocks = GpuBlocks(16, GpuPass(2, tiles), GpuPass(1, tiles))
    # When the kernel runs forward and backward
    y, grads = value_and_grads(
        lambda *a: pallas_gpu.ssd_pallas_gpu(*a, grid=grid, interpret=True, blocks=blocks), args, cot
    )
    # Then it agrees with the reference and writes every element
    assert_close(y, y_ref, 1e-5)
    assert_close(grads, grads_ref, 1e-5)


@pytest.mark.parametrize("ahead, ahead_bwd", [(3, 3), (2, 4)])
def test_gpu_kernel_loads_several_heads_before_computing(ahead, ahead_bwd):
    # Given 4 heads per group loaded in runs of 3 (a short last run: the backward loops over one run,
    # then the last head alone), of 2 and all at once
    grid, args, cot, (y_ref, grads_ref) = _case(8, 5, 50, 8, 2, 16, 16, "float32", 806)
    blocks = GpuBlocks(16, GpuPass(2, heads_ahead=ahead), GpuPass(1, heads_ahead=ahead_bwd))
    # When the kernel runs forward and backward
    y, grads = value_and_grads(
        lambda *a: pallas_gpu.ssd_pallas_gpu(*a, grid=grid, interpret=True, blocks=blocks), args, cot
    )
    # Then it agrees with the reference and writes every element
    assert_close(y, y_ref, 1e-5)
    assert_close(grads, grads_ref, 1e-5)


@pytest.mark.parametrize("tiles", [1, 3])
def test_gpu_kernels_overwrite_nan_buffers(tiles):
    # Given every kernel output, forward and backward, aliased to a NaN-filled buffer (3 tiles per
    # program: the last program runs past the row's end)
    grid, args, cot, (y_ref, grads_ref) = _case(4, 1, 29, 2, 1, 16, 16, "float32", 3)
    blocks = GpuBlocks(16, GpuPass(4, tiles=tiles), GpuPass(1, tiles=tiles))
    kernel = lambda *a: pallas_gpu.ssd_pallas_gpu(*a, grid=grid, interpret=True, blocks=blocks, poison=True)
    # When the kernels write into them
    y, grads = value_and_grads(kernel, args, cot)
    # Then no NaN is left and the values are right
    assert_close(y, y_ref, 1e-5)
    assert_close(grads, grads_ref, 1e-5)


def test_tpu_kernel_at_its_default_tiles():
    # Given the TPU kernel's own 128-token tiles: a row of 150 tokens spans two, the first cut
    grid, args, cot, (y_ref, grads_ref) = _case(8, 3, 150, 4, 2, 16, 16, "float32", 808)
    kernel = lambda *a: pallas_tpu.ssd_pallas_tpu(*a, grid=grid, interpret=tpu_interpret_params())
    # When it runs forward and backward
    y, grads = value_and_grads(kernel, args, cot)
    # Then it agrees with the reference
    assert_close(y, y_ref, 1e-5)
    assert_close(grads, grads_ref, 1e-5)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_tpu_kernel_lowers_through_mosaic(dtype):
    # Given the model's stacked K/V shape (H = 16 heads of 32, G = 2 groups, state 32, K = 8)
    (x, dt, A, B, C, D), _ = _inputs(9, 2, 300, 16, 2, 32, 32, dtype)
    kernel = lambda *a: pallas_tpu.ssd_pallas_tpu(*a, grid=ChunkGrid(8, 3))
    # When the forward and backward are lowered for a TPU
    text = lower_for("tpu", grads_of(kernel), x, dt, A, B, C, D)
    # Then Pallas put the forward kernel and the backward kernel in Mosaic's format
    assert text.count("tpu_custom_call") >= 2


@pytest.mark.parametrize("poison, aliases", [(False, 0), (True, 7)])
def test_gpu_kernels_lower_through_triton(poison, aliases):
    # Given the model's stacked K/V shape in bf16 and the tuned tiles (a pipelined forward loop)
    (x, dt, A, B, C, D), _ = _inputs(9, 2, 300, 16, 2, 32, 32, jnp.bfloat16)
    kernel = lambda *a: pallas_gpu.ssd_pallas_gpu(*a, grid=ChunkGrid(8, 3), poison=poison)
    # When the forward and backward are lowered for a GPU
    text = lower_for("cuda", grads_of(kernel), x, dt, A, B, C, D)
    # Then both kernels are Triton calls, and poisoning aliases every output (1 forward, 6 backward)
    assert text.count("__gpu$xla.gpu.triton") == 2
    assert text.count("output_operand_alias<") == aliases


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(tiles=0), "GpuPass.tiles must be >= 1"),
        (dict(heads_ahead=0), "GpuPass.heads_ahead must be >= 1"),
        (dict(num_stages=0), "GpuPass.num_stages must be >= 1"),
    ],
)
def test_gpu_launch_settings_reject_bad_values(settings, message):
    with pytest.raises(ValueError, match=message):
        GpuPass(**settings)


def test_a_pipelined_forward_needs_its_loop_over_tiles():
    # The backward pipelines its loop over heads with one tile per program; the forward has no such loop
    GpuBlocks(16, bwd=GpuPass(1, tiles=1, num_stages=3))
    with pytest.raises(ValueError, match="needs fwd.tiles > 1"):
        GpuBlocks(16, fwd=GpuPass(2, tiles=1, num_stages=2))


@pytest.mark.parametrize(
    "kernel, blocks, message",
    [
        (pallas_gpu.ssd_pallas_gpu, GpuBlocks(24), r"block_len \(24\) must be a power of two >= max\(16, K=8\)"),
        (pallas_tpu.ssd_pallas_tpu, TpuBlocks(20), r"block_len \(20\) must be a multiple of 8 and of K \(8\)"),
    ],
)
def test_kernel_tiles_that_cut_chunks_are_refused(kernel, blocks, message):
    args, _ = _inputs(1, 1, 16, 2, 1, 16, 16, jnp.float32)
    with pytest.raises(ValueError, match=message):
        kernel(*args, grid=ChunkGrid(8), blocks=blocks)


def test_interpreter_poisons_unwritten_outputs():
    """What makes the finiteness checks above mean "every element written"."""

    def writes_half(x_ref, o_ref):
        o_ref[:4] = x_ref[:4]

    x = jnp.ones((8, 16), jnp.float32)
    for interpret in (True, tpu_interpret_params()):
        out = pl.pallas_call(writes_half, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype), interpret=interpret)(x)
        assert np.isnan(np.asarray(out[4:])).all() and not np.isnan(np.asarray(out[:4])).any()


@pytest.mark.parametrize("name", ["pallas_gpu_interpret", "pallas_tpu_interpret"])
def test_public_api_routes_to_the_kernels(name):
    grid = ChunkGrid(4, 2)
    args, _ = _inputs(5, 1, 23, 2, 1, 16, 16, jnp.float32)
    expected = _run(functools.partial(ssd, grid=grid, implementation="chunked"), *args)
    assert_close(_run(functools.partial(ssd, grid=grid, implementation=name), *args), expected, 1e-5)


# --- packed documents ---------------------------------------------------------------------------


@functools.cache
def _documents_case(k, offset, t, h, g, p, n, dtype_name, seed):
    """A packed layout (documents at multiples of K), inputs, and the reference's value and gradients."""
    grid = ChunkGrid(k, offset)
    starts, spans = packed_layout(seed, 2, t, k, 2 * k)
    args, cot = _inputs(seed, 2, t, h, g, p, n, jnp.dtype(dtype_name))
    sequential = lambda *a: ssd(*a, grid=grid, document_start=jnp.asarray(starts), implementation="sequential")
    return grid, starts, spans, args, cot, value_and_grads(sequential, args, cot)


def _block_len(kernel, block_len):
    return 16 if kernel == "gpu" and block_len % 16 else block_len  # GPU tiles are powers of two


# A case of CASES in float32 (K not a power of two: GPU tiles of 12 tokens in 16) and one in bf16
# (grouped B/C); PACKED below adds offsets 0 and K-1 and the default tiles.
@pytest.mark.parametrize("kernel", sorted(KERNELS))
@pytest.mark.parametrize("case, dtype_name, tol", [(CASES[2], "float32", 1e-5), (CASES[1], "bfloat16", 1e-2)])
def test_kernel_with_documents_matches_reference(kernel, case, dtype_name, tol):
    # Given a packed batch of documents at multiples of K, rows cut mid-document, and the sequential reference
    k, offset, t, h, g, p, n, block_len = case
    grid, starts, _, args, cot, (y_ref, grads_ref) = _documents_case(k, offset, t, h, g, p, n, dtype_name, 10 * k)
    # When the kernel runs forward and backward with the layout
    fn = functools.partial(KERNELS[kernel], grid=grid, block_len=_block_len(kernel, block_len))
    y, grads = value_and_grads(lambda *a: fn(*a, document_start=jnp.asarray(starts)), args, cot)
    # Then it agrees with the reference, every element written
    assert y.dtype == args[0].dtype and grads[0].dtype == args[0].dtype
    assert_close(y, y_ref, tol)
    assert_close(grads, grads_ref, tol)


# (K, offset, T, H, G, block_len, dtype, tolerance): the first document's first chunk cut by the
# grid offset; offset 0 (each document's first token a chunk of its own in a row chunk of its own
# document); several blocks per row; the TPU kernel's own 128-token tiles (block_len None).
PACKED = [
    (4, 0, 40, 2, 1, 16, "float32", 1e-5),
    (8, 5, 50, 4, 2, 16, "bfloat16", 1e-2),
    (8, 7, 130, 2, 1, None, "float32", 1e-5),
]


@pytest.mark.parametrize("kernel", sorted(KERNELS))
@pytest.mark.parametrize("k, offset, t, h, g, block_len, dtype_name, tol", PACKED)
def test_kernel_packed_equals_alone(kernel, k, offset, t, h, g, block_len, dtype_name, tol):
    # Given a packed batch and each of its documents alone, the padding after a document weighing nothing
    starts, spans = packed_layout(k + offset, 2, t, k, 2 * k)
    (x, dt, A, B, C, D), _ = _inputs(k + offset, 2, t, h, g, 16, 16, jnp.dtype(dtype_name))
    if kernel == "gpu":
        blocks = GpuBlocks(block_len or 16)
        run = lambda *a, **kw: pallas_gpu.ssd_pallas_gpu(*a, **kw, interpret=True, blocks=blocks, poison=True)
    else:
        blocks = block_len and TpuBlocks(block_len)
        run = lambda *a, **kw: pallas_tpu.ssd_pallas_tpu(*a, **kw, interpret=tpu_interpret_params(), blocks=blocks)
    op = lambda x, dt, B, C, A, D, document_start: run(
        x, dt, A, B, C, D, grid=ChunkGrid(k, offset), document_start=document_start
    )
    # Then the packed run equals the runs alone, forward and gradient, and padding gets zero gradient
    assert_packed_equals_alone(op, [x, dt, B, C], [A, D], starts, spans, tol)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("kernel", sorted(KERNELS))
def test_kernel_documents_are_independent(kernel, dtype):
    # Given a packed row of several documents, two of them sharing a chunk of the row and a block
    grid = ChunkGrid(8, 5)
    starts, spans = packed_layout(4, 1, 64, 8, 3)
    assert len(spans) >= 3
    (x, dt, A, B, C, D), _ = _inputs(6, 1, 64, 4, 2, 16, 16, dtype)
    fn = functools.partial(KERNELS[kernel], grid=grid, block_len=32, document_start=jnp.asarray(starts))
    run = jax.jit(lambda x, dt, B, C: fn(x, dt, A, B, C, D))
    # Then perturbing one document changes its outputs and no other output, bit for bit: each
    # document's decays are sums of its own dt*A only
    assert_documents_independent(run, [x, dt, B, C], spans)


def _packed_model_shape(dtype):
    """The model's stacked K/V shape at K = 8 with an offset, and a packed layout."""
    args, _ = _inputs(9, 2, 300, 16, 2, 32, 32, dtype)
    return args, jnp.asarray(packed_layout(9, 2, 300, 8, 16)[0])


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_tpu_kernel_with_documents_lowers_through_mosaic(dtype):
    args, starts = _packed_model_shape(dtype)
    kernel = lambda *a: pallas_tpu.ssd_pallas_tpu(*a, grid=ChunkGrid(8, 3), document_start=starts)
    text = lower_for("tpu", grads_of(kernel), *args)
    assert text.count("tpu_custom_call") >= 2


@pytest.mark.parametrize("poison, aliases", [(False, 0), (True, 7)])
def test_gpu_kernels_with_documents_lower_through_triton(poison, aliases):
    args, starts = _packed_model_shape(jnp.bfloat16)
    kernel = lambda *a: pallas_gpu.ssd_pallas_gpu(*a, grid=ChunkGrid(8, 3), document_start=starts, poison=poison)
    text = lower_for("cuda", grads_of(kernel), *args)
    assert text.count("__gpu$xla.gpu.triton") == 2
    assert text.count("output_operand_alias<") == aliases


# --- on a GPU: the real kernels (``pytest -m gpu``) ------------------------------------------------

# The model's stacked K/V shape (H = 16 heads of 32, G = 2, state 32) at K = 8 with an offset;
# T no multiple of the tile; the default tiles and launch settings.
GPU_CASES = [(8, 3, 1000, 16, 2, 32, 32), (4, 0, 333, 8, 1, 32, 32), (16, 10, 513, 4, 2, 16, 64)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype_name, tol", [("float32", 1e-5), ("bfloat16", 1e-2)])
@pytest.mark.parametrize("k, offset, t, h, g, p, n", GPU_CASES)
def test_gpu_kernel_on_the_device_matches_reference(on_gpu, dtype_name, tol, k, offset, t, h, g, p, n):
    # Given fresh random inputs on the GPU and the sequential reference computed there
    grid, args, cot, (y_ref, grads_ref) = _case(k, offset, t, h, g, p, n, dtype_name, 100 * k + offset)
    # When the compiled kernel runs forward and backward, every output starting as NaN
    kernel = lambda *a: pallas_gpu.ssd_pallas_gpu(*a, grid=grid, poison=True)
    y, grads = value_and_grads(kernel, args, cot)
    # Then it agrees with the reference and writes every element
    assert_close(y, y_ref, tol)
    assert_close(grads, grads_ref, tol)


@pytest.mark.gpu
@pytest.mark.parametrize("stages", [2, 3])
def test_gpu_backward_pipelined_over_heads_on_the_device_matches_reference(on_gpu, stages):
    # Given the model's stacked shape in bf16 and a backward whose loop over heads Triton pipelines
    # (the next heads' loads in flight during this one's math: only the device runs that schedule)
    grid, args, cot, (y_ref, grads_ref) = _case(8, 3, 1000, 16, 2, 32, 32, "bfloat16", 83)
    blocks = dataclasses.replace(default_gpu_blocks(8), bwd=GpuPass(1, num_stages=stages))
    kernel = lambda *a: pallas_gpu.ssd_pallas_gpu(*a, grid=grid, blocks=blocks, poison=True)
    # When it runs forward and backward, every output starting as NaN
    y, grads = value_and_grads(kernel, args, cot)
    # Then it agrees with the reference and writes every element
    assert_close(y, y_ref, 1e-2)
    assert_close(grads, grads_ref, 1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype_name, tol", [("float32", 1e-5), ("bfloat16", 1e-2)])
@pytest.mark.parametrize("k, offset, t, h, g, p, n", GPU_CASES)
def test_gpu_kernel_with_documents_on_the_device_matches_reference(on_gpu, dtype_name, tol, k, offset, t, h, g, p, n):
    # Given a packed batch of documents at multiples of K, and the sequential reference on the GPU
    grid, starts, _, args, cot, (y_ref, grads_ref) = _documents_case(k, offset, t, h, g, p, n, dtype_name, k + offset)
    # When the compiled kernel runs forward and backward with the layout, every output starting as NaN
    kernel = lambda *a: pallas_gpu.ssd_pallas_gpu(*a, grid=grid, document_start=jnp.asarray(starts), poison=True)
    y, grads = value_and_grads(kernel, args, cot)
    # Then it agrees with the reference and writes every element
    assert_close(y, y_ref, tol)
    assert_close(grads, grads_ref, tol)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gpu_kernel_documents_are_independent_on_the_device(on_gpu, dtype):
    # Given a packed row of the model's shape (tensor-core matmuls, the default tiles)
    grid = ChunkGrid(8, 3)
    starts, spans = packed_layout(5, 1, 512, 8, 16, max_docs=8)
    (x, dt, A, B, C, D), _ = _inputs(5, 1, 512, 16, 2, 32, 32, dtype)
    run = jax.jit(lambda x, dt, B, C: pallas_gpu.ssd_pallas_gpu(x, dt, A, B, C, D, grid=grid, document_start=starts))
    # Then perturbing one document leaves every other output bit for bit
    assert_documents_independent(run, [x, dt, B, C], spans)
