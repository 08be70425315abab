"""The SSMs' input side (split, chunk-causal conv + SiLU, softplus): the GPU kernels (in the Pallas
interpreter, lowered through Triton, and on a GPU) against the reference, forward and every
gradient; the reference's conv against the chunk grid (no tap crosses a chunk start)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.chunk_grid import ChunkGrid
from pallas_kernels.ssm_conv import chunk_causal_conv, pallas_gpu, ssm_conv
from pallas_kernels.ssm_sizes import SsmSizes
from tests.helpers import FAST_COMPILE, assert_close, lower_for

# (streams, heads, head dim, state, groups, conv width, batch, length, K, packed): the paper's
# stacked K/V shape on an offset grid; sizes no power of two with per-row positions (packed
# documents); several B/C groups and the shortest conv; every length no multiple of a program's.
CASES = [
    (2, 8, 32, 32, 1, 4, 2, 40, 8, False),
    (2, 3, 12, 5, 1, 3, 2, 37, 4, True),
    (1, 4, 8, 16, 2, 2, 3, 20, 8, False),
]


def _inputs(seed, s, h, p, n, g, width, b, t, k, packed, dtype):
    sizes = SsmSizes(s, h, p, n, g, eps=1e-5)
    ks = jax.random.split(jax.random.key(seed), 5)
    zxbcdt = jax.random.normal(ks[0], (b, t, s * sizes.projection)).astype(dtype)
    weight = 0.5 * jax.random.normal(ks[1], (s * sizes.conv_channels, width))
    bias = jax.random.normal(ks[2], (s * h,))
    if packed:  # every row its own documents: positions restart at random places
        starts = jax.random.bernoulli(ks[3], 0.2, (b, t)).at[:, 0].set(True)
        first = jax.lax.cummax(jnp.where(starts, jnp.arange(t), 0), axis=1)
        position = jnp.arange(t) - first
    else:
        position = jnp.asarray(ChunkGrid(k, k // 2).position_in_chunk(np.arange(t)))
    return sizes, (zxbcdt, weight, bias, position), ks[4]


def _run(implementation, sizes, args, key, launch=None):
    """Outputs and gradients of ``implementation`` (a name, or with ``launch`` the interpreted kernel
    run with those launch settings) against random cotangents."""
    zxbcdt, weight, bias, position = args
    shapes = jax.eval_shape(lambda: ssm_conv(*args, sizes=sizes, implementation="xla"))
    cots = [jax.random.normal(jax.random.fold_in(key, i), o.shape) for i, o in enumerate(shapes)]
    if launch is None:
        op = functools.partial(ssm_conv, sizes=sizes, implementation=implementation)
    else:
        op = functools.partial(pallas_gpu.ssm_conv_pallas_gpu, sizes=sizes, interpret=True, launch=launch)

    def loss(zxbcdt, weight, bias):
        outs = op(zxbcdt, weight, bias, position)
        return sum(jnp.sum(o.astype(jnp.float32) * c) for o, c in zip(outs, cots)), outs

    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
    (_, outs), grads = fn.lower(zxbcdt, weight, bias).compile(FAST_COMPILE)(zxbcdt, weight, bias)
    return outs, grads


def test_the_conv_never_reaches_into_an_earlier_chunk():
    # Given one channel of ones, a conv of ones (width 4) and a grid of K = 3
    grid = ChunkGrid(3, 1)
    t = 10
    out = chunk_causal_conv(jnp.ones((1, t, 1)), jnp.ones((1, 4)), jnp.asarray(grid.position_in_chunk(np.arange(t))))
    # Then each token sums itself and its chunk's earlier tokens only
    np.testing.assert_array_equal(out[0, :, 0], np.asarray(grid.position_in_chunk(np.arange(t))) + 1)


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 1e-2)])
@pytest.mark.parametrize("case", CASES)
def test_kernel_matches_reference(dtype, tol, case):
    # Given fresh random inputs
    sizes, args, key = _inputs(sum(case[:8]), *case, dtype)
    # When the kernels run forward and backward in the interpreter (outputs start as NaN there)
    got = _run("pallas_gpu_interpret", sizes, args, key)
    want = _run("xla", sizes, args, key)
    # Then z, x, B, C and dt and the gradients of the in-projection, conv weight and dt bias equal
    # the reference's (z passes through bit for bit)
    assert [o.dtype for o in got[0]] == [dtype] * 4 + [jnp.float32]
    assert_close(got, want, tol)
    np.testing.assert_array_equal(np.asarray(got[0][0], np.float32), np.asarray(want[0][0], np.float32))


@pytest.mark.parametrize(
    "launch", [pallas_gpu.Launch(rows=32, slab=16, num_warps=8), pallas_gpu.Launch(rows=8, slab=128, num_warps=2)]
)
def test_other_launch_settings_match_reference(launch):
    # Given the paper's stacked shape, and programs of other sizes (more tokens and narrower slabs;
    # fewer tokens and a slab wider than B and C)
    sizes, args, key = _inputs(11, *CASES[0], jnp.float32)
    # When the kernels run with them in the interpreter
    got = _run(None, sizes, args, key, launch=launch)
    # Then they agree with the reference
    assert_close(got, _run("xla", sizes, args, key), 1e-5)


@pytest.mark.parametrize(
    "settings, message",
    [(dict(rows=12), "Launch.rows must be a power of two"), (dict(num_warps=0), "Launch.num_warps must be >= 1")],
)
def test_bad_launch_settings_are_named(settings, message):
    with pytest.raises(ValueError, match=message):
        pallas_gpu.Launch(**settings)


def test_no_dt_bias_is_a_zero_bias():
    sizes, (zxbcdt, weight, bias, position), _ = _inputs(5, *CASES[1], jnp.float32)
    for implementation in ("xla", "pallas_gpu_interpret"):
        none = ssm_conv(zxbcdt, weight, None, position, sizes=sizes, implementation=implementation)
        zero = ssm_conv(zxbcdt, weight, jnp.zeros_like(bias), position, sizes=sizes, implementation=implementation)
        assert_close(none, zero, 0.0)


def test_kernels_lower_through_triton():
    sizes, (zxbcdt, weight, bias, position), _ = _inputs(6, 2, 8, 32, 32, 1, 4, 2, 64, 8, False, jnp.bfloat16)
    loss = lambda *a: sum(
        jnp.sum(o.astype(jnp.float32)) for o in pallas_gpu.ssm_conv_pallas_gpu(*a, position, sizes=sizes)
    )
    text = lower_for("cuda", jax.grad(loss, argnums=(0, 1, 2)), zxbcdt, weight, bias)
    assert text.count("__gpu$xla.gpu.triton") == 2


def test_auto_runs_xla_on_a_cpu_and_the_kernel_names_why_not():
    sizes, args, _ = _inputs(7, *CASES[2], jnp.float32)
    assert_close(ssm_conv(*args, sizes=sizes), ssm_conv(*args, sizes=sizes, implementation="xla"), 0.0)
    if jax.default_backend() != "gpu":
        with pytest.raises(ValueError, match="'pallas_gpu' cannot run this call: it runs on gpu"):
            ssm_conv(*args, sizes=sizes, implementation="pallas_gpu")


@pytest.mark.parametrize(
    "index, shape, name",
    [(0, (3, 20, 7), "zxbcdt"), (1, (5, 2), "conv_weight"), (2, (3,), "dt_bias"), (3, (7,), "position_in_chunk")],
)
def test_bad_shapes_are_named(index, shape, name):
    sizes, args, _ = _inputs(8, *CASES[2], jnp.float32)
    args = list(args)
    args[index] = jnp.zeros(shape, args[index].dtype)
    with pytest.raises(ValueError, match=f"ssm_conv: {name} must"):
        ssm_conv(*args, sizes=sizes)


# --- on a GPU: the real kernels (``pytest -m gpu``) -------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 1e-2)])
@pytest.mark.parametrize("case", CASES + [(2, 8, 32, 32, 1, 4, 16, 1024, 8, False)])
def test_kernel_on_the_device_matches_reference(on_gpu, dtype, tol, case):
    sizes, args, key = _inputs(sum(case[:8]), *case, dtype)
    assert_close(_run("pallas_gpu", sizes, args, key), _run("xla", sizes, args, key), tol)
