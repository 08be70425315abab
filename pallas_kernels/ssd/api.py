"""The one public entry point of the SSD core: ``ssd(..., grid=, implementation=)``."""

from __future__ import annotations

import functools
import typing
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import dispatch
from pallas_kernels.chunk_grid import ChunkGrid
from pallas_kernels.common import tpu_interpret_params
from pallas_kernels.documents import check_layout
from pallas_kernels.ssd import pallas_gpu, pallas_tpu, reference, xla

# ``*_interpret``: the kernel in the Pallas interpreter (any backend; tests and debugging).
SsdImplementation = Literal[
    "pallas_gpu", "pallas_tpu", "chunked", "associative", "sequential", "pallas_gpu_interpret", "pallas_tpu_interpret"
]


def _resets(grid: ChunkGrid, batch: int, length: int, document_start) -> jax.Array:
    """[B, T] bool: True where the state restarts before the token (on each document's own grid)."""
    pos = np.arange(length)
    if document_start is None:
        return jnp.broadcast_to(jnp.asarray(grid.is_chunk_start(pos)), (batch, length))
    return grid.is_chunk_start(jnp.asarray(pos) - document_start)


def _scan(scan):
    """An implementation over any reset pattern, fed the grid's."""
    return lambda x, dt, A, B, C, D, *, grid, document_start: scan(
        x, dt, A, B, C, D, _resets(grid, *x.shape[:2], document_start)
    )


# In auto's order: the backend's kernel, then the XLA paths.
IMPLEMENTATIONS: dict[str, dispatch.Implementation] = {
    "pallas_gpu": dispatch.Implementation(pallas_gpu.ssd_pallas_gpu, dispatch.pallas_kernel("gpu"), single_device=True),
    "pallas_tpu": dispatch.Implementation(pallas_tpu.ssd_pallas_tpu, dispatch.pallas_kernel("tpu"), single_device=True),
    "chunked": dispatch.Implementation(xla.ssd_chunked),
    "associative": dispatch.Implementation(_scan(xla.ssd_associative)),
    "sequential": dispatch.Implementation(_scan(lambda *a: reference.ssd_sequential(*a)[0])),
    "pallas_gpu_interpret": dispatch.Implementation(
        functools.partial(pallas_gpu.ssd_pallas_gpu, interpret=True),
        dispatch.pallas_kernel(None),
        single_device=True,
        in_auto=False,
    ),
    "pallas_tpu_interpret": dispatch.Implementation(
        lambda *a, **kw: pallas_tpu.ssd_pallas_tpu(*a, **kw, interpret=tpu_interpret_params()),
        dispatch.pallas_kernel(None),
        single_device=True,
        in_auto=False,
    ),
}
assert tuple(IMPLEMENTATIONS) == typing.get_args(SsdImplementation)


def _check_shapes(x, dt, A, B, C, D):
    if x.ndim != 4:
        raise ValueError(f"ssd: x must be [batch, length, heads, head_dim], got shape {x.shape}")
    b, t, h, _ = x.shape
    if dt.shape != (b, t, h):
        raise ValueError(f"ssd: dt must have shape {(b, t, h)}, got {dt.shape}")
    if A.shape != (h,) or D.shape != (h,):
        raise ValueError(f"ssd: A and D must have shape {(h,)}, got {A.shape} and {D.shape}")
    if B.ndim != 4 or B.shape[:2] != (b, t) or B.shape != C.shape:
        raise ValueError(f"ssd: B and C must both be [{b}, {t}, groups, state], got {B.shape} and {C.shape}")
    if h % B.shape[2]:
        raise ValueError(f"ssd: heads ({h}) must be a multiple of groups ({B.shape[2]})")


def ssd(
    x: jax.Array,
    dt: jax.Array,
    A: jax.Array,
    B: jax.Array,
    C: jax.Array,
    D: jax.Array,
    *,
    grid: ChunkGrid,
    document_start: jax.Array | None = None,
    implementation: SsdImplementation | Literal["auto"] = "auto",
    partitioned: bool = False,
) -> jax.Array:
    """Mamba-2 SSD scan that restarts its state at every chunk start of ``grid``.

    Args:
      x: [B, T, H, P]; dt: [B, T, H] (after softplus); A: [H] (negative); B, C: [B, T, G, N]
        (head h reads group h // (H/G)); D: [H].
      grid: the layer's fixed chunk grid.
      document_start: [B, T] int, each token's document start in a packed row
        (``pallas_kernels.documents``): the state also restarts at each document's first token
        and then follows the document's own grid. None: each row is one document. The
        ``sequential`` and ``associative`` references take any layout; the other paths need
        documents to start at multiples of K.
      implementation: ``auto`` (the backend's Pallas kernel on a GPU or TPU, else ``chunked``)
        or one name of ``SsdImplementation``.
      partitioned: the arrays span several devices and XLA partitions this call; ``auto`` then
        takes an XLA path (a kernel runs per device only under its caller's ``shard_map``).

    Returns:
      y: [B, T, H, P] in x.dtype.
    """
    _check_shapes(x, dt, A, B, C, D)
    if document_start is not None:
        check_layout(document_start, *x.shape[:2])
        document_start = document_start.astype(jnp.int32)
    target = dispatch.Target.here(partitioned)
    kw = dict(grid=grid, document_start=document_start)
    name = dispatch.choose("ssd", IMPLEMENTATIONS, implementation, target, x, dt, A, B, C, D, **kw)
    return IMPLEMENTATIONS[name].run(x, dt, A, B, C, D, **kw)
