"""Kernel launches whose outputs start as NaN, so an element a kernel fails to write shows.

The Pallas interpreter already fills every output with NaN before a kernel runs; on a GPU an
output buffer starts with whatever the allocator hands out. ``pallas_call(..., poison=True)``
gives each output its own NaN-filled buffer, aliased to it, on every backend: tests and the
benchmarks' device checks run the kernels that way and then require finite results.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl


def _fill(dtype) -> float | int | bool:
    if jnp.issubdtype(dtype, jnp.inexact):
        return jnp.nan
    return True if dtype == jnp.bool_ else jnp.iinfo(dtype).min


def pallas_call(kernel, *, poison: bool = False, **kwargs):
    """``pl.pallas_call(kernel, **kwargs)``; with ``poison``, every output first holds NaN
    (integer outputs: their dtype's minimum; bool: True). ``kwargs`` must name ``in_specs``
    and one ``out_specs`` per output, and no aliases of their own."""
    if not poison:
        return pl.pallas_call(kernel, **kwargs)
    if kwargs.get("input_output_aliases"):
        raise ValueError("poisoned pallas_call: the launch already aliases an input to an output")
    outs = jax.tree.leaves(kwargs["out_shape"])
    out_specs = kwargs["out_specs"]
    out_specs = list(out_specs) if isinstance(out_specs, (tuple, list)) else [out_specs]
    if len(out_specs) != len(outs):
        raise ValueError(f"poisoned pallas_call: {len(outs)} outputs but {len(out_specs)} out_specs")

    def call(*args):
        n_in, n_out = len(jax.tree.leaves(args)), len(outs)  # refs come flattened

        def body(*refs):  # the poison inputs are the outputs' own buffers: skip their input refs
            return kernel(*refs[:n_in], *refs[n_in + n_out :])

        buffers = [jnp.full(o.shape, _fill(o.dtype), o.dtype) for o in outs]
        launch = dict(
            kwargs, in_specs=[*kwargs["in_specs"], *out_specs], input_output_aliases={n_in + i: i for i in range(n_out)}
        )
        return pl.pallas_call(body, **launch)(*args, *buffers)

    return call
