"""The one public entry point of Attamba's boundary + window attention."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax

from attamba_jax.chunking import ChunkGrid
from attamba_jax.sharding import active_mesh, logical_to_spec, per_shard, spans_devices
from pallas_kernels.chunked_attention import pallas_gpu, pallas_tpu, reference, xla

# ``pallas_*_interpret`` run the same kernels in the Pallas interpreter (CPU; tests, debugging).
IMPLEMENTATIONS = ("pallas_gpu", "pallas_tpu", "compressed", "dense", "pallas_gpu_interpret", "pallas_tpu_interpret")
_RUN = {
    "pallas_gpu": pallas_gpu.chunked_attention_pallas_gpu,
    "pallas_tpu": pallas_tpu.chunked_attention_pallas_tpu,
    "compressed": xla.chunked_attention_compressed,
    "dense": reference.chunked_attention_dense,
    "pallas_gpu_interpret": functools.partial(pallas_gpu.chunked_attention_pallas_gpu, interpret=True),
    "pallas_tpu_interpret": functools.partial(pallas_tpu.chunked_attention_pallas_tpu, interpret=pallas_tpu.interpret_params()),
}


def auto_implementations(backend: str | None = None) -> tuple[str, ...]:
    """What ``auto`` picks: the backend's Pallas kernel on GPU/TPU, the XLA ``compressed`` path elsewhere
    and, until the sharded kernels are measured there, under a multi-device mesh
    (``sharding.spans_devices``). A kernel named explicitly runs per device (``_sharded``)."""
    backend = backend or jax.default_backend()
    if spans_devices():
        return ("compressed",)
    return {"gpu": ("pallas_gpu",), "cuda": ("pallas_gpu",), "tpu": ("pallas_tpu",)}.get(backend, ("compressed",))


def chunked_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    grid: ChunkGrid,
    window: int,
    implementation: str | Sequence[str] = "auto",
) -> jax.Array:
    """Query t attends to key s iff (s < t and s is a boundary of ``grid``) or t-W <= s <= t.

    Args:
      q: [B, T, H, D] (after RoPE); k, v: [B, T, Hkv, D], H % Hkv == 0.
      grid: the layer's chunk grid. window: W >= 0.
      implementation: ``auto`` (``auto_implementations()``), one name of
        ``IMPLEMENTATIONS`` or an ordered list (the first name runs).

    Returns:
      [B, T, H, D] in q.dtype; scale 1/sqrt(D), softmax in float32.
    """
    if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape:
        raise ValueError(f"chunked_attention: q [B,T,H,D] and k, v [B,T,Hkv,D] expected, got {q.shape}, {k.shape}, {v.shape}")
    if q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"chunked_attention: q {q.shape} and k {k.shape} disagree on batch, length or head_dim")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"chunked_attention: query heads ({q.shape[2]}) must be a multiple of kv heads ({k.shape[2]})")
    if window < 0:
        raise ValueError(f"chunked_attention: window must be >= 0, got {window}")
    candidates = auto_implementations() if implementation == "auto" else (
        (implementation,) if isinstance(implementation, str) else tuple(implementation)
    )
    for name in candidates:
        if name not in _RUN:
            raise ValueError(f"chunked_attention: unknown implementation {name!r}; choose from {IMPLEMENTATIONS} or 'auto'")
        if name.startswith("pallas"):
            return _sharded(functools.partial(_RUN[name], grid=grid, window=window), q, k, v)
        return _RUN[name](q, k, v, grid, window)
    raise ValueError("chunked_attention: empty implementation list")


def _sharded(kernel, q, k, v):
    """The single-device kernel once per device under a multi-device mesh (``sharding.per_shard``):
    batch rows split like the activations, heads over ``tensor`` when the kv heads divide (query
    head h reads kv head h // (H/Hkv), so q's heads split only together with k's and v's)."""
    active = active_mesh()
    kv_heads = None
    if active is not None:
        mesh, rules = active
        kv_heads = "kv" if logical_to_spec(("batch", None, "kv", None), k.shape, mesh, rules)[2] is not None else None
    q_axes = ("batch", None, "kv" if kv_heads else None, None)  # q's heads split exactly as k's
    kv_axes = ("batch", None, kv_heads, None)
    return per_shard(kernel, (q, k, v), (q_axes, kv_axes, kv_axes), q_axes)
