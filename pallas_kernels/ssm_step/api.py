"""The one public entry point of the SSM decode step: ``ssm_step(..., sizes=, implementation=)``."""

from __future__ import annotations

import typing
from typing import Literal

import jax
import jax.numpy as jnp

from pallas_kernels import dispatch
from pallas_kernels.ssm_sizes import SsmSizes
from pallas_kernels.ssm_step import pallas_gpu, reference

SsmStepImplementation = Literal["pallas_gpu", "xla", "pallas_gpu_interpret"]


# In auto's order: the backend's kernel, then XLA.
IMPLEMENTATIONS: dict[str, dispatch.Implementation] = dispatch.gpu_kernel_and_xla(
    pallas_gpu.ssm_step_pallas_gpu, reference.ssm_step_reference
)
assert tuple(IMPLEMENTATIONS) == typing.get_args(SsmStepImplementation)


def _check_shapes(zxbcdt, conv, scan, conv_weight, A_log, D, dt_bias, norm_weight, position_in_chunk, sizes, offset):
    s = sizes.streams
    b = zxbcdt.shape[0]
    if offset < 0:
        raise ValueError(f"ssm_step: offset must be >= 0, got {offset}")
    expect = {
        "zxbcdt": (zxbcdt, (b, offset + s * sizes.projection)),
        "scan": (scan, (b, s * sizes.heads, sizes.head_dim, sizes.state)),
        "conv_weight": (conv_weight, (s * sizes.conv_channels, conv_weight.shape[-1])),
        "conv": (conv, (b, conv_weight.shape[-1], s * sizes.conv_channels)),
        "A_log": (A_log, (s * sizes.heads,)),
        "D": (D, (s * sizes.heads,)),
        "dt_bias": (dt_bias, (s * sizes.heads,)),
        "norm_weight": (norm_weight, (s * sizes.inner,)),
        "position_in_chunk": (position_in_chunk, (b,)),
    }
    for name, (array, shape) in expect.items():
        if array.shape != shape:
            raise ValueError(f"ssm_step: {name} must have shape {shape} for {sizes}, got {array.shape}")
    if conv_weight.shape[-1] < 2:
        raise ValueError(f"ssm_step: the conv needs at least 2 taps, got {conv_weight.shape[-1]}")


def ssm_step(
    zxbcdt: jax.Array,
    conv: jax.Array,
    scan: jax.Array,
    conv_weight: jax.Array,
    A_log: jax.Array,
    D: jax.Array,
    dt_bias: jax.Array | None,
    norm_weight: jax.Array,
    position_in_chunk: jax.Array,
    *,
    sizes: SsmSizes,
    offset: int = 0,
    implementation: SsmStepImplementation | Literal["auto"] = "auto",
    partitioned: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One token per row through ``sizes.streams`` chunk-reset Mamba-2 SSMs, from the in-projection
    to the gated norm (the math: ``reference``). Stream s owns the s-th block of every stacked axis.

    Args:
      zxbcdt: [B, offset + S·(2I + 2GN + H)]: from column ``offset`` on, the token's
        in-projection, per stream ``[z | x B C | dt]`` (dt before softplus and bias); the columns
        before it are not read (the output of a wider matmul, read where it lies).
      conv: [B, w, S·(I + 2GN)] the conv history, a ring: slot q % w holds the raw conv inputs of
        the chunk's token at position q (``reference.history_slot``), zero where no token of the
        chunk has reached it; scan: [B, S·H, P, N] float32 the scan state of the chunk.
      conv_weight: [S·(I + 2GN), w] (last tap: the current token); A_log, D, dt_bias: [S·H]
        (dt_bias None: no bias); norm_weight: [S·I].
      position_in_chunk: [B] int, the token's distance from its chunk's first token (0: the
        state and conv history restart before it).
      implementation: ``auto`` (the GPU kernel on a GPU, else ``xla``) or a name of
        ``SsmStepImplementation``.
      partitioned: the arrays span several devices and XLA partitions this call (``auto``
        takes ``xla``).

    Returns:
      (out [B, S, I] in zxbcdt.dtype: the gated, normalised SSM outputs before the out-projection;
      the new scan state [B, S·H, P, N] float32; the new conv history, shaped and typed as ``conv``,
      with the token's slot written).

    Inference only: the kernel has no gradient (training runs the SSD op over whole sequences).
    """
    if dt_bias is None:
        dt_bias = jnp.zeros(A_log.shape, jnp.float32)
    position_in_chunk = jnp.asarray(position_in_chunk, jnp.int32)
    args = (zxbcdt, conv, scan, conv_weight, A_log, D, dt_bias, norm_weight, position_in_chunk)
    _check_shapes(*args, sizes, offset)
    target = dispatch.Target.here(partitioned)
    name = dispatch.choose("ssm_step", IMPLEMENTATIONS, implementation, target, *args, sizes=sizes, offset=offset)
    return IMPLEMENTATIONS[name].run(*args, sizes=sizes, offset=offset)
