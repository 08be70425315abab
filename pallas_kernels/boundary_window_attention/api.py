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


def _table(gpu, tpu, compressed, dense=None) -> dict[str, dispatch.Implementation]:
    """An op's implementations in auto's order: the backend's kernel, then the XLA path (then the
    dense reference, and the kernels in the Pallas interpreter, which auto never takes)."""
    table = {
        "pallas_gpu": dispatch.Implementation(gpu, dispatch.pallas_kernel("gpu"), single_device=True),
        "pallas_tpu": dispatch.Implementation(tpu, dispatch.pallas_kernel("tpu"), single_device=True),
        "compressed": dispatch.Implementation(compressed),
    }
    if dense is not None:
        table["dense"] = dispatch.Implementation(dense)
    interpreted = dict(single_device=True, in_auto=False)
    table["pallas_gpu_interpret"] = dispatch.Implementation(
        functools.partial(gpu, interpret=True), dispatch.pallas_kernel(None), **interpreted
    )
    table["pallas_tpu_interpret"] = dispatch.Implementation(
        lambda *a, **kw: tpu(*a, **kw, interpret=tpu_interpret_params()), dispatch.pallas_kernel(None), **interpreted
    )
    return table


IMPLEMENTATIONS = _table(
    pallas_gpu.attention_pallas_gpu,
    pallas_tpu.attention_pallas_tpu,
    xla.attention_compressed,
    reference.attention_dense,
)
# For rows that are slices of longer sequences: the same names but ``dense``, whose mask is that of
# whole sequences.
ROW_IMPLEMENTATIONS = _table(
    pallas_gpu.attention_of_rows_pallas_gpu, pallas_tpu.attention_of_rows_pallas_tpu, xla.attention_of_rows
)
assert tuple(IMPLEMENTATIONS) == typing.get_args(AttentionImplementation)
assert tuple(ROW_IMPLEMENTATIONS) == tuple(n for n in typing.get_args(AttentionImplementation) if n != "dense")


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


def boundary_window_attention_of_rows(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    boundaries: tuple[jax.Array, jax.Array],
    documents: tuple[jax.Array, jax.Array, jax.Array],
    *,
    grid: ChunkGrid,
    window: int,
    row_offset: jax.Array,
    implementation: AttentionImplementation | Literal["auto"] = "auto",
    partitioned: bool = False,
) -> jax.Array:
    """``boundary_window_attention`` of rows that are slices of longer sequences (a context
    shard's pieces), with the keys from outside the slices given.

    Args:
      q: [R, T, H, D]; query t of row r is at position ``row_offset[r] + t`` of its sequence
        (``row_offset`` [R] int, multiples of K).
      k, v: [R, Q + T, Hkv, D], Q >= W: the keys at positions ``row_offset - Q`` ..
        ``row_offset + T - 1`` (positions below 0 are never seen). ``xla.attention_of_rows``
        needs Q = ``xla.window_block_size(W)``; the kernels take any Q >= W.
      boundaries: (kb, vb [R, NB, Hkv, D]): the sequence's first NB boundaries in arrival order
        (``kb[:, n]`` is the key at ``grid.position(n)``), NB at least those before the last
        query's window.
      documents: (kd, vd [R, T, Hkv, D], starts [R, T] int): each query's document start in its
        sequence (a multiple of K) and the key and value there.
      implementation, partitioned: as ``boundary_window_attention``.

    Returns:
      [R, T, H, D] in q.dtype.
    """
    kb, vb = boundaries
    kd, vd, starts = documents
    if q.ndim != 4 or k.shape != v.shape or kb.shape != vb.shape or kd.shape != vd.shape:
        raise ValueError(f"attention of rows: q {q.shape}, k {k.shape}, v {v.shape}, kb {kb.shape}, kd {kd.shape}")
    r, t = q.shape[:2]
    if k.shape[0] != r or k.shape[1] < t + window or kb.shape[0] != r or kd.shape[:2] != (r, t):
        raise ValueError(
            f"attention of rows: for q {q.shape}, k and v need [{r}, >= {t} + W={window}, Hkv, D], kb [{r}, NB, Hkv, D] "
            f"and kd [{r}, {t}, Hkv, D]; got k {k.shape}, kb {kb.shape}, kd {kd.shape}"
        )
    check_layout(starts, r, t)
    target = dispatch.Target.here(partitioned)
    kw = dict(grid=grid, window=window, row_offset=jnp.asarray(row_offset, jnp.int32))
    args = (q, k, v, boundaries, (kd, vd, starts.astype(jnp.int32)))
    name = dispatch.choose("attention of rows", ROW_IMPLEMENTATIONS, implementation, target, *args, **kw)
    return ROW_IMPLEMENTATIONS[name].run(*args, **kw)
