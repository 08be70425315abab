"""Shared test helpers."""

import contextlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

# Tiny shapes: XLA's cheap optimisation level keeps compile time (most of each test) down.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def assert_close(actual, expected, rel: float):
    """Same shapes, finite everywhere, and elementwise within rel·|expected| + rel·max|expected|."""
    chex.assert_tree_all_finite(actual)

    def one(a, e):
        chex.assert_shape(a, e.shape)
        e = e.astype(jnp.float32)
        scale = float(jnp.max(jnp.abs(e))) or 1.0
        chex.assert_trees_all_close(a.astype(jnp.float32), e, rtol=rel, atol=rel * scale)

    jax.tree.map(one, actual, expected)


def value_and_grads(fn, args, cotangent):
    """fn(*args) and d<fn(*args), cotangent>/d(every arg), in one compiled call."""

    def loss(*a):
        y = fn(*a)
        return jnp.sum(y.astype(jnp.float32) * cotangent), y

    compiled = (
        jax.jit(jax.value_and_grad(loss, argnums=range(len(args)), has_aux=True)).lower(*args).compile(FAST_COMPILE)
    )
    (_, y), grads = compiled(*args)
    return y, grads


def mask_from_rows(rows: str) -> np.ndarray:
    return np.array([[c == "1" for c in row.split()[1]] for row in rows.strip().splitlines()])


def lower_for(platform: str, fn, *args) -> str:
    """StableHLO of jitted ``fn`` lowered for ``platform`` ("cuda", "tpu") from this CPU machine.
    Pallas kernels go through their lowering (Triton IR for "cuda", Mosaic's serialized format
    for "tpu"), so a kernel Pallas cannot lower fails here; the device compilers themselves
    (Triton's, Mosaic's passes in libtpu) run only on the device. On a machine with a GPU the
    Triton lowering reads that GPU, so it lowers with the GPU as the default device."""
    gpus = [d for d in jax.devices() if d.platform == "gpu"]
    on_gpu = jax.default_device(gpus[0]) if platform == "cuda" and gpus else contextlib.nullcontext()
    with on_gpu:
        return jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()


def grads_of(fn):
    """The gradient of sum(fn(*args)) in every argument: runs fn's forward once and its backward."""
    return lambda *a: jax.grad(lambda *z: jnp.sum(fn(*z).astype(jnp.float32)), argnums=range(len(a)))(*a)


def cpu_devices(n: int) -> list:
    """``n`` CPU devices (conftest makes 8), or skip the test naming how many there are."""
    devices = jax.devices("cpu")
    if len(devices) < n:
        pytest.skip(f"needs {n} CPU devices, found {len(devices)}")
    return devices[:n]


def with_overrides(overrides: list[str], *changes: str) -> list[str]:
    """``overrides`` with the keys of ``changes`` set to their new values (a key may be given only once)."""
    keys = {change.split("=", 1)[0] for change in changes}
    return [o for o in overrides if o.split("=", 1)[0] not in keys] + list(changes)
