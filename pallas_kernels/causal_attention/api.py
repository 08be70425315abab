"""The one public entry point of causal attention, through ``jax.nn.dot_product_attention``.

Its ground truth is ``masked_attention`` under ``Visibility(None, window).dense(T)``.
"""

from __future__ import annotations

import functools
import typing
from typing import Literal

import jax
import jax.numpy as jnp

from pallas_kernels import dispatch

CausalImplementation = Literal["cudnn", "xla"]


def _run(q, k, v, *, window: int | None, implementation: str):
    local = None if window is None else (window, 0)
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, local_window_size=local, implementation=implementation)


def _cudnn_unsupported(target, q, k, v, *, window):
    d = q.shape[-1]
    if target.backend != "gpu":
        return f"it runs on gpu, not on {target.backend}"
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        return f"it takes 16-bit inputs, not {q.dtype}"
    if d % 8 or d > 256:
        return f"it takes head_dim a multiple of 8 up to 256, not {d}"
    return None


# In auto's order: cuDNN's flash attention where it applies, else XLA.
IMPLEMENTATIONS: dict[str, dispatch.Implementation] = {
    "cudnn": dispatch.Implementation(functools.partial(_run, implementation="cudnn"), _cudnn_unsupported),
    "xla": dispatch.Implementation(functools.partial(_run, implementation="xla")),
}
assert tuple(IMPLEMENTATIONS) == typing.get_args(CausalImplementation)


def causal_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    window: int | None = None,
    implementation: CausalImplementation | Literal["auto"] = "auto",
) -> jax.Array:
    """Query t attends to keys t-W .. t (``window`` W; None: every earlier key).

    Args:
      q: [B, T, H, D]; k, v: [B, T, Hkv, D], H % Hkv == 0.
      implementation: ``auto`` (cuDNN flash attention on a GPU where it applies: 16-bit inputs,
        head_dim a multiple of 8 up to 256; XLA otherwise) or one name of ``CausalImplementation``.

    Returns:
      [B, T, H, D] in q.dtype.
    """
    name = dispatch.choose(
        "causal_attention", IMPLEMENTATIONS, implementation, dispatch.Target.here(), q, k, v, window=window
    )
    return IMPLEMENTATIONS[name].run(q, k, v, window=window)
