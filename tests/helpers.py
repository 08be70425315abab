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


# --- packed documents -------------------------------------------------------------------------


def packed_layout(seed: int, batch: int, length: int, align: int, window: int, max_docs: int = 6):
    """A random packed batch as the data pipeline lays it out: documents start at multiples of
    ``align``; padding after a document belongs to it; each row's last document runs to the end
    of the row (a row cut mid-document).

    Document lengths mix 1, shorter than ``align``, not a multiple of it, and longer than the
    window. Returns (document_start [B, T] int32, spans [(row, start, stop)]: each document's
    real tokens).
    """
    rng = np.random.default_rng(seed)
    starts = np.zeros((batch, length), np.int32)
    spans = []
    for row in range(batch):
        pos = 0
        n_docs = int(rng.integers(1, max_docs + 1))
        for i in range(n_docs):
            if pos >= length:
                break
            choices = [1, int(rng.integers(1, max(2, align))), align * int(rng.integers(1, 3)) + 1, window + 1 + align]
            n = length - pos if i == n_docs - 1 else min(length - pos, choices[int(rng.integers(len(choices)))])
            stop = min(length, -(-(pos + n) // align) * align)
            starts[row, pos:stop] = pos
            spans.append((row, pos, pos + n))
            pos = stop
    return starts, spans


def alone_rows(spans, per_token: list, seed: int = 0) -> list:
    """Each document of ``spans`` alone from position 0, one per row: [n_docs, T, ...] arrays
    holding the document's tokens first and random values after it (which causal ops never read)."""
    rng = np.random.default_rng(seed)
    out = []
    for a in per_token:
        a = np.asarray(a)
        rows = rng.standard_normal((len(spans),) + a.shape[1:]).astype(a.dtype)
        for j, (row, start, stop) in enumerate(spans):
            rows[j, : stop - start] = a[row, start:stop]
        out.append(jnp.asarray(rows))
    return out


def span_weights(spans, shape) -> np.ndarray:
    """[B, T] float32 (packed) or [n_docs, T] (alone, ``shape[0] == len(spans)``): 1 on real tokens."""
    w = np.zeros(shape[:2], np.float32)
    alone = shape[0] == len(spans) and shape[0] > 0
    for j, (row, start, stop) in enumerate(spans):
        if alone:
            w[j, : stop - start] = 1
        else:
            w[row, start:stop] = 1
    return w


def assert_packed_equals_alone(op, per_token, shared, document_start, spans, rel: float, seed: int = 0):
    """``op(*per_token, *shared, document_start=...)`` on a packed batch equals ``op`` on each of its
    documents alone (``document_start=None``), forward and gradient.

    per_token: [B, T, ...] arrays; shared: arrays every token reads (their gradient is the sum of
    the documents'). The loss weights real tokens only (a fixed random cotangent).
    """
    rng = np.random.default_rng(seed + 1)
    alone = alone_rows(spans, per_token, seed)
    n = len(per_token)

    def loss(document_start, cot, weights):
        def f(*args):
            y = op(*args, document_start=document_start)
            w = weights.reshape(weights.shape + (1,) * (y.ndim - 2))
            return jnp.sum(y.astype(jnp.float32) * cot * w), y

        grad = jax.jit(jax.value_and_grad(f, argnums=range(n + len(shared)), has_aux=True))
        return lambda *a: grad.lower(*a).compile(FAST_COMPILE)(*a)

    y_shape = jax.eval_shape(lambda *a: op(*a, document_start=None), *per_token, *shared).shape
    cot_packed = jnp.asarray(rng.standard_normal(y_shape).astype(np.float32))
    cot_alone = alone_rows(spans, [cot_packed], seed)[0]
    (_, y_p), g_p = loss(jnp.asarray(document_start), cot_packed, jnp.asarray(span_weights(spans, y_shape)))(
        *per_token, *shared
    )
    (_, y_a), g_a = loss(None, cot_alone, jnp.asarray(span_weights(spans, cot_alone.shape)))(*alone, *shared)
    gather = lambda a: jnp.concatenate([a[row, start:stop] for row, start, stop in spans])
    gather_alone = lambda a: jnp.concatenate([a[j, : stop - start] for j, (_, start, stop) in enumerate(spans)])
    assert_close(gather(y_p), gather_alone(y_a), rel)
    for i in range(n):
        assert_close(gather(g_p[i]), gather_alone(g_a[i]), rel)
        # Padding is read by nothing real: its gradient is zero.
        pad = np.ones(g_p[i].shape[:2], bool) & ~span_weights(spans, g_p[i].shape).astype(bool)
        assert float(jnp.max(jnp.abs(jnp.where(pad.reshape(pad.shape + (1,) * (g_p[i].ndim - 2)), g_p[i], 0)))) == 0
    for i in range(n, n + len(shared)):
        assert_close(g_p[i], g_a[i], rel)


def assert_documents_independent(run, per_token, spans, seed: int = 9):
    """Perturbing one document of ``spans`` (its tokens and the padding after them, in every
    [B, T, ...] array of ``per_token``) changes that document's outputs of ``run(*per_token)``
    and leaves every other output bit for bit."""
    base = np.asarray(run(*per_token))
    rng = np.random.default_rng(seed)
    for row, start, _ in spans:
        stop = min([s for r, s, _ in spans if r == row and s > start], default=base.shape[1])
        changed = [
            a.at[row, start:stop].add(jnp.asarray(rng.standard_normal(a[row, start:stop].shape) + 0.5, a.dtype))
            for a in per_token
        ]
        out = np.asarray(run(*changed))
        keep = np.ones(base.shape[:2], bool)
        keep[row, start:stop] = False
        np.testing.assert_array_equal(out[keep], base[keep])
        assert not np.array_equal(out[row, start:stop], base[row, start:stop])


def subprocess_xla_flags(devices: int) -> str:
    """XLA_FLAGS for a subprocess of a test: this run's flags, with ``devices`` CPU devices."""
    import os
    import re

    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
    return " ".join(flags.split() + ([f"--xla_force_host_platform_device_count={devices}"] if devices > 1 else []))
