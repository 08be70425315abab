"""benchmarks/bench_scaling.py: cases on meshes of virtual CPU devices, paths side by side, profiles."""

import json
import pathlib
import subprocess
import sys

import pytest

from benchmarks import bench_scaling

ROOT = bench_scaling.ROOT


def test_paths_parse_and_refuse_names_that_are_no_implementation():
    assert bench_scaling.parse_paths("chunked:compressed,auto:pallas_gpu") == [
        ("chunked", "compressed"),
        ("auto", "pallas_gpu"),
    ]
    with pytest.raises(ValueError, match="'chunked' is not ssm:attention"):
        bench_scaling.parse_paths("chunked")
    with pytest.raises(ValueError, match="'pallas_gpu:flash' is not ssm:attention"):
        bench_scaling.parse_paths("pallas_gpu:flash")
    with pytest.raises(ValueError, match="names a pair twice"):
        bench_scaling.parse_paths("chunked:compressed,chunked:compressed")


def _run(tmp_path, *extra):
    out = tmp_path / "scaling.json"
    cmd = [sys.executable, "-m", "benchmarks.bench_scaling", "--platform", "cpu", "--config", "configs/tiny.yaml"]
    cmd += ["--length", "32", "--per-device-batch", "2", "--warmup", "1", "--steps", "1", "--repeats", "1"]
    cmd += ["--out", str(out), *extra]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    return proc, out


def test_bad_options_are_refused_before_any_case_starts(tmp_path):
    proc, out = _run(tmp_path, "--cases", "1,3-data")
    assert proc.returncode == 2 and "--cases: unknown ['3-data']" in proc.stderr
    proc, out = _run(tmp_path, "--paths", "xla:xla")
    assert proc.returncode == 2 and "'xla:xla' is not ssm:attention" in proc.stderr
    proc, out = _run(tmp_path, "--set", "mesh.data=2")
    assert proc.returncode == 2 and "--set: mesh.data is set by each case" in proc.stderr
    proc, out = _run(tmp_path, "--set", "train.remat=blok")
    assert proc.returncode == 2 and "train.remat must be one of" in proc.stderr
    assert not out.exists()


def test_a_tensor_mesh_case_and_its_profile_against_one_device(tmp_path):
    # Given one device and a 2-way tensor mesh (virtual CPU devices), each traced
    # (with the memory savers set for every case)
    savers = ["--set", "train.remat=block", "train.loss_slice=16"]
    proc, out = _run(
        tmp_path, "--cases", "1,2-tensor", "--profile", "--profile-steps", "1", "--deadline", "400", *savers
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    cases = {c["case"]: c for c in result["cases"]}
    # Then both ran on their meshes, with efficiency against one device and a kernel profile
    assert "error" not in cases["1"] and "error" not in cases["2-tensor"], result
    assert result["set"] == savers[1:]
    for c in cases.values():
        assert c["overrides"][:2] == savers[1:] and c["memory_gib_per_device"] > 0
    assert cases["2-tensor"]["mesh"]["tensor"] == 2 and cases["2-tensor"]["devices"] == 2
    assert cases["1"]["efficiency"] == pytest.approx(1.0)
    assert cases["2-tensor"]["speedup_vs_first_path"] == pytest.approx(1.0)
    for c in cases.values():
        assert c["path"] == "chunked:compressed" and c["tokens_per_s"] > 0
        assert c["profile"]["device_ms_per_step"] > 0 and 0.0 <= c["profile"]["pallas_share"] <= 1.0


TINY_TRANSFORMER = """
model:
  arch: transformer
  vocab_size: 258
  dim: 64
  n_layers: 2
  n_heads: 4
  multiple_of: 64
data:
  train: [stdlib]
  tokenizer: byte
  seq_len: 128
  batch_size: 2
"""


def test_context_mesh_cases_of_attamba_and_a_transformer_side_by_side(tmp_path):
    # Given the tiny Attamba and a tiny transformer, each on one device and a 2-way context mesh
    transformer = tmp_path / "transformer.yaml"
    transformer.write_text(TINY_TRANSFORMER)
    proc, out = _run(
        tmp_path,
        "--config",
        f"configs/tiny.yaml,{transformer}",
        "--cases",
        "1,2-context",
        "--length",
        "128",
        "--deadline",
        "500",
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    cases = {(pathlib.Path(c["config"]).stem, c["case"]): c for c in result["cases"]}
    assert all("error" not in c for c in cases.values()), result
    # Then each context case runs its one-device case's rows, each split over its two devices
    for model in ("tiny", "transformer"):
        one, two = cases[model, "1"], cases[model, "2-context"]
        assert two["mesh"]["context"] == 2 and two["devices"] == 2
        assert two["global_batch"] == one["global_batch"] == 2 and two["tokens_per_s"] > 0
        assert two["efficiency"] is not None
        # ... and its compiled step's collectives deliver bytes to each device, the one device's none
        assert sum(one["collective_bytes"].values()) == 0 < sum(two["collective_bytes"].values()), (one, two)
    assert "moved MB" in proc.stdout
    # ... the transformer on its own settings, with its speed as a ratio to Attamba's in the same run
    assert cases["transformer", "1"]["path"] == bench_scaling.CONFIG_PATH
    assert cases["tiny", "1"]["speedup_vs_first_config"] == pytest.approx(1.0)
    ratio = cases["transformer", "2-context"]["tokens_per_s"] / cases["tiny", "2-context"]["tokens_per_s"]
    assert cases["transformer", "2-context"]["speedup_vs_first_config"] == pytest.approx(ratio)


def test_a_config_named_twice_is_refused(tmp_path):
    proc, out = _run(tmp_path, "--config", "configs/tiny.yaml,configs/tiny.yaml")
    assert proc.returncode == 2 and "--config names a file twice" in proc.stderr
    assert not out.exists()
