"""The one public entry point of the Mamba-2 block core (conv, SSD, gate, norm)."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax

from attamba_jax.chunking import ChunkGrid
from attamba_jax.sharding import per_shard
from pallas_kernels import ssd as ssd_op
from pallas_kernels.ssd.api import auto_implementations as ssd_auto_implementations
from pallas_kernels.ssm_block import pallas_gpu
from pallas_kernels.ssm_block.reference import SsmDims, ssm_block_composed

# The fused kernel, in the interpreter too (CPU; tests, debugging); every other name is the SSD
# core's implementation inside the composition of separate ops.
FUSED = {
    "pallas_gpu_fused": pallas_gpu.ssm_block_pallas_gpu,
    "pallas_gpu_fused_interpret": functools.partial(pallas_gpu.ssm_block_pallas_gpu, interpret=True),
}
IMPLEMENTATIONS = tuple(FUSED) + ssd_op.IMPLEMENTATIONS


def auto_implementations(backend: str | None = None) -> tuple[str, ...]:
    """What ``auto`` tries: the SSD core's own order (``pallas_kernels.ssd.api.auto_implementations``)
    inside the composition. The fused kernel is opt-in: on the H200 it measured slower than the
    composition around the SSD kernel (BENCHMARKS.md)."""
    return ssd_auto_implementations(backend or jax.default_backend())


def ssm_block(
    zxbcdt: jax.Array,
    conv_weight: jax.Array,
    dt_bias: jax.Array | None,
    A: jax.Array,
    D: jax.Array,
    norm_weight: jax.Array,
    *,
    dims: SsmDims,
    grid: ChunkGrid,
    eps: float,
    implementation: str | Sequence[str] = "auto",
) -> jax.Array:
    """Chunk-local conv + silu, softplus(dt), chunk-reset SSD, gate and grouped RMSNorm.

    Args:
      zxbcdt: [B, T, S, width] the input projection's output, S independent streams, each row
        ``[z | x | B | C | dt]`` (``SsmDims.width``).
      conv_weight: [S·(I+2GN), W]; dt_bias: [S·Hs] or None; A (negative), D: [S·Hs];
        norm_weight: [S·I] (S·G groups of I/G channels).
      dims: per-stream sizes; grid: the layer's chunk grid; eps: the norm's epsilon.
      implementation: ``auto`` (``auto_implementations()``), a name of ``IMPLEMENTATIONS`` or an
        ordered list of names: ``pallas_gpu_fused`` runs the one fused kernel where its sizes
        allow (``pallas_gpu.supports``); any SSD implementation runs the separate XLA ops
        around that SSD core.

    Returns:
      [B, T, S, I] in zxbcdt.dtype.
    """
    if zxbcdt.ndim != 4 or zxbcdt.shape[-1] != dims.width:
        raise ValueError(f"ssm_block: zxbcdt must be [batch, length, streams, {dims.width}], got {zxbcdt.shape}")
    candidates = ssm_block_implementations(implementation)
    for i, name in enumerate(candidates):
        if name not in IMPLEMENTATIONS:
            raise ValueError(f"ssm_block: unknown implementation {name!r}; choose from {IMPLEMENTATIONS} or 'auto'")
        if name in FUSED:
            if pallas_gpu.supports(dims, grid, 16) is not None:
                continue
            fused = functools.partial(FUSED[name], dims=dims, grid=grid, eps=eps)
            kernel = lambda zx, cw, a, d, nw, *bias: fused(zx, cw, bias[0] if bias else None, a, d, nw)
            args = (zxbcdt, conv_weight, A, D, norm_weight) + (() if dt_bias is None else (dt_bias,))
            rows = ("batch", None, None, None)
            return per_shard(kernel, args, (rows,) + (None,) * (len(args) - 1), rows)
        rest = [c for c in candidates[i:] if c not in FUSED]
        return ssm_block_composed(zxbcdt, conv_weight, dt_bias, A, D, norm_weight, dims=dims, grid=grid, eps=eps,
                                  ssd_implementation=rest)
    raise ValueError(f"ssm_block: none of {candidates} applies to these sizes")


def ssm_block_implementations(implementation: str | Sequence[str]) -> tuple[str, ...]:
    if implementation == "auto":
        return auto_implementations()
    return (implementation,) if isinstance(implementation, str) else tuple(implementation)
