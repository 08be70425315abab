"""benchmarks/trace_summary.py: per-kernel device time from a JAX profiler trace."""

import gzip
import json
import pathlib

import jax
import jax.numpy as jnp
import pytest

from benchmarks import trace_summary


def _write_trace(root: pathlib.Path, events: list[dict]):
    path = root / "plugins" / "profile" / "run" / "perfetto_trace.json.gz"
    path.parent.mkdir(parents=True)
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)


def test_device_kernels_are_summed_by_name_and_family(tmp_path):
    # Given a GPU-like trace (a device process beside the host), only the device's kernels
    # count, summed per name and per family, per step.
    meta = lambda pid, name: {"ph": "M", "pid": pid, "name": "process_name", "args": {"name": name}}
    kernel = lambda pid, name, dur: {"ph": "X", "pid": pid, "tid": 1, "ts": 0, "dur": dur, "name": name}
    _write_trace(
        tmp_path,
        [
            meta(1, "/host:CPU"),
            meta(2, "/device:GPU:0"),
            kernel(1, "PjitFunction(step)", 5000.0),
            kernel(2, "ssd_fwd", 100.0),
            kernel(2, "ssd_bwd", 300.0),
            kernel(2, "nvjet_sm90_tst_128x160", 400.0),
            kernel(2, "loop_add_fusion_3", 200.0),
            kernel(2, "nvjet_sm90_tst_128x160", 400.0),
            kernel(2, "cudnn_generated_fort_native_sdpa", 600.0),
            kernel(2, "ncclDevKernel_AllGather_RING_LL", 200.0),
        ],
    )
    table = trace_summary.kernel_table(tmp_path, steps=2)
    assert table["device_ms_per_step"] == pytest.approx(1.1)
    families = {r["name"]: r["ms_per_step"] for r in table["families"]}
    assert families == pytest.approx(
        {"matmul": 0.4, "cuDNN attention": 0.3, "SSD (Pallas)": 0.2, "other fusions": 0.1, "collectives (NCCL)": 0.1}
    )
    top = table["kernels"][0]
    assert (top["name"], top["calls_per_step"], top["share"]) == (
        "nvjet_sm90_tst_128x160",
        1.0,
        pytest.approx(0.4 / 1.1),
    )
    assert "matmul" in trace_summary.format_table(table, "step")


def test_a_real_trace_is_read(tmp_path):
    # on the default backend's device: the CPU, or the GPU where there is one
    f = jax.jit(lambda x: jnp.sin(x @ x).sum())
    x = jax.device_put(jnp.ones((64, 64)), jax.devices()[0])
    f(x).block_until_ready()
    with jax.profiler.trace(str(tmp_path), create_perfetto_trace=True):
        f(x).block_until_ready()
    table = trace_summary.kernel_table(tmp_path, steps=1)
    assert table["device_ms_per_step"] > 0 and table["kernels"]
    assert sum(r["share"] for r in table["families"]) == pytest.approx(1.0)


def test_no_trace_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="perfetto_trace.json.gz"):
        trace_summary.kernel_table(tmp_path, steps=1)


def test_kernels_are_attributed_to_their_hlo_ops():
    table = {
        "kernels": [
            {"name": "loop_add_fusion_17", "ms_per_step": 0.4, "calls_per_step": 8.0, "share": 0.1},
            {"name": "nvjet_sm90_tst_128x160", "ms_per_step": 1.0, "calls_per_step": 9.0, "share": 0.2},
        ]
    }
    hlo = (
        "  %loop_add_fusion.17 = bf16[16,1024,1536]{2,1,0} fusion(%a, %b), kind=kLoop, calls=%fused_add.17, "
        'metadata={op_name="jit(step_fn)/while/body/eval_jaxpr/transpose(jvp(jit(silu)))/add_any" stack_frame_id=3}\n'
        "  %bitcast.1 = bf16[16384,1536]{1,0} bitcast(%loop_add_fusion.17)\n"
    )
    rows = trace_summary.attribute(table, hlo)["kernels"]
    assert rows[0]["shape"] == "bf16[16,1024,1536]{2,1,0}"
    assert rows[0]["op"] == "transpose(jvp(jit(silu)))/add_any"
    assert rows[1]["op"] == ""  # a cuBLAS kernel has no instruction of its name
