"""The fused Mamba-2 block-core GPU kernel (conv + SSD + gate + norm, in the Pallas interpreter)
against the composition of separate ops: forward and every gradient, every output written."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import pytest

from attamba_jax.chunking import ChunkGrid
from attamba_jax.model import apply_model, cross_entropy, init_model
from pallas_kernels.ssm_block import IMPLEMENTATIONS, SsmDims, pallas_gpu, ssm_block
from pallas_kernels.ssm_block.api import auto_implementations
from pallas_kernels.ssm_block.reference import ssm_block_composed
from tests.helpers import FAST_COMPILE, assert_close, value_and_grads
from tests.test_model import SMALL

EPS = 1e-5


def _inputs(seed, b, t, s, dims: SsmDims, taps, dtype, bias=True):
    """zxbcdt [b, t, s, width], the parameters, and a cotangent for the output."""
    ks = jax.random.split(jax.random.key(seed), 7)
    heads = s * dims.heads
    zx = jax.random.normal(ks[0], (b, t, s, dims.width)).astype(dtype)
    conv = 0.5 * jax.random.normal(ks[1], (s * dims.conv_channels, taps))
    dt_bias = 0.3 * jax.random.normal(ks[2], (heads,)) if bias else None
    A = -jnp.exp(jax.random.uniform(ks[3], (heads,), minval=-1.0, maxval=1.5))
    D = jax.random.normal(ks[4], (heads,))
    norm = 1.0 + 0.2 * jax.random.normal(ks[5], (s * dims.inner,))
    cotangent = jax.random.normal(ks[6], (b, t, s, dims.inner))
    return [zx, conv, dt_bias, A, D, norm], cotangent


def _value_and_grads(fn, args, cot):
    """Like ``helpers.value_and_grads``, with a None dt_bias held out of the differentiated args."""
    if args[2] is not None:
        return value_and_grads(fn, args, cot)
    rest = [a for i, a in enumerate(args) if i != 2]
    return value_and_grads(lambda zx, cw, a, d, nw: fn(zx, cw, None, a, d, nw), rest, cot)


def _composed(dims, grid):
    return functools.partial(ssm_block_composed, dims=dims, grid=grid, eps=EPS, ssd_implementation="sequential")


def _fused(dims, grid, **kw):
    return functools.partial(pallas_gpu.ssm_block_pallas_gpu, dims=dims, grid=grid, eps=EPS, interpret=True, **kw)


# (K, offset, T, streams, SsmDims(I, Hs, G, N), conv taps, dt bias): the paper's K and tile, a K
# below the tile with an offset, T not a multiple of the tile, two B/C groups per stream (norm
# groups too), 3 heads per group, a conv of 3 taps, no dt bias.
CASES = [
    (8, 3, 37, 2, SsmDims(32, 2, 1, 16), 4, True),
    (4, 1, 45, 1, SsmDims(64, 4, 2, 16), 4, False),
    (16, 5, 40, 2, SsmDims(48, 3, 1, 16), 3, True),
    (8, 0, 33, 1, SsmDims(96, 6, 2, 32), 4, True),
]


@pytest.mark.parametrize("k, offset, t, s, dims, taps, bias", CASES)
def test_fused_kernel_matches_composition_f32(k, offset, t, s, dims, taps, bias):
    # Given fresh float32 inputs on a chunk grid with an offset
    grid = ChunkGrid(k, offset)
    args, cot = _inputs(k * 10 + offset, 2, t, s, dims, taps, jnp.float32, bias)
    # When the fused kernel and the composition of separate ops run forward and backward
    y_ref, grads_ref = _value_and_grads(_composed(dims, grid), args, cot)
    y, grads = _value_and_grads(_fused(dims, grid), args, cot)
    # Then they agree to float32 accuracy (finite: every element written)
    assert_close(y, y_ref, 1e-5)
    assert_close(grads, grads_ref, 1e-5)


def test_fused_kernel_bf16_is_as_accurate_as_the_composition():
    # Given bfloat16 activations, and the composition's float32 result on the same values
    grid, dims = ChunkGrid(8, 2), SsmDims(64, 2, 1, 32)
    args, cot = _inputs(11, 2, 40, 2, dims, 4, jnp.bfloat16)
    args[1] = args[1].astype(jnp.bfloat16).astype(jnp.float32)  # the conv runs on bf16-rounded taps
    exact = [a.astype(jnp.float32) if i == 0 else a for i, a in enumerate(args)]
    y_exact, grads_exact = _value_and_grads(_composed(dims, grid), exact, cot)
    # When the fused kernel runs in bfloat16 (its matmul inputs x, B, C rounded, the rest float32)
    y, grads = _value_and_grads(_fused(dims, grid), args, cot)
    # Then it keeps the dtype and stays within bf16 accuracy of the exact result
    assert y.dtype == jnp.bfloat16 and grads[0].dtype == jnp.bfloat16
    assert_close(y, y_exact, 1e-2)
    assert_close(grads, grads_exact, 1e-2)


def test_fused_kernel_overwrites_nan_buffers():
    # Given output buffers filled with NaN and aliased to the forward's and the backward's outputs
    grid, dims = ChunkGrid(4, 3), SsmDims(32, 2, 1, 16)
    (zx, cw, bias, A, D, nw), cot = _inputs(5, 2, 29, 2, dims, 4, jnp.float32)
    run = lambda f, *a: jax.jit(f).lower(*a).compile(FAST_COMPILE)(*a)
    fwd = lambda *a: pallas_gpu._forward(*a, dims, grid, EPS, 16, 4, True, save=True, poison=True)[0]

    def bwd(*a):
        _, y, rstd = pallas_gpu._forward(*a[:-1], dims, grid, EPS, 16, 4, True, save=True)
        return pallas_gpu._backward(*a[:-1], y, rstd, a[-1], dims, grid, 16, 4, True, poison=True)[0]

    # When the kernels write into them
    y = run(fwd, zx, cw, bias, A, D, nw)
    dzx = run(bwd, zx, cw, bias, A, D, nw, cot)
    # Then no NaN is left and the values are right
    y_ref, vjp = jax.vjp(lambda z: _composed(dims, grid)(z, cw, bias, A, D, nw), zx)
    assert_close(y, y_ref, 1e-5)
    assert_close(dzx, vjp(cot)[0], 1e-5)


def test_public_api_routes_and_falls_back():
    grid = ChunkGrid(4, 2)
    dims = SsmDims(32, 2, 1, 16)
    args, _ = _inputs(7, 1, 23, 2, dims, 4, jnp.float32)
    call = lambda impl, d=dims, a=args: jax.jit(
        lambda *x: ssm_block(*x, dims=d, grid=grid, eps=EPS, implementation=impl))(*a)
    expected = call("sequential")
    assert_close(call("pallas_gpu_fused_interpret"), expected, 1e-5)
    assert_close(call("chunked"), expected, 1e-5)
    # Sizes the fused kernel cannot tile (head_dim 12) fall through to the next name.
    odd = SsmDims(24, 2, 1, 16)
    odd_args, _ = _inputs(8, 1, 23, 1, odd, 4, jnp.float32)
    assert_close(call(["pallas_gpu_fused_interpret", "chunked"], odd, odd_args), call("sequential", odd, odd_args), 1e-5)
    with pytest.raises(ValueError, match="unknown implementation"):
        call("magic")
    with pytest.raises(ValueError, match="zxbcdt must be"):
        ssm_block(args[0][..., :-1], *args[1:], dims=dims, grid=grid, eps=EPS)


def test_auto_leaves_the_fused_kernel_opt_in():
    assert auto_implementations("gpu")[0] == "pallas_gpu"
    assert auto_implementations("tpu")[0] == "pallas_tpu"
    assert auto_implementations("cpu")[0] == "chunked"
    assert {"pallas_gpu_fused", "pallas_gpu_fused_interpret", "pallas_gpu", "chunked"} <= set(IMPLEMENTATIONS)


def test_model_with_the_fused_kernel_equals_the_xla_path():
    # Given the small model's parameters, run through the fused kernel and through XLA ops
    cfg = dataclasses.replace(SMALL, ssm_heads=2, ssm_state_dim=16, ssm_hidden_dim=48, multiple_of=32)
    graphdef, params = init_model(cfg, seed=0)
    fused, _ = init_model(dataclasses.replace(cfg, ssm_implementation="pallas_gpu_fused_interpret"), seed=0)
    tokens = jax.random.randint(jax.random.key(3), (2, 27), 0, cfg.vocab_size)

    def loss(graph, p):
        return cross_entropy(apply_model(graph, p, tokens[:, :-1]), tokens[:, 1:])[0]

    # When both compute the loss and its gradient
    ref = jax.jit(jax.value_and_grad(functools.partial(loss, graphdef)))(params)
    got = jax.jit(jax.value_and_grad(functools.partial(loss, fused)))(params)
    # Then they agree: the loss to float32 accuracy, the gradients to 1e-3 (the per-head A and D
    # gradients are sums of thousands of per-token terms that mostly cancel, summed in another
    # order than XLA's reductions; a wrong term would be off by O(1))
    assert_close(got[0], ref[0], 1e-5)
    assert_close(got[1], ref[1], 1e-3)
