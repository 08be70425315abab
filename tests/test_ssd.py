"""The SSD core: every implementation equals the sequential scan, forward and gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.chunk_grid import ChunkGrid
from pallas_kernels.ssd import ssd, xla
from pallas_kernels.ssd.reference import random_inputs, ssd_sequential
from tests.helpers import assert_close


def _loss(impl, **kw):
    def f(x, dt, A, B, C, D):
        y = ssd(x, dt, A, B, C, D, implementation=impl, **kw)
        w = jnp.cos(jnp.arange(y.size, dtype=jnp.float32)).reshape(y.shape)  # fixed random-ish weights
        return jnp.sum(y.astype(jnp.float32) * w)

    return f


CASES = [  # b, t, h, p, g, n, K, offset
    (2, 21, 4, 3, 1, 5, 4, 0),
    (1, 37, 4, 2, 2, 4, 8, 5),
    (2, 13, 2, 3, 1, 3, 1, 0),
    (1, 50, 8, 4, 2, 6, 16, 14),
    (1, 9, 2, 2, 1, 2, 5, 4),
]


@pytest.mark.parametrize("impl", ["associative", "chunked"])
@pytest.mark.parametrize("case", CASES)
def test_fixed_grid_matches_sequential(impl, case):
    b, t, h, p, g, n, K, o = case
    key = jax.random.key(hash(case) % 2**31)
    args, _ = random_inputs(key, b, t, h, p, g, n)
    grid = ChunkGrid(K, o)
    run = jax.jit(lambda impl, *a: ssd(*a, grid=grid, implementation=impl), static_argnums=0)
    ref = run("sequential", *args)
    out = run(impl, *args)
    assert out.shape == (b, t, h, p)
    assert_close(out, ref, 1e-5)
    g_ref = jax.jit(jax.grad(_loss("sequential", grid=grid), argnums=range(6)))(*args)
    g_out = jax.jit(jax.grad(_loss(impl, grid=grid), argnums=range(6)))(*args)
    assert_close(g_out, g_ref, 1e-5)


def test_associative_scan_matches_sequential_on_variable_chunks():
    # Given random variable-length chunk sets, different per batch row (the scans take any resets)
    b, t, h, p, g, n = 3, 24, 4, 2, 2, 3
    args, _ = random_inputs(jax.random.key(7), b, t, h, p, g, n)
    reset = jax.random.bernoulli(jax.random.key(8), 0.25, (b, t)).at[:, 0].set(True)
    sequential = lambda *a: ssd_sequential(*a, reset)[0]
    associative = lambda *a: xla.ssd_associative(*a, reset)
    # Then the associative scan equals the sequential one, forward and gradient
    assert_close(associative(*args), sequential(*args), 1e-5)
    loss = lambda f: lambda *a: jnp.sum(jnp.sin(f(*a)))
    g_ref = jax.jit(jax.grad(loss(sequential), argnums=range(6)))(*args)
    g_out = jax.jit(jax.grad(loss(associative), argnums=range(6)))(*args)
    assert_close(g_out, g_ref, 1e-5)


def test_reset_really_restarts_the_state():
    # Given resets at every token, the output is the single-token recurrence.
    b, t, h, p, g, n = 1, 6, 2, 2, 1, 3
    (x, dt, A, B, C, D), _ = random_inputs(jax.random.key(1), b, t, h, p, g, n)
    y = ssd_sequential(x, dt, A, B, C, D, jnp.ones((b, t), bool))[0]
    bc = jnp.einsum("btn,btn->bt", B[:, :, 0], C[:, :, 0])[:, :, None, None]  # one group
    expect = dt[..., None] * x * bc + D[:, None] * x
    assert_close(y, expect, 1e-5)


def test_chunked_in_bfloat16_is_close():
    args, _ = random_inputs(jax.random.key(3), 2, 33, 4, 4, 1, 8)
    grid = ChunkGrid(8, 3)
    ref = ssd(*args, grid=grid, implementation="sequential")
    bf = [a.astype(jnp.bfloat16) if i in (0, 3, 4) else a for i, a in enumerate(args)]
    assert_close(ssd(*bf, grid=grid, implementation="chunked"), ref, 3e-2)


def test_sequential_returns_final_state_of_last_chunk():
    b, t, h, p, g, n = 1, 12, 2, 2, 1, 3
    (x, dt, A, B, C, D), _ = random_inputs(jax.random.key(2), b, t, h, p, g, n)
    grid = ChunkGrid(4, 1)  # boundaries 0, 2, 6, 10: token 11 starts a new chunk
    reset = jnp.asarray(grid.is_chunk_start(np.arange(t)))[None]
    _, final = ssd_sequential(x, dt, A, B, C, D, reset)
    expect = (dt[0, 11][:, None] * x[0, 11])[..., None] * B[0, 11, 0][None, None, :]
    assert_close(final[0], expect, 1e-6)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: (*a[:1], a[1][:, :4], *a[2:]), "dt must have shape"),
        (lambda a: (*a[:3], a[3][:, :4], *a[4:]), "B and C must both be"),
        (lambda a: (a[0][0], *a[1:]), "x must be \\[batch, length, heads, head_dim\\]"),
    ],
)
def test_bad_shapes_name_the_problem(change, message):
    args, _ = random_inputs(jax.random.key(0), 1, 8, 2, 2, 1, 3)
    with pytest.raises(ValueError, match=message):
        ssd(*change(args), grid=ChunkGrid(4))


def test_an_unknown_implementation_is_named():
    args, _ = random_inputs(jax.random.key(0), 1, 8, 2, 2, 1, 3)
    with pytest.raises(ValueError, match="unknown implementation 'magic'"):
        ssd(*args, grid=ChunkGrid(4), implementation="magic")
