"""The one public entry point of Attamba's boundary + window attention."""

from __future__ import annotations

import functools
import typing
from typing import Literal

import jax
import jax.numpy as jnp

from pallas_kernels import dispatch
from pallas_kernels.boundary_window_attention import pallas_gpu, pallas_tpu, reference, xla
from pallas_kernels.chunk_grid import ChunkGrid
from pallas_kernels.common import tpu_interpret_params
from pallas_kernels.documents import check_layout

# ``*_interpret``: the kernel in the Pallas interpreter (any backend; tests and debugging).
AttentionImplementation = Literal[
    "pallas_gpu", "pallas_tpu", "compressed", "dense", "pallas_gpu_interpret", "pallas_tpu_interpret"
]


# In auto's order: the backend's kernel, then the XLA path.
IMPLEMENTATIONS: dict[str, dispatch.Implementation] = {
    "pallas_gpu": dispatch.Implementation(
        pallas_gpu.attention_pallas_gpu, dispatch.pallas_kernel("gpu"), single_device=True
    ),
    "pallas_tpu": dispatch.Implementation(
        pallas_tpu.attention_pallas_tpu, dispatch.pallas_kernel("tpu"), single_device=True
    ),
    "compressed": dispatch.Implementation(xla.attention_compressed),
    "dense": dispatch.Implementation(reference.attention_dense),
    "pallas_gpu_interpret": dispatch.Implementation(
        functools.partial(pallas_gpu.attention_pallas_gpu, interpret=True),
        dispatch.pallas_kernel(None),
        single_device=True,
        in_auto=False,
    ),
    "pallas_tpu_interpret": dispatch.Implementation(
        lambda *a, **kw: pallas_tpu.attention_pallas_tpu(*a, **kw, interpret=tpu_interpret_params()),
        dispatch.pallas_kernel(None),
        single_device=True,
        in_auto=False,
    ),
}
assert tuple(IMPLEMENTATIONS) == typing.get_args(AttentionImplementation)


def boundary_window_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    grid: ChunkGrid,
    window: int,
    document_start: jax.Array | None = None,
    implementation: AttentionImplementation | Literal["auto"] = "auto",
    partitioned: bool = False,
) -> jax.Array:
    """Query t attends to key s iff (s < t and s is a boundary of ``grid``) or t-W <= s <= t.

    Args:
      q: [B, T, H, D] (after RoPE); k, v: [B, T, Hkv, D], H % Hkv == 0 (query head h reads
        kv head h // (H/Hkv)).
      grid: the layer's chunk grid. window: W >= 0.
      document_start: [B, T] int, each token's document start in a packed row
        (``pallas_kernels.documents``): a query sees only keys of its own document, under the
        rule read in that document. None: each row is one document. ``dense`` takes any layout;
        the other paths need documents to start at multiples of K.
      implementation: ``auto`` (the backend's Pallas kernel on a GPU or TPU, else
        ``compressed``) or one name of ``AttentionImplementation``.
      partitioned: the arrays span several devices and XLA partitions this call; ``auto`` then
        takes the XLA path (a kernel runs per device only under its caller's ``shard_map``).

    Returns:
      [B, T, H, D] in q.dtype; scale 1/sqrt(D), softmax in float32.
    """
    if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape:
        raise ValueError(f"attention: q [B,T,H,D] and k, v [B,T,Hkv,D] expected, got {q.shape}, {k.shape}, {v.shape}")
    if q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"attention: q {q.shape} and k {k.shape} disagree on batch, length or head_dim")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"attention: query heads ({q.shape[2]}) must be a multiple of kv heads ({k.shape[2]})")
    if window < 0:
        raise ValueError(f"attention: window must be >= 0, got {window}")
    if document_start is not None:
        check_layout(document_start, *q.shape[:2])
        document_start = document_start.astype(jnp.int32)
    target = dispatch.Target.here(partitioned)
    kw = dict(grid=grid, window=window, document_start=document_start)
    name = dispatch.choose("attention", IMPLEMENTATIONS, implementation, target, q, k, v, **kw)
    return IMPLEMENTATIONS[name].run(q, k, v, **kw)
