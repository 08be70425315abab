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
from pallas_kernels.documents import check_layout

CausalImplementation = Literal["cudnn", "xla"]


def _run(q, k, v, *, window: int | None, document_start, implementation: str):
    local = None if window is None else (window, 0)
    # jax.nn.dot_product_attention takes no segment ids (jax 0.10, 0.11): packed documents go in
    # as a [B, 1, T, T] mask, key s visible to query t when s is in t's document.
    mask = None
    if document_start is not None:
        mask = (jnp.arange(q.shape[1])[None, None, :] >= document_start[:, :, None])[:, None]
    return jax.nn.dot_product_attention(
        q, k, v, mask=mask, is_causal=True, local_window_size=local, implementation=implementation
    )


def _cudnn_unsupported(target, q, k, v, *, window, document_start=None):
    d = q.shape[-1]
    if target.backend != "gpu":
        return f"it runs on gpu, not on {target.backend}"
    if target.partitioned:
        return "the query length is split over devices (context parallelism), which XLA's own attention partitions"
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
    document_start: jax.Array | None = None,
    implementation: CausalImplementation | Literal["auto"] = "auto",
    partitioned: bool = False,
) -> jax.Array:
    """Query t attends to keys t-W .. t (``window`` W; None: every earlier key).

    Args:
      q: [B, T, H, D]; k, v: [B, T, Hkv, D], H % Hkv == 0.
      document_start: [B, T] int, each token's document start in a packed row
        (``pallas_kernels.documents``; any layout): a query sees only keys of its own document.
      implementation: ``auto`` (cuDNN flash attention on a GPU where it applies: 16-bit inputs,
        head_dim a multiple of 8 up to 256; XLA otherwise) or one name of ``CausalImplementation``.
      partitioned: the query length is split over devices and XLA partitions this call (context
        parallelism: q holds a shard of the length per device, k and v every position); ``auto``
        then takes XLA.

    Returns:
      [B, T, H, D] in q.dtype.
    """
    if document_start is not None:
        check_layout(document_start, *q.shape[:2])
    kw = dict(window=window, document_start=document_start)
    name = dispatch.choose(
        "causal_attention", IMPLEMENTATIONS, implementation, dispatch.Target.here(partitioned), q, k, v, **kw
    )
    return IMPLEMENTATIONS[name].run(q, k, v, **kw)
