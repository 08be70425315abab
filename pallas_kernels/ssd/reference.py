"""The ground truth: the SSD recurrence, one token at a time under ``lax.scan``.

    h_t = exp(dt_t * A) * (1 - reset_t) * h_{t-1} + dt_t * (x_t ⊗ B_t)     h: [H, P, N]
    y_t = h_t · C_t + D * x_t

Everything is computed in float32.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

_HI = jax.lax.Precision.HIGHEST


def expand_groups(m: jax.Array, n_heads: int) -> jax.Array:
    """[B, T, G, N] -> [B, T, H, N]: head h reads group h // (H // G)."""
    return jnp.repeat(m, n_heads // m.shape[2], axis=2)


def ssd_sequential(x, dt, A, B, C, D, reset, initial_state=None):
    """Sequential scan.

    Args:
      x: [B, T, H, P] inputs.
      dt: [B, T, H] positive step sizes (softplus already applied).
      A: [H] negative decay rates.
      B, C: [B, T, G, N] input and output projections, H % G == 0.
      D: [H] skip weights.
      reset: [B, T] bool, True where the state restarts before the token.
      initial_state: optional [B, H, P, N] state before token 0.

    Returns:
      (y [B, T, H, P] in x.dtype, final_state [B, H, P, N] float32).
    """
    b, t, h, p = x.shape
    n = B.shape[-1]
    f32 = jnp.float32
    Bh = expand_groups(B, h).astype(f32)
    Ch = expand_groups(C, h).astype(f32)
    decay = jnp.exp(dt.astype(f32) * A.astype(f32)) * (1.0 - reset.astype(f32))[..., None]
    inputs = (
        jnp.swapaxes(x.astype(f32), 0, 1),
        jnp.swapaxes(dt.astype(f32), 0, 1),
        jnp.swapaxes(decay, 0, 1),
        jnp.swapaxes(Bh, 0, 1),
        jnp.swapaxes(Ch, 0, 1),
    )

    def step(state, inp):
        x_t, dt_t, decay_t, b_t, c_t = inp  # [B,H,P], [B,H], [B,H], [B,H,N], [B,H,N]
        state = decay_t[..., None, None] * state + (dt_t[..., None] * x_t)[..., None] * b_t[:, :, None, :]
        y_t = jnp.einsum("bhpn,bhn->bhp", state, c_t, precision=_HI)
        return state, y_t

    state0 = jnp.zeros((b, h, p, n), f32) if initial_state is None else initial_state.astype(f32)
    final, ys = jax.lax.scan(step, state0, inputs)
    y = jnp.swapaxes(ys, 0, 1) + D.astype(f32)[:, None] * x.astype(f32)
    return y.astype(x.dtype), final


def random_inputs(key, b, t, h, p, g, n, dtype=jnp.float32):
    """Random SSD inputs of realistic magnitudes, and a cotangent for y (tests, benchmarks).

    x, B, C ~ N(0, 1) in ``dtype``; dt = softplus(N(-1, 1)) in (0, ~3); A = -exp(U(-2, ln 16))
    in [-16, -0.14] (the paper's initialisation is [-16, -1]); D ~ N(0, 1).

    Returns:
      ((x [b,t,h,p], dt [b,t,h], A [h], B [b,t,g,n], C [b,t,g,n], D [h]), cotangent [b,t,h,p] float32).
    """
    ks = jax.random.split(key, 7)
    x = jax.random.normal(ks[0], (b, t, h, p)).astype(dtype)
    dt = jax.nn.softplus(jax.random.normal(ks[1], (b, t, h)) - 1.0)
    A = -jnp.exp(jax.random.uniform(ks[2], (h,), minval=-2.0, maxval=math.log(16.0)))
    B = jax.random.normal(ks[3], (b, t, g, n)).astype(dtype)
    C = jax.random.normal(ks[4], (b, t, g, n)).astype(dtype)
    D = jax.random.normal(ks[5], (h,))
    return (x, dt, A, B, C, D), jax.random.normal(ks[6], (b, t, h, p))
