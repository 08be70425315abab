"""The offline register reader's two halves that run here: capturing each Pallas kernel's Triton IR
and launch settings as it is lowered for CUDA, and the residency arithmetic (compiling needs the
separate ``triton`` package)."""

import jax
import jax.numpy as jnp

from benchmarks.triton_registers import lower_kernels, residency
from pallas_kernels.gated_norm import pallas_gpu


def test_every_kernel_is_captured_with_its_launch_settings():
    # Given a kernel pair with non-default warps
    launch = pallas_gpu.Launch(tile=1024, num_warps=8)
    y = jnp.ones((2, 16, 64), jnp.bfloat16)
    loss = lambda y, z: jnp.sum(pallas_gpu.gated_norm_pallas_gpu(y, z, jnp.ones(64), groups=2, eps=1e-5, launch=launch))
    # When its gradient is lowered for CUDA
    kernels = lower_kernels(jax.grad(loss, (0, 1)), y, y)
    # Then both kernels come back, named, with their Triton IR and launch settings
    assert [k["kernel"] for k in kernels] == ["gated_norm_fwd", "gated_norm_bwd"]
    assert all(k["num_warps"] == 8 and k["num_stages"] == 1 and "tt.func public" in k["ttir"] for k in kernels)
    # and again for the same computation (nothing of the first lowering is reused)
    assert [k["ttir"] for k in lower_kernels(jax.grad(loss, (0, 1)), y, y)] == [k["ttir"] for k in kernels]


def test_residency_follows_hopper_register_and_warp_limits():
    # 255 registers (256 a thread, 8192 a warp) on one warp: 8 programs; as Nsight Compute read the SSD backward
    assert residency(255, 0, 1) == {"programs_per_sm": 8, "warps_per_sm": 8, "bound_by": "registers"}
    assert residency(158, 0, 1)["programs_per_sm"] == 12
    # few registers: the 64 warps bound it; small programs: the 32 programs
    assert residency(16, 0, 8) == {"programs_per_sm": 8, "warps_per_sm": 64, "bound_by": "warps"}
    assert residency(32, 0, 1)["bound_by"] == "programs"
    # 64 KiB of shared memory a program: 3 fit in 228 KiB
    assert residency(64, 65536, 4) == {"programs_per_sm": 3, "warps_per_sm": 12, "bound_by": "shared memory"}
