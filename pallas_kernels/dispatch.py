"""How an op picks its implementation: every implementation says itself whether it can run a call.

Each op's ``api.py`` names its implementations in a ``Literal`` and keeps a table of them, in
the order ``auto`` tries them (``auto`` skips those marked ``in_auto=False``). ``choose`` returns the name the call runs on: the requested one
(an error naming why, if it cannot run this call), or for ``auto`` the first in the table's
order that can. The api holds no list of special cases: a new implementation is one entry.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax


@dataclasses.dataclass(frozen=True)
class Target:
    """Where a call runs.

    Attributes:
      backend: "cpu", "gpu" or "tpu".
      partitioned: the call's arrays span several devices and XLA partitions the call itself
        (a Pallas kernel is a single-device program: its caller runs it per device instead).
    """

    backend: str
    partitioned: bool = False

    @classmethod
    def here(cls, partitioned: bool = False) -> Target:
        """The backend computations run on: that of ``jax.default_device`` where one is set, else the default backend."""
        device = jax.config.jax_default_device
        if device is None:
            return cls(jax.default_backend(), partitioned)
        platform = device if isinstance(device, str) else device.platform
        return cls("gpu" if platform in ("cuda", "rocm") else platform, partitioned)


@dataclasses.dataclass(frozen=True)
class Implementation:
    """One way to compute an op.

    Attributes:
      run: the computation, with the op's arguments.
      unsupported: ``(target, *args, **kwargs) -> reason | None``: why this implementation
        cannot run that call, or None when it can.
      single_device: a kernel that runs on one device's arrays only (a Pallas call).
      in_auto: ``auto`` may pick it (not so the Pallas interpreter's runs of a kernel, for
        tests and debugging on a CPU).
    """

    run: Callable[..., Any]
    unsupported: Callable[..., str | None] = lambda target, *args, **kwargs: None
    single_device: bool = False
    in_auto: bool = True


def pallas_kernel(backend: str | None, dtypes=("float32", "bfloat16")) -> Callable[..., str | None]:
    """``unsupported`` of a single-device Pallas kernel for ``backend`` (None: any, the Pallas
    interpreter) that takes its first array argument in one of ``dtypes``."""

    def unsupported(target: Target, x, *args, **kwargs) -> str | None:
        if x.dtype.name not in dtypes:
            return f"it takes {' or '.join(dtypes)} inputs, not {x.dtype}"
        if backend is not None and target.backend != backend:
            return f"it runs on {backend}, not on {target.backend}"
        if target.partitioned:
            return "it is a single-device kernel: under a multi-device mesh run it per device (shard_map)"
        return None

    return unsupported


_INT32_ELEMENTS = 2**31


def _int32_indexed(unsupported: Callable[..., str | None]) -> Callable[..., str | None]:
    """``unsupported``, and also refusing arrays too large for a kernel that computes its element
    offsets in int32 (one that indexes whole arrays rather than its blocks)."""

    def check(target: Target, *args, **kwargs) -> str | None:
        reason = unsupported(target, *args, **kwargs)
        if reason is None:
            for a in jax.tree.leaves(args):
                if getattr(a, "size", 0) >= _INT32_ELEMENTS:
                    return f"it indexes in int32 and an argument of shape {a.shape} has 2^31 elements or more"
        return reason

    return check


def gpu_kernel_and_xla(kernel: Callable[..., Any], xla: Callable[..., Any]) -> dict[str, Implementation]:
    """The table of an op that has a GPU kernel (``kernel(..., interpret=False)``, indexing whole
    arrays in int32) and an XLA path, in ``auto``'s order: ``pallas_gpu``, ``xla``, and
    ``pallas_gpu_interpret`` (the kernel in the Pallas interpreter, on any backend; not taken by
    ``auto``)."""
    return {
        "pallas_gpu": Implementation(kernel, _int32_indexed(pallas_kernel("gpu")), single_device=True),
        "xla": Implementation(xla),
        "pallas_gpu_interpret": Implementation(
            functools.partial(kernel, interpret=True),
            _int32_indexed(pallas_kernel(None)),
            single_device=True,
            in_auto=False,
        ),
    }


def choose(op: str, table: Mapping[str, Implementation], requested: str, target: Target, *args, **kwargs) -> str:
    """The implementation of ``op`` that runs this call (``table`` in ``auto``'s order)."""
    if requested == "auto":
        reasons = {}
        for name, impl in table.items():
            if impl.in_auto:
                reasons[name] = impl.unsupported(target, *args, **kwargs)
                if reasons[name] is None:
                    return name
        raise ValueError(
            f"{op}: no implementation runs this call: " + "; ".join(f"{n}: {r}" for n, r in reasons.items())
        )
    if requested not in table:
        raise ValueError(f"{op}: unknown implementation {requested!r}; choose from {tuple(table)} or 'auto'")
    reason = table[requested].unsupported(target, *args, **kwargs)
    if reason is not None:
        raise ValueError(f"{op}: implementation {requested!r} cannot run this call: {reason}")
    return requested
