"""How each op picks its implementation: auto's order, what each implementation refuses, the errors."""

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels import boundary_window_attention, causal_attention, ssd
from pallas_kernels.chunk_grid import ChunkGrid
from pallas_kernels.dispatch import Target, choose
from pallas_kernels.ssm_conv import IMPLEMENTATIONS as CONV
from pallas_kernels.ssm_sizes import SsmSizes

_GRID = ChunkGrid(4, 1)


def _ssd_args(dtype=jnp.float32):
    x = jax.ShapeDtypeStruct((1, 8, 2, 4), dtype)
    dt, vec, bc = (
        jax.ShapeDtypeStruct((1, 8, 2), jnp.float32),
        jax.ShapeDtypeStruct((2,), jnp.float32),
        jax.ShapeDtypeStruct((1, 8, 1, 4), dtype),
    )
    return x, dt, vec, bc, bc, vec


def _attention_args(dtype=jnp.float32, head_dim=16):
    q = jax.ShapeDtypeStruct((1, 8, 2, head_dim), dtype)
    return q, q, q


def _choose_ssd(requested, target, dtype=jnp.float32):
    return choose("ssd", ssd.IMPLEMENTATIONS, requested, target, *_ssd_args(dtype), grid=_GRID)


def _choose_attention(requested, target, dtype=jnp.float32):
    return choose(
        "attention",
        boundary_window_attention.IMPLEMENTATIONS,
        requested,
        target,
        *_attention_args(dtype),
        grid=_GRID,
        window=2,
    )


@pytest.mark.parametrize(
    "backend, ssd_name, attention_name",
    [
        ("gpu", "pallas_gpu", "pallas_gpu"),
        ("tpu", "pallas_tpu", "pallas_tpu"),
        ("cpu", "chunked", "compressed"),
    ],
)
def test_auto_takes_the_backends_kernel_else_the_xla_path(backend, ssd_name, attention_name):
    assert _choose_ssd("auto", Target(backend)) == ssd_name
    assert _choose_attention("auto", Target(backend)) == attention_name


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_auto_takes_the_xla_paths_when_xla_partitions_the_call(backend):
    # Under a multi-device mesh a Pallas kernel runs only per device, under its caller's shard_map
    assert _choose_ssd("auto", Target(backend, partitioned=True)) == "chunked"
    assert _choose_attention("auto", Target(backend, partitioned=True)) == "compressed"


def test_auto_never_takes_the_interpreter():
    assert _choose_ssd("auto", Target("cpu")) == "chunked"


def test_a_kernel_refuses_dtypes_it_was_not_built_for():
    # float16 is neither float32 nor bfloat16: the kernels step aside for the XLA path
    assert _choose_ssd("auto", Target("gpu"), jnp.float16) == "chunked"
    with pytest.raises(ValueError, match="'pallas_gpu' cannot run this call: it takes float32 or bfloat16"):
        _choose_attention("pallas_gpu", Target("gpu"), jnp.float16)


@pytest.mark.parametrize(
    "requested, target, message",
    [
        ("pallas_gpu", Target("cpu"), "'pallas_gpu' cannot run this call: it runs on gpu, not on cpu"),
        ("pallas_tpu", Target("gpu"), "'pallas_tpu' cannot run this call: it runs on tpu, not on gpu"),
        ("pallas_gpu_interpret", Target("cpu", partitioned=True), "single-device kernel: under a multi-device mesh"),
        ("magic", Target("cpu"), "unknown implementation 'magic'"),
    ],
)
def test_a_named_implementation_that_cannot_run_says_why(requested, target, message):
    with pytest.raises(ValueError, match=message):
        _choose_ssd(requested, target)


def test_a_named_implementation_that_can_run_is_taken():
    assert _choose_ssd("pallas_tpu_interpret", Target("cpu")) == "pallas_tpu_interpret"
    assert _choose_attention("dense", Target("gpu", partitioned=True)) == "dense"


@pytest.mark.parametrize(
    "target, dtype, head_dim, name",
    [
        (Target("gpu"), jnp.bfloat16, 64, "cudnn"),
        (Target("gpu"), jnp.float32, 64, "xla"),
        (Target("gpu"), jnp.bfloat16, 12, "xla"),
        (Target("cpu"), jnp.bfloat16, 64, "xla"),
    ],
)
def test_causal_auto_takes_cudnn_where_it_applies(target, dtype, head_dim, name):
    q = _attention_args(dtype, head_dim)
    assert choose("causal", causal_attention.IMPLEMENTATIONS, "auto", target, *q, window=None) == name


def test_a_kernel_indexing_in_int32_refuses_arrays_of_2_31_elements():
    # Given the SSMs' conv op and an in-projection too large for int32 offsets (shapes only: nothing runs)
    sizes = SsmSizes(2, 8, 32, 32, 1, eps=1e-5)
    big = jax.ShapeDtypeStruct((1, 2**31 // (2 * sizes.projection) + 1, 2 * sizes.projection), jnp.bfloat16)
    small = jax.ShapeDtypeStruct((1, 64, 2 * sizes.projection), jnp.bfloat16)
    weight, bias, position = jnp.zeros((2 * sizes.conv_channels, 4)), jnp.zeros((16,)), jnp.zeros((64,), jnp.int32)
    gpu = Target("gpu")
    # Then the GPU kernel says why it cannot run the large call, auto takes XLA there, and the kernel the small one
    with pytest.raises(ValueError, match=r"indexes in int32 and an argument of shape \(1, \d+, 1168\)"):
        choose("ssm_conv", CONV, "pallas_gpu", gpu, big, weight, bias, position, sizes=sizes)
    assert choose("ssm_conv", CONV, "auto", gpu, big, weight, bias, position, sizes=sizes) == "xla"
    assert choose("ssm_conv", CONV, "auto", gpu, small, weight, bias, position, sizes=sizes) == "pallas_gpu"
