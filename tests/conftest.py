"""Test setup: 8 virtual CPU devices (mesh tests), float32 matmuls at full precision.

On a CPU-only machine everything runs on the CPU. On a machine with an accelerator
(``JAX_PLATFORMS=cuda,cpu``) the tests compute on the CPU as CI does, except those marked
``gpu``: they run the real kernels on the GPU (``JAX_PLATFORMS=cuda,cpu pytest -m gpu`` is the device check) and
skip, with the reason, where no GPU is present.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
    flags += " --xla_force_host_platform_device_count=8"
# On a CPU-only run the tests are bound by compiling, not by computing: LLVM's optimisation of the
# CPU code is off (XLA's own passes, and so every HLO and its numerics, are unchanged). Subprocesses
# of the tests inherit it. A run with an accelerator keeps the default.
if os.environ["JAX_PLATFORMS"] == "cpu" and "xla_backend_optimization_level" not in flags:
    flags += " --xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = flags.strip()

# The tests of a run share their compiled programs (many build the same trainer): a compilation
# cache for this run, removed at its end by the process that made it (xdist workers inherit it).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="attamba-jax-tests-")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def _devices(platform: str) -> list:
    try:
        return jax.devices(platform)
    except RuntimeError:  # no such backend in JAX_PLATFORMS
        return []


if jax.default_backend() != "cpu" and _devices("cpu"):
    jax.config.update("jax_default_device", _devices("cpu")[0])


def pytest_collection_modifyitems(config, items):
    if not _devices("gpu"):
        skip = pytest.mark.skip(reason="needs a GPU (JAX_PLATFORMS=cuda,cpu on a machine with one)")
        for item in items:
            if item.get_closest_marker("gpu") is not None:
                item.add_marker(skip)


@pytest.fixture
def on_gpu():
    """Computations of the test run on the first GPU."""
    with jax.default_device(_devices("gpu")[0]):
        yield
