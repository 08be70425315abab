"""The one public entry point of the SSMs' input side: ``ssm_conv(zxbcdt, ..., sizes=)``."""

from __future__ import annotations

import typing
from typing import Literal

import jax
import jax.numpy as jnp

from pallas_kernels import dispatch
from pallas_kernels.ssm_conv import pallas_gpu, reference
from pallas_kernels.ssm_sizes import SsmSizes

SsmConvImplementation = Literal["pallas_gpu", "xla", "pallas_gpu_interpret"]

# In auto's order: the backend's kernel, then XLA.
IMPLEMENTATIONS: dict[str, dispatch.Implementation] = dispatch.gpu_kernel_and_xla(
    pallas_gpu.ssm_conv_pallas_gpu, reference.ssm_conv_reference
)
assert tuple(IMPLEMENTATIONS) == typing.get_args(SsmConvImplementation)


def _check_shapes(zxbcdt, conv_weight, dt_bias, position_in_chunk, sizes):
    s = sizes.streams
    if zxbcdt.ndim != 3 or zxbcdt.shape[2] != s * sizes.projection:
        raise ValueError(
            f"ssm_conv: zxbcdt must be [batch, length, {s * sizes.projection}] for {sizes}, got {zxbcdt.shape}"
        )
    b, t = zxbcdt.shape[:2]
    if conv_weight.ndim != 2 or conv_weight.shape[0] != s * sizes.conv_channels:
        raise ValueError(f"ssm_conv: conv_weight must be [{s * sizes.conv_channels}, width], got {conv_weight.shape}")
    if dt_bias is not None and dt_bias.shape != (s * sizes.heads,):
        raise ValueError(f"ssm_conv: dt_bias must have shape {(s * sizes.heads,)}, got {dt_bias.shape}")
    if position_in_chunk.shape not in ((t,), (b, t)):
        raise ValueError(f"ssm_conv: position_in_chunk must be [{t}] or [{b}, {t}], got {position_in_chunk.shape}")


def ssm_conv(
    zxbcdt: jax.Array,
    conv_weight: jax.Array,
    dt_bias: jax.Array | None,
    position_in_chunk: jax.Array,
    *,
    sizes: SsmSizes,
    implementation: SsmConvImplementation | Literal["auto"] = "auto",
    partitioned: bool = False,
) -> tuple[jax.Array, ...]:
    """The SSD's inputs from the in-projection of ``sizes.streams`` SSMs (the math: ``reference``).

    Args:
      zxbcdt: [B, T, S·(2I + 2GN + H)]: per token and stream ``[z | x B C | dt]`` (dt before
        softplus and bias).
      conv_weight: [S·(I + 2GN), w] the depthwise conv (last tap: the current token);
        dt_bias: [S·H] or None (no bias).
      position_in_chunk: [T] or [B, T] ints, each token's distance from its chunk's first token
        (0: the conv restarts there).
      implementation: ``auto`` (the GPU kernel on a GPU, else ``xla``) or a name of
        ``SsmConvImplementation``.
      partitioned: the arrays span several devices and XLA partitions this call (``auto``
        takes ``xla``).

    Returns:
      z [B, T, S·I], x [B, T, S·H, P], B and C [B, T, S·G, N] (all in zxbcdt.dtype; the kernel
      computes the conv in float32, the XLA path in zxbcdt's dtype) and dt [B, T, S·H] float32. Differentiable in zxbcdt, conv_weight and
      dt_bias.
    """
    position_in_chunk = jnp.asarray(position_in_chunk, jnp.int32)
    args = (zxbcdt, conv_weight, dt_bias, position_in_chunk)
    _check_shapes(*args, sizes)
    target = dispatch.Target.here(partitioned)
    name = dispatch.choose("ssm_conv", IMPLEMENTATIONS, implementation, target, *args, sizes=sizes)
    return IMPLEMENTATIONS[name].run(*args, sizes=sizes)
