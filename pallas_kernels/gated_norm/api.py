"""The one public entry point of the gated grouped RMSNorm: ``gated_norm(y, z, weight, ...)``."""

from __future__ import annotations

import typing
from typing import Literal

import jax

from pallas_kernels import dispatch
from pallas_kernels.gated_norm import pallas_gpu, reference

GatedNormImplementation = Literal["pallas_gpu", "xla", "pallas_gpu_interpret"]

# In auto's order: the backend's kernel, then XLA.
IMPLEMENTATIONS: dict[str, dispatch.Implementation] = dispatch.gpu_kernel_and_xla(
    pallas_gpu.gated_norm_pallas_gpu, reference.gated_norm_reference
)
assert tuple(IMPLEMENTATIONS) == typing.get_args(GatedNormImplementation)


def gated_norm(
    y: jax.Array,
    z: jax.Array,
    weight: jax.Array,
    *,
    groups: int,
    eps: float,
    implementation: GatedNormImplementation | Literal["auto"] = "auto",
    partitioned: bool = False,
) -> jax.Array:
    """``RMSNorm_groups(y * silu(z)) * weight`` over the last axis (the math: ``reference``).

    Args:
      y, z: [..., C] (the SSMs' outputs and their gates); weight: [C].
      groups: the norm's groups of C/groups consecutive channels, each normalised alone.
      eps: added to each group's mean square.
      implementation: ``auto`` (the GPU kernel on a GPU, else ``xla``) or a name of
        ``GatedNormImplementation``.
      partitioned: the arrays span several devices and XLA partitions this call (``auto``
        takes ``xla``).

    Returns:
      [..., C] in y.dtype; the norm in float32, the gate too in the kernel (in the inputs' dtype on
      the XLA path). Differentiable in y, z and weight.
    """
    c = y.shape[-1]
    if z.shape != y.shape or weight.shape != (c,):
        raise ValueError(
            f"gated_norm: z must have y's shape {y.shape} and weight ({c},), got {z.shape} and {weight.shape}"
        )
    if groups < 1 or c % groups:
        raise ValueError(f"gated_norm: groups ({groups}) must divide the channels ({c})")
    target = dispatch.Target.here(partitioned)
    name = dispatch.choose("gated_norm", IMPLEMENTATIONS, implementation, target, y, z, weight, groups=groups, eps=eps)
    return IMPLEMENTATIONS[name].run(y, z, weight, groups=groups, eps=eps)
