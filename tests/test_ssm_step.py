"""The SSM decode step: the GPU kernel (in the Pallas interpreter, lowered through Triton, and on
a GPU) against the reference; the reference itself is held to the parallel forward by
test_cache (the model's decode runs it on a CPU)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.ssm_sizes import SsmSizes
from pallas_kernels.ssm_step import pallas_gpu, reference, ssm_step
from tests.helpers import FAST_COMPILE, assert_close, lower_for

# (streams, heads, head dim, state, groups, conv width, batch): the paper's stacked K/V shape; sizes
# no power of two; several B/C groups (each a norm group too); the shortest conv; one stream.
CASES = [
    (2, 8, 32, 32, 1, 4, 3),
    (2, 3, 12, 5, 1, 3, 4),
    (2, 6, 8, 16, 3, 4, 2),
    (1, 4, 8, 16, 2, 2, 5),
]


def _run(implementation, args, sizes, offset=0):
    fn = lambda *a: ssm_step(*a, sizes=sizes, offset=offset, implementation=implementation)
    return jax.jit(fn).lower(*args).compile(FAST_COMPILE)(*args)


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 1e-2)])
@pytest.mark.parametrize("streams, heads, p, n, groups, width, batch", CASES)
def test_kernel_matches_reference(dtype, tol, streams, heads, p, n, groups, width, batch):
    # Given fresh random inputs, every row at another position in its chunk (some restarting)
    sizes = SsmSizes(streams, heads, p, n, groups, eps=1e-5)
    args = reference.random_inputs(jax.random.key(streams * heads + n), batch, sizes, width, dtype)
    # When the kernel runs in the interpreter (its gated output starts as NaN there)
    got = _run("pallas_gpu_interpret", args, sizes)
    want = _run("xla", args, sizes)
    # Then the output, state and conv history all equal the reference's
    out, scan, conv = got
    assert out.dtype == dtype and scan.dtype == jnp.float32 and conv.dtype == dtype
    assert_close(got, want, tol)
    np.testing.assert_array_equal(np.asarray(conv, np.float32), np.asarray(want[2], np.float32))


def test_restart_forgets_the_state_and_history():
    # Given a row at the start of a chunk and the same row with another state and history
    sizes = SsmSizes(2, 4, 8, 16, 1, eps=1e-5)
    args = list(reference.random_inputs(jax.random.key(3), 2, sizes, 4))
    args[8] = jnp.zeros((2,), jnp.int32)
    other = list(args)
    other[1], other[2] = 3.0 * args[1] + 1.0, -args[2]
    for implementation in ("xla", "pallas_gpu_interpret"):
        # Then what it computes does not depend on them, and its history holds the token alone,
        # in the ring's first slot
        a, b = _run(implementation, args, sizes), _run(implementation, other, sizes)
        for x, y in zip(a, b):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        xbc = args[0].reshape(2, 2, sizes.projection)[:, :, sizes.inner : sizes.inner + sizes.conv_channels]
        np.testing.assert_array_equal(np.asarray(a[2][:, 0]), np.asarray(xbc.reshape(2, -1)))
        np.testing.assert_array_equal(np.asarray(a[2][:, 1:]), 0.0)


@pytest.mark.parametrize("implementation", ["xla", "pallas_gpu_interpret"])
def test_the_projection_is_read_from_its_offset(implementation):
    # Given the in-projection as the last columns of a wider array (a joined matmul's output)
    sizes = SsmSizes(2, 3, 12, 5, 1, eps=1e-5)
    args = reference.random_inputs(jax.random.key(8), 3, sizes, 4)
    wider = jnp.concatenate([jax.random.normal(jax.random.key(9), (3, 7)), args[0]], axis=1)
    # Then the step reads it there: the same outputs, bit for bit
    got = _run(implementation, (wider,) + args[1:], sizes, offset=7)
    for x, y in zip(got, _run(implementation, args, sizes)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_no_dt_bias_is_a_zero_bias():
    sizes = SsmSizes(2, 4, 8, 16, 1, eps=1e-5)
    args = reference.random_inputs(jax.random.key(4), 2, sizes, 4, dt_bias=False)
    zero = args[:6] + (jnp.zeros((8,)),) + args[7:]
    for implementation in ("xla", "pallas_gpu_interpret"):
        assert_close(_run(implementation, args, sizes), _run(implementation, zero, sizes), 1e-6)


def test_kernel_lowers_through_triton_updating_state_and_history_in_place():
    sizes = SsmSizes(2, 8, 32, 32, 1, eps=1e-5)
    args = reference.random_inputs(jax.random.key(5), 1, sizes, 4, jnp.bfloat16)
    text = lower_for("cuda", lambda *a: pallas_gpu.ssm_step_pallas_gpu(*a, sizes=sizes), *args)
    # (and from an offset, it reads the wider array itself: no slice of it before the kernel)
    wider = (jnp.zeros((1, 512 + args[0].shape[1]), args[0].dtype),) + args[1:]
    sliced = lower_for("cuda", lambda *a: pallas_gpu.ssm_step_pallas_gpu(*a, sizes=sizes, offset=512), *wider)
    assert "slice" not in sliced and sliced.count("__gpu$xla.gpu.triton") == 1
    assert text.count("__gpu$xla.gpu.triton") == 1
    assert text.count("output_operand_alias<") == 2  # the scan state and the history ring


def test_auto_runs_xla_on_a_cpu_and_the_kernel_names_why_not():
    sizes = SsmSizes(2, 4, 8, 16, 1, eps=1e-5)
    args = reference.random_inputs(jax.random.key(6), 2, sizes, 4)
    assert_close(_run("auto", args, sizes), _run("xla", args, sizes), 0.0)
    if jax.default_backend() != "gpu":
        with pytest.raises(ValueError, match="'pallas_gpu' cannot run this call: it runs on gpu"):
            ssm_step(*args, sizes=sizes, implementation="pallas_gpu")


@pytest.mark.parametrize(
    "index, shape, name",
    [(0, (2, 7), "zxbcdt"), (2, (2, 8, 8, 15), "scan"), (1, (2, 2, 96), "conv"), (8, (3,), "position_in_chunk")],
)
def test_bad_shapes_are_named(index, shape, name):
    sizes = SsmSizes(2, 4, 8, 16, 1, eps=1e-5)
    args = list(reference.random_inputs(jax.random.key(7), 2, sizes, 4))
    args[index] = jnp.zeros(shape, args[index].dtype)
    with pytest.raises(ValueError, match=f"ssm_step: {name} must have shape"):
        ssm_step(*args, sizes=sizes)


def test_a_bad_offset_is_named():
    sizes = SsmSizes(2, 4, 8, 16, 1, eps=1e-5)
    args = reference.random_inputs(jax.random.key(7), 2, sizes, 4)
    with pytest.raises(ValueError, match="ssm_step: offset must be >= 0, got -1"):
        ssm_step(*args, sizes=sizes, offset=-1)
    with pytest.raises(ValueError, match=r"ssm_step: zxbcdt must have shape \(2, 204\)"):
        ssm_step(*args, sizes=sizes, offset=4)


def test_sizes_are_checked():
    with pytest.raises(ValueError, match=r"groups \(3\) must divide heads \(4\)"):
        SsmSizes(2, 4, 8, 16, 3, eps=1e-5)
    with pytest.raises(ValueError, match="SsmSizes.state must be >= 1"):
        SsmSizes(2, 4, 8, 0, 1, eps=1e-5)


# --- on a GPU: the real kernel (``pytest -m gpu``) -------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 1e-2)])
@pytest.mark.parametrize("streams, heads, p, n, groups, width, batch", CASES + [(2, 8, 32, 32, 1, 4, 32)])
def test_kernel_on_the_device_matches_reference(on_gpu, dtype, tol, streams, heads, p, n, groups, width, batch):
    sizes = SsmSizes(streams, heads, p, n, groups, eps=1e-5)
    args = reference.random_inputs(jax.random.key(heads + batch), batch, sizes, width, dtype)
    assert_close(_run("pallas_gpu", args, sizes), _run("xla", args, sizes), tol)
