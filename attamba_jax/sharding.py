"""Device meshes and logical-axis sharding.

Parameters carry logical axis names (``logical_axes`` metadata: embed, heads, kv, mlp,
vocab, ssm_inner, ssm_heads) and activations are constrained with logical names (batch,
length, embed, ...). A table of rules maps logical names to the mesh axes
``data``, ``fsdp``, ``context`` (the length of activations) and ``tensor``; the model code never
names a mesh axis.

    mesh = make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
    with use_mesh(mesh, DEFAULT_RULES):
        shardings = tree_shardings(params)        # NamedSharding per parameter
        params = jax.device_put(params, shardings)

A dimension whose size the mapped mesh axes do not divide is replicated instead, so a
mesh never makes a model unrunnable.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "context", "tensor")

# logical name -> mesh axes (a name, a tuple of names, or None = replicated)
Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]
DEFAULT_RULES: Rules = (
    ("batch", ("data", "fsdp")),
    ("length", "context"),
    ("context_rows", ("context", "data", "fsdp")),  # context shards as rows (context_parallel.py)
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("ssm_inner", "tensor"),
    ("ssm_heads", None),
    ("ssm_state", None),
)

_ACTIVE: contextvars.ContextVar[tuple[Mesh, Rules] | None] = contextvars.ContextVar("attamba_mesh", default=None)


def resolve_mesh_shape(shape: dict[str, int], n_devices: int) -> tuple[int, ...]:
    """Sizes for ``MESH_AXES``; one size may be -1 (= the devices left over)."""
    unknown = [name for name in shape if name not in MESH_AXES]
    if unknown:
        raise ValueError(f"unknown mesh axis {unknown[0]!r}; mesh axes are {MESH_AXES}")
    sizes = [int(shape.get(name, 1)) for name in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh axis sizes must be >= 1 or -1, got {dict(zip(MESH_AXES, sizes))}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if n_devices % known:
            raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))}: {n_devices} devices do not divide by {known}")
        sizes[sizes.index(-1)] = n_devices // known
    if math.prod(sizes) != n_devices:
        raise ValueError(
            f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, but {n_devices} are present"
        )
    return tuple(sizes)


def make_mesh(shape: dict[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, context, tensor) mesh over ``devices`` (default: all devices of all processes)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = resolve_mesh_shape(shape, len(devices))
    try:
        grid = mesh_utils.create_device_mesh(sizes, devices=devices)
    except Exception:  # not a physical topology it knows: plain order is still correct
        grid = np.asarray(devices, dtype=object).reshape(sizes)
    return Mesh(grid, MESH_AXES)


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: Rules = DEFAULT_RULES):
    """Make ``mesh`` and ``rules`` the target of ``constrain``, ``tree_shardings`` and ``call_op``."""
    token = _ACTIVE.set((mesh, tuple(rules)))
    try:
        yield mesh
    finally:
        _ACTIVE.reset(token)


def active_mesh() -> tuple[Mesh, Rules] | None:
    return _ACTIVE.get()


def spans_devices() -> bool:
    """True inside ``use_mesh`` with a mesh of more than one device."""
    active = _ACTIVE.get()
    return active is not None and active[0].devices.size > 1


def call_op(op, implementations, implementation: str, args: Sequence[jax.Array], axes, out_axes, **static):
    """``op(*args, implementation=implementation, **static)`` for a ``pallas_kernels`` op, under the active mesh.

    The Pallas kernels are single-device programs that XLA cannot partition. Under a mesh of
    several devices, a kernel named explicitly runs once per device on its shard of the arrays
    (``per_shard`` with the logical ``axes`` of each argument and ``out_axes``); ``auto`` takes
    the implementations XLA partitions itself (the op's ``partitioned=True``), until the kernels
    are measured on a GPU mesh. Outside such a mesh the op runs as called.

    Args:
      implementations: the op's table (``pallas_kernels.<op>.IMPLEMENTATIONS``).
    """
    if not spans_devices():
        return op(*args, implementation=implementation, **static)
    if implementation != "auto" and implementations[implementation].single_device:
        return per_shard(lambda *a: op(*a, implementation=implementation, **static), args, axes, out_axes)
    return op(*args, implementation=implementation, partitioned=True, **static)


def splits(name: str, size: int) -> bool:
    """Whether a dimension of logical axis ``name`` and ``size`` is split under the active mesh."""
    active = _ACTIVE.get()
    return active is not None and logical_to_spec((name,), (size,), *active)[0] is not None


def per_shard(
    fn, args: Sequence[jax.Array], axes: Sequence[Sequence[str | None] | None], out_axes: Sequence[str | None]
):
    """``fn(*args)``, run once per device on its shard of every argument under the active mesh.

    For a single-device program (a Pallas kernel) whose work splits along some dimensions
    (batch rows, heads): ``axes`` names each argument's dimensions logically (None: the
    argument is replicated) and ``out_axes`` the output's (a tuple of them where ``fn`` returns
    a tuple); ``shard_map`` hands each device
    its blocks, by the same rules and divisibility as ``constrain``. Outside a multi-device
    mesh it is ``fn(*args)``. Gradients flow through (a replicated argument's cotangent is
    summed over the devices).
    """
    if not spans_devices():
        return fn(*args)
    mesh, rules = _ACTIVE.get()
    spec = lambda names, shape: PartitionSpec() if names is None else logical_to_spec(names, shape, mesh, rules)
    in_specs = tuple(spec(names, x.shape) for names, x in zip(axes, args))
    shapes = jax.eval_shape(fn, *args)
    if isinstance(shapes, tuple):
        out_spec = tuple(spec(names, x.shape) for names, x in zip(out_axes, shapes, strict=True))
    else:
        out_spec = spec(out_axes, shapes.shape)
    # check_vma=False: pallas_call outputs carry no varying-axes types; every output block is
    # a function of its own devices' inputs, which the in/out specs state.
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_spec, check_vma=False)(*args)


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules: Rules) -> PartitionSpec:
    """PartitionSpec for a value of ``shape`` whose dimensions have logical ``axes``."""
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for name, size in zip(axes, shape):
        target = table.get(name) if name is not None else None
        mesh_axes = (target,) if isinstance(target, str) else tuple(target or ())
        # a mesh axis shards at most one dimension, and only one it divides
        mesh_axes = tuple(a for a in mesh_axes if a not in used and mesh.shape[a] > 1)
        if mesh_axes and size % math.prod(mesh.shape[a] for a in mesh_axes) == 0:
            used.update(mesh_axes)
            spec.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
        else:
            spec.append(None)
    return PartitionSpec(*spec)


def _value_shape(variable: nnx.Variable) -> tuple[int, ...]:
    return tuple(jax.tree.leaves(variable)[0].shape)  # an array or a ShapeDtypeStruct


def _logical_axes(variable: nnx.Variable) -> tuple:
    axes = variable.get_metadata().get("logical_axes")
    return tuple(axes) if axes is not None else (None,) * len(_value_shape(variable))


def _resolve(mesh: Mesh | None, rules: Rules | None, what: str) -> tuple[Mesh, Rules]:
    if mesh is None:
        active = active_mesh()
        if active is None:
            raise ValueError(f"{what} needs a mesh: pass one or call it inside use_mesh(mesh)")
        mesh, rules = active
    return mesh, DEFAULT_RULES if rules is None else rules


def tree_shardings(tree: Any, mesh: Mesh | None = None, rules: Rules | None = None) -> Any:
    """Shardings for any pytree holding nnx Variables (params, optimizer moments) and plain arrays.

    A Variable is placed by its ``logical_axes``; any other leaf (a step count, a scalar)
    is replicated. Leaves may be arrays or ``jax.ShapeDtypeStruct``.
    """
    mesh, rules = _resolve(mesh, rules, "tree_shardings")
    replicated = NamedSharding(mesh, PartitionSpec())

    def one(leaf):
        if isinstance(leaf, nnx.Variable):
            spec = logical_to_spec(_logical_axes(leaf), _value_shape(leaf), mesh, rules)
            return leaf.replace(NamedSharding(mesh, spec))
        return replicated

    return jax.tree.map(one, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """``with_sharding_constraint`` by logical names; a no-op outside ``use_mesh``."""
    active = active_mesh()
    if active is None:
        return x
    mesh, rules = active
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(axes, x.shape, mesh, rules)))


def check_process_rows(sharding: NamedSharding, global_rows: int) -> None:
    """Check that every process holds its own, equal share of the batch rows.

    Each process reads ``global_rows / process_count`` rows of its own (grain's per-process
    shard) and ``make_array_from_process_local_data`` places them on its devices; that holds
    only if no two processes need the same rows (a tensor axis spanning hosts would).
    """
    n = jax.process_count()
    if n == 1:
        return
    rows: dict[int, set[int]] = {}
    for device, index in sharding.devices_indices_map((global_rows, 1)).items():
        start, stop, _ = index[0].indices(global_rows)
        rows.setdefault(device.process_index, set()).update(range(start, stop))
    sizes = {p: len(r) for p, r in rows.items()}
    overlap = any(rows[p] & rows[q] for p in rows for q in rows if p < q)
    if overlap or set(sizes.values()) != {global_rows // n}:
        raise ValueError(
            f"the mesh {dict(sharding.mesh.shape)} gives the {n} processes overlapping or unequal batch rows "
            f"(rows per process: {sizes}); put the axes that span hosts first (data, fsdp) and keep tensor within a host"
        )
