"""Shared test helpers."""

import chex
import jax
import jax.numpy as jnp
import numpy as np


def assert_close(actual, expected, rel: float):
    """Every leaf within ``rel`` of the expected leaf's largest magnitude (and elementwise rtol)."""

    def one(a, e):
        scale = float(jnp.max(jnp.abs(e.astype(jnp.float32)))) or 1.0
        chex.assert_trees_all_close(a.astype(jnp.float32), e.astype(jnp.float32), rtol=rel, atol=rel * scale)

    jax.tree.map(one, actual, expected)
    chex.assert_tree_all_finite(actual)


def random_ssd_inputs(key, b, t, h, p, g, n, dtype=jnp.float32):
    """Random SSD inputs with realistic magnitudes: dt in (0, ~3), A in [-16, -1]·0.1..1."""
    ks = jax.random.split(key, 6)
    x = jax.random.normal(ks[0], (b, t, h, p), dtype)
    dt = jax.nn.softplus(jax.random.normal(ks[1], (b, t, h)) - 1.0)
    A = -jnp.exp(jax.random.uniform(ks[2], (h,), minval=-2.0, maxval=1.0))
    B = jax.random.normal(ks[3], (b, t, g, n), dtype)
    C = jax.random.normal(ks[4], (b, t, g, n), dtype)
    D = jax.random.normal(ks[5], (h,))
    return x, dt, A, B, C, D


def mask_from_rows(rows: str) -> np.ndarray:
    return np.array([[c == "1" for c in row.split()[1]] for row in rows.strip().splitlines()])
