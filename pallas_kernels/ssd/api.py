"""The one public entry point of the SSD core."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from attamba_jax.chunking import ChunkGrid
from attamba_jax.sharding import per_shard, spans_devices
from pallas_kernels.ssd import pallas_gpu, pallas_tpu, reference, xla

# ``pallas_*_interpret`` run the same kernels in the Pallas interpreter (CPU; tests, debugging).
IMPLEMENTATIONS = (
    "pallas_gpu", "pallas_tpu", "chunked", "associative", "sequential", "pallas_gpu_interpret", "pallas_tpu_interpret",
)
_PALLAS = {
    "pallas_gpu": pallas_gpu.ssd_pallas_gpu,
    "pallas_tpu": pallas_tpu.ssd_pallas_tpu,
    "pallas_gpu_interpret": functools.partial(pallas_gpu.ssd_pallas_gpu, interpret=True),
    "pallas_tpu_interpret": functools.partial(pallas_tpu.ssd_pallas_tpu, interpret=pallas_tpu.interpret_params()),
}


def auto_implementations(backend: str | None = None) -> tuple[str, ...]:
    """What ``auto`` tries, in order: the backend's Pallas kernel, then the XLA paths.

    Under a multi-device mesh (``sharding.spans_devices``) the XLA paths only, until the
    sharded kernels are measured there; a kernel named explicitly runs per device
    (``sharding.per_shard``, batch rows split like the activations).
    """
    backend = backend or jax.default_backend()
    kernel = {"gpu": ("pallas_gpu",), "cuda": ("pallas_gpu",), "tpu": ("pallas_tpu",)}.get(backend, ())
    if spans_devices():
        kernel = ()
    return kernel + ("chunked", "associative", "sequential")


def _reset_from_grid(grid: ChunkGrid, batch: int, length: int) -> jax.Array:
    reset = grid.is_chunk_start(np.arange(length))
    return jnp.broadcast_to(jnp.asarray(reset), (batch, length))


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
    grid: ChunkGrid | None = None,
    reset: jax.Array | None = None,
    implementation: str | Sequence[str] = "auto",
) -> jax.Array:
    """Mamba-2 SSD scan that restarts its state at every chunk start.

    Args:
      x: [B, T, H, P]; dt: [B, T, H] (after softplus); A: [H] (negative); B, C:
        [B, T, G, N]; D: [H].
      grid: the layer's fixed chunk grid. Exactly one of ``grid`` and ``reset``.
      reset: [T] or [B, T] bool, True where the state restarts before the token
        (any pattern, e.g. variable-length chunks). ``chunked`` and the Pallas
        kernels need ``grid``.
      implementation: ``auto`` (``auto_implementations()``: the Pallas kernel on
        GPU/TPU, XLA on CPU) or one name of ``IMPLEMENTATIONS``, or an ordered list
        of names to try (the first that applies runs).

    Returns:
      y: [B, T, H, P] in x.dtype.
    """
    _check_shapes(x, dt, A, B, C, D)
    if (grid is None) == (reset is None):
        raise ValueError("ssd: pass exactly one of grid= (fixed chunk grid) and reset= (any chunk starts)")
    b, t = x.shape[:2]
    if reset is not None:
        reset = jnp.broadcast_to(jnp.asarray(reset, bool), (b, t))
    candidates = auto_implementations() if implementation == "auto" else (
        (implementation,) if isinstance(implementation, str) else tuple(implementation)
    )
    for name in candidates:
        if name not in IMPLEMENTATIONS:
            raise ValueError(f"ssd: unknown implementation {name!r}; choose from {IMPLEMENTATIONS} or 'auto'")
        if name == "chunked" or name in _PALLAS:
            if grid is None:
                continue
            if name == "chunked":
                return xla.ssd_chunked(x, dt, A, B, C, D, grid)
            kernel = functools.partial(_PALLAS[name], grid=grid)
            rows = ("batch", None, None, None)
            return per_shard(kernel, (x, dt, A, B, C, D), (rows, rows[:3], None, rows, rows, None), rows)
        r = reset if reset is not None else _reset_from_grid(grid, b, t)
        if name == "associative":
            return xla.ssd_associative(x, dt, A, B, C, D, r)
        return reference.ssd_sequential(x, dt, A, B, C, D, r)[0]
    raise ValueError(f"ssd: none of {candidates} applies here ('chunked' needs grid=, not reset=, and so do the Pallas kernels)")
