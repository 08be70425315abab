"""benchmarks/bench_ssm_ops.py in the interpreter (the CPU smoke run its docstring names): every row
and sweep setting measured, each kernel's result held to the XLA path's."""

import json
import subprocess
import sys

from benchmarks.bench_ssm_ops import SWEEPS
from benchmarks.bench_train_step import ROOT


def test_smoke_run_times_every_setting_and_agrees_with_xla(tmp_path):
    # Given the norm at a tiny size, its sweep included
    out = tmp_path / "ops.json"
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.bench_ssm_ops",
        "--ops",
        "gated_norm",
        "--sizes",
        "1x16",
        "--sweep",
        "1x16",
    ]
    cmd += ["--reps", "1", "--trials", "1", "--interpret", "--out", str(out)]
    # When the benchmark runs
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    # Then the XLA path and every setting ran forward and forward+backward, and agree (float32 math, bf16 data)
    assert len(result["sweep"]) == 2 * (1 + len(SWEEPS["gated_norm"])) and len(result["rows"]) == 4
    assert all(r["max_rel_err_vs_xla"] < 2e-2 and r["device_ms"] > 0 for r in result["sweep"] + result["rows"])
    assert "kernel / xla" in proc.stdout
