"""The SSD core: every implementation equals the sequential scan, forward and gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attamba_jax.chunking import ChunkGrid
from pallas_kernels.ssd import ssd
from pallas_kernels.ssd.reference import ssd_sequential
from tests.helpers import assert_close, random_ssd_inputs


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
    args = random_ssd_inputs(key, b, t, h, p, g, n)
    grid = ChunkGrid(K, o)
    run = jax.jit(lambda impl, *a: ssd(*a, grid=grid, implementation=impl), static_argnums=0)
    ref = run("sequential", *args)
    out = run(impl, *args)
    assert out.shape == (b, t, h, p)
    assert_close(out, ref, 1e-5)
    g_ref = jax.jit(jax.grad(_loss("sequential", grid=grid), argnums=range(6)))(*args)
    g_out = jax.jit(jax.grad(_loss(impl, grid=grid), argnums=range(6)))(*args)
    assert_close(g_out, g_ref, 1e-5)


def test_associative_matches_sequential_on_variable_chunks():
    # Random variable-length chunk sets, different per batch row.
    b, t, h, p, g, n = 3, 24, 4, 2, 2, 3
    args = random_ssd_inputs(jax.random.key(7), b, t, h, p, g, n)
    reset = jax.random.bernoulli(jax.random.key(8), 0.25, (b, t)).at[:, 0].set(True)
    ref = ssd(*args, reset=reset, implementation="sequential")
    assert_close(ssd(*args, reset=reset, implementation="associative"), ref, 1e-5)
    g_ref = jax.jit(jax.grad(_loss("sequential", reset=reset), argnums=range(6)))(*args)
    g_out = jax.jit(jax.grad(_loss("associative", reset=reset), argnums=range(6)))(*args)
    assert_close(g_out, g_ref, 1e-5)


def test_reset_really_restarts_the_state():
    # Given resets at every token, the output is the single-token recurrence.
    b, t, h, p, g, n = 1, 6, 2, 2, 1, 3
    x, dt, A, B, C, D = random_ssd_inputs(jax.random.key(1), b, t, h, p, g, n)
    y = ssd(x, dt, A, B, C, D, reset=jnp.ones((t,), bool), implementation="sequential")
    bc = jnp.einsum("btn,btn->bt", B[:, :, 0], C[:, :, 0])[:, :, None, None]  # one group
    expect = dt[..., None] * x * bc + D[:, None] * x
    assert_close(y, expect, 1e-5)


def test_chunked_in_bfloat16_is_close():
    args = random_ssd_inputs(jax.random.key(3), 2, 33, 4, 4, 1, 8)
    grid = ChunkGrid(8, 3)
    ref = ssd(*args, grid=grid, implementation="sequential")
    bf = [a.astype(jnp.bfloat16) if i in (0, 3, 4) else a for i, a in enumerate(args)]
    assert_close(ssd(*bf, grid=grid, implementation="chunked"), ref, 3e-2)


def test_sequential_returns_final_state_of_last_chunk():
    b, t, h, p, g, n = 1, 12, 2, 2, 1, 3
    x, dt, A, B, C, D = random_ssd_inputs(jax.random.key(2), b, t, h, p, g, n)
    grid = ChunkGrid(4, 1)  # boundaries 0, 2, 6, 10: token 11 starts a new chunk
    reset = jnp.asarray(grid.is_chunk_start(np.arange(t)))[None]
    _, final = ssd_sequential(x, dt, A, B, C, D, reset)
    expect = (dt[0, 11][:, None] * x[0, 11])[..., None] * B[0, 11, 0][None, None, :]
    assert_close(final[0], expect, 1e-6)


def test_errors_name_the_problem():
    args = random_ssd_inputs(jax.random.key(0), 1, 8, 2, 2, 1, 3)
    with pytest.raises(ValueError, match="exactly one of grid"):
        ssd(*args)
    with pytest.raises(ValueError, match="needs grid"):
        ssd(*args, reset=jnp.ones(8, bool), implementation="chunked")
    with pytest.raises(ValueError, match="unknown implementation"):
        ssd(*args, grid=ChunkGrid(4), implementation="magic")
    with pytest.raises(ValueError, match="dt must have shape"):
        ssd(args[0], args[1][:, :4], *args[2:], grid=ChunkGrid(4))
