"""The gated grouped RMSNorm: the GPU kernels (in the Pallas interpreter, lowered through Triton,
and on a GPU) against the reference, forward and every gradient; the reference against a plain
per-group RMSNorm written out here."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.gated_norm import gated_norm, pallas_gpu, reference
from tests.helpers import FAST_COMPILE, assert_close, lower_for, value_and_grads

# (shape, groups): the paper's stacked K/V SSMs (2 streams x 1 group of 256) with rows not a
# multiple of a program's; several groups of a width no power of two; one group of 2-D rows.
CASES = [((2, 37, 512), 2), ((3, 5, 24), 3), ((40, 10), 1)]


def _inputs(seed, shape, dtype):
    k = jax.random.split(jax.random.key(seed), 4)
    y = jax.random.normal(k[0], shape).astype(dtype)
    z = jax.random.normal(k[1], shape).astype(dtype)
    weight = 1.0 + 0.1 * jax.random.normal(k[2], shape[-1:])
    return (y, z, weight), jax.random.normal(k[3], shape)


def _run(implementation, args, cot, groups, launch=None, interpret=True):
    """Output and gradients of ``implementation`` (a name, or with ``launch`` the kernel run with
    those launch settings, in the interpreter unless ``interpret`` is False)."""
    if launch is None:
        fn = lambda y, z, w: gated_norm(y, z, w, groups=groups, eps=1e-5, implementation=implementation)
    else:
        fn = lambda *a: pallas_gpu.gated_norm_pallas_gpu(
            *a, groups=groups, eps=1e-5, interpret=interpret, launch=launch
        )
    return value_and_grads(fn, args, cot)


def test_reference_is_a_per_group_rms_norm_of_the_gated_input():
    (y, z, w), _ = _inputs(0, (4, 12), jnp.float32)
    g = np.asarray(y) * np.asarray(jax.nn.silu(z))
    groups = g.reshape(4, 3, 4)
    want = (groups / np.sqrt(np.mean(groups**2, axis=-1, keepdims=True) + 1e-5)).reshape(4, 12) * np.asarray(w)
    np.testing.assert_allclose(reference.gated_norm_reference(y, z, w, groups=3, eps=1e-5), want, rtol=1e-5)


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 1e-2)])
@pytest.mark.parametrize("shape, groups", CASES)
def test_kernel_matches_reference(dtype, tol, shape, groups):
    # Given fresh random inputs and a cotangent
    args, cot = _inputs(sum(shape) + groups, shape, dtype)
    # When the kernels run forward and backward in the interpreter (outputs start as NaN there)
    got = _run("pallas_gpu_interpret", args, cot, groups)
    want = _run("xla", args, cot, groups)
    # Then the output and the gradients of y, z and the weight equal the reference's, in their dtypes
    assert got[0].dtype == dtype and [g.dtype for g in got[1]] == [dtype, dtype, jnp.float32]
    assert_close(got, want, tol)


@pytest.mark.parametrize(
    "launch",
    [
        pallas_gpu.Launch(tile=1024, num_warps=8),
        pallas_gpu.Launch(tile=64, num_warps=1),
        pallas_gpu.Launch(tile=4096, steps=1),
        pallas_gpu.Launch(tile=2048, steps=3),
    ],
)
def test_other_launch_settings_match_reference(launch):
    # Given the paper's stacked shape, and programs of 4 rows, of one row narrower than a group, of
    # 16 rows at once, of 3 tiles of 8 in a loop (74 rows: the last program's last tiles past the end)
    args, cot = _inputs(7, *CASES[0][:1], jnp.float32)
    # When the kernels run with them in the interpreter, then they agree with the reference
    assert_close(_run(None, args, cot, 2, launch), _run("xla", args, cot, 2), 1e-5)


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(tile=3000), "Launch.tile must be a power of two"),
        (dict(num_warps=0), "Launch.num_warps must be >= 1"),
        (dict(steps=0), "Launch.steps must be >= 1"),
    ],
)
def test_bad_launch_settings_are_named(settings, message):
    with pytest.raises(ValueError, match=message):
        pallas_gpu.Launch(**settings)


def test_kernels_lower_through_triton():
    (y, z, w), _ = _inputs(1, (2, 64, 512), jnp.bfloat16)
    grad = jax.grad(lambda *a: jnp.sum(pallas_gpu.gated_norm_pallas_gpu(*a, groups=2, eps=1e-5)), argnums=(0, 1, 2))
    assert lower_for("cuda", grad, y.astype(jnp.float32), z, w).count("__gpu$xla.gpu.triton") == 2


def test_auto_runs_xla_on_a_cpu_and_the_kernel_names_why_not():
    args, _ = _inputs(2, (3, 8), jnp.float32)
    fn = lambda impl: jax.jit(lambda *a: gated_norm(*a, groups=2, eps=1e-5, implementation=impl)).lower(*args)
    np.testing.assert_array_equal(fn("auto").compile(FAST_COMPILE)(*args), fn("xla").compile(FAST_COMPILE)(*args))
    if jax.default_backend() != "gpu":
        with pytest.raises(ValueError, match="'pallas_gpu' cannot run this call: it runs on gpu"):
            gated_norm(*args, groups=2, eps=1e-5, implementation="pallas_gpu")


def test_bad_shapes_and_groups_are_named():
    (y, z, w), _ = _inputs(3, (3, 8), jnp.float32)
    with pytest.raises(ValueError, match=r"gated_norm: z must have y's shape \(3, 8\)"):
        gated_norm(y, z[:, :4], w, groups=2, eps=1e-5)
    with pytest.raises(ValueError, match=r"gated_norm: groups \(3\) must divide the channels \(8\)"):
        gated_norm(y, z, w, groups=3, eps=1e-5)


# --- on a GPU: the real kernels (``pytest -m gpu``) -------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 1e-2)])
@pytest.mark.parametrize("shape, groups", CASES + [((16, 1024, 512), 2)])
def test_kernel_on_the_device_matches_reference(on_gpu, dtype, tol, shape, groups):
    args, cot = _inputs(sum(shape), shape, dtype)
    assert_close(_run("pallas_gpu", args, cot, groups), _run("xla", args, cot, groups), tol)


@pytest.mark.gpu
@pytest.mark.parametrize("tile, steps", [(4096, 1), (512, 8)])
def test_other_launch_settings_on_the_device_match_reference(on_gpu, tile, steps):
    # Given bf16 rows of the model's width, no multiple of a program's, and programs of 16 rows at
    # once (the first default) or of 8 tiles of 2 rows in a loop
    args, cot = _inputs(steps, (16, 1001, 512), jnp.bfloat16)
    launch = pallas_gpu.Launch(tile=tile, steps=steps)
    assert_close(_run(None, args, cot, 2, launch, interpret=False), _run("xla", args, cot, 2), 1e-2)
