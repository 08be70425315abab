"""Attention: the compressed path equals the dense masked reference; causal attention equals its mask;
the Attamba module's implementations agree."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attamba_jax.attention import AttambaAttention
from attamba_jax.config import ModelConfig
from pallas_kernels.boundary_window_attention import boundary_window_attention
from pallas_kernels.causal_attention import causal_attention
from pallas_kernels.chunk_grid import ChunkGrid
from pallas_kernels.masked_attention import masked_attention
from pallas_kernels.visibility import Visibility
from tests.helpers import assert_close

CASES = [  # b, t, h, hkv, d, K, offset, W
    (2, 37, 4, 2, 8, 4, 1, 2),
    (1, 64, 4, 4, 16, 8, 3, 8),
    (2, 13, 2, 1, 8, 4, 0, 0),
    (1, 50, 4, 2, 8, 16, 5, 20),
    (1, 5, 2, 2, 4, 4, 0, 9),
    (1, 70, 8, 2, 8, 1, 0, 3),
]


def _qkv(case, dtype=jnp.float32):
    b, t, h, hkv, d = case[:5]
    ks = jax.random.split(jax.random.key(sum(case)), 3)
    return (
        jax.random.normal(ks[0], (b, t, h, d), dtype),
        jax.random.normal(ks[1], (b, t, hkv, d), dtype),
        jax.random.normal(ks[2], (b, t, hkv, d), dtype),
    )


def _attn(impl, grid, window):
    return lambda q, k, v: boundary_window_attention(q, k, v, grid=grid, window=window, implementation=impl)


@pytest.mark.parametrize("case", CASES)
def test_compressed_equals_dense(case):
    grid, window = ChunkGrid(case[5], case[6]), case[7]
    q, k, v = _qkv(case)
    dense, comp = _attn("dense", grid, window), _attn("compressed", grid, window)
    assert_close(comp(q, k, v), dense(q, k, v), 1e-5)
    wsum = lambda f: lambda *a: jnp.sum(jnp.sin(f(*a)))
    grad = lambda f: jax.jit(jax.grad(wsum(f), argnums=(0, 1, 2)))(q, k, v)
    assert_close(grad(comp), grad(dense), 1e-5)


@pytest.mark.parametrize("case", CASES[:3])
def test_compressed_bfloat16_within_1e2(case):
    grid, window = ChunkGrid(case[5], case[6]), case[7]
    q, k, v = _qkv(case)
    ref = _attn("dense", grid, window)(q, k, v)
    bf = [a.astype(jnp.bfloat16) for a in (q, k, v)]
    out = _attn("compressed", grid, window)(*bf)
    assert out.dtype == jnp.bfloat16
    assert_close(out, ref, 1e-2 * 2)  # bf16 inputs carry ~4e-3 relative rounding each


def test_invisible_keys_do_not_matter():
    # Given a query, when a key outside its mask changes, its output does not.
    case = (1, 24, 2, 2, 8, 4, 2, 3)
    grid, window = ChunkGrid(4, 2), 3
    q, k, v = _qkv(case)
    mask = Visibility(grid, window).dense(24)
    t = 20
    hidden = np.flatnonzero(~mask[t][: t + 1])
    assert hidden.size > 0
    k2 = k.at[:, hidden].add(5.0)
    v2 = v.at[:, hidden].add(5.0)
    f = _attn("compressed", grid, window)
    np.testing.assert_allclose(f(q, k, v)[:, t], f(q, k2, v2)[:, t], rtol=1e-6, atol=1e-6)
    visible = np.flatnonzero(mask[t])
    assert not np.allclose(f(q, k, v)[:, t], f(q, k, v.at[:, visible[0]].add(5.0))[:, t])


@pytest.mark.parametrize("window", [None, 4])
def test_causal_attention_is_the_masked_reference(window):
    q, k, v = _qkv((2, 19, 4, 2, 8))
    mask = jnp.asarray(Visibility(None, window).dense(19))
    assert_close(causal_attention(q, k, v, window=window, implementation="xla"), masked_attention(q, k, v, mask), 1e-5)


def _module(pseudo_chunk, impl, n_kv_heads):
    cfg = ModelConfig(
        dim=32,
        n_heads=4,
        n_kv_heads=n_kv_heads,
        head_dim=32 // n_kv_heads,
        n_layers=2,
        multiple_of=16,
        ssm_hidden_dim=48,
        ssm_heads=2,
        ssm_state_dim=4,
        token_chunk=4,
        window=3,
        pseudo_chunk=pseudo_chunk,
        attention_implementation=impl,
    )
    return AttambaAttention(cfg, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("pseudo_chunk", [False, True])
@pytest.mark.parametrize("n_kv_heads", [4, 2])
def test_module_compressed_equals_dense(pseudo_chunk, n_kv_heads):
    xn = jax.random.normal(jax.random.key(5), (2, 23, 32))
    grid = ChunkGrid(4, 1)
    pos = jnp.arange(23)
    dense, comp = _module(pseudo_chunk, "dense", n_kv_heads), _module(pseudo_chunk, "compressed", n_kv_heads)
    run = nnx.jit(lambda m, x: m(x, pos, grid)[0])
    assert_close(run(comp, xn), run(dense, xn), 1e-5)
    grads = [nnx.jit(nnx.grad(lambda m: jnp.sum(jnp.sin(m(xn, pos, grid)[0]))))(m) for m in (comp, dense)]
    # Parameter gradients are sums over B*T*channels with cancellation: float32
    # summation order alone moves small leaves (A_log, D) by ~2e-5 relative.
    assert_close(grads[0], grads[1], 1e-4)
    if pseudo_chunk:
        # pseudo_chunk: every earlier key is visible (plain causal)
        q_only = run(comp, xn.at[:, 5].add(1.0)) - run(comp, xn)
        assert float(jnp.abs(q_only[:, 22]).max()) > 0


@pytest.mark.parametrize("heads, window, message", [(3, 2, "multiple of kv heads"), (2, -1, "window must be >= 0")])
def test_window_and_heads_errors(heads, window, message):
    q, k, v = _qkv((1, 8, heads, 2, 4))
    with pytest.raises(ValueError, match=message):
        boundary_window_attention(q, k, v, grid=ChunkGrid(4), window=window)
