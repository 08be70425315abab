"""The trainer: optimizer pieces, FLOP count, the hook schedule, exact resume after SIGKILL,
non-finite loss, incompatible and truncated checkpoints, bad configs, out-of-vocab tokenizers,
empty corpora, and restoring and evaluating a trained workdir."""

import gc
import json
import math
import os
import pathlib
import re
import shutil
import subprocess
import sys
from types import SimpleNamespace
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from attamba_jax.checkpointing import Checkpointer, CheckpointError, config_differences, restore_workdir
from attamba_jax.config import ConfigError, load_config
from attamba_jax.data import DataError
from attamba_jax.evaluate import load_scorer, sliding_windows
from attamba_jax.evaluate import main as evaluate_main
from attamba_jax.flops import attention_flops_per_token, mean_keys_per_query, train_flops_per_token
from attamba_jax.hooks import Hooks
from attamba_jax.model import LanguageModel, apply_model, init_model
from attamba_jax.optimizer import decay_mask, make_schedule
from attamba_jax.tokenizer import TokenizerError, train_sentencepiece
from attamba_jax.train_step import make_train_step
from attamba_jax.trainer import NonFiniteLossError, RunResult, Trainer
from tests.helpers import assert_close, cpu_devices, subprocess_xla_flags, with_overrides

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny.yaml")
MODEL = [
    "model.dim=32",
    "model.n_layers=1",
    "model.n_heads=2",
    "model.multiple_of=32",
    "model.ssm_hidden_dim=48",
    "model.ssm_heads=2",
    "model.ssm_state_dim=8",
    "model.token_chunk=4",
    "model.window=4",
]


def _corpus(root: pathlib.Path, n=30) -> str:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    for i in range(n):
        (root / f"doc{i:02d}.txt").write_text(" ".join(rng.choice(words, size=int(rng.integers(50, 200)))))
    return str(root / "*.txt")


def _overrides(corpus: str, steps=4, **extra) -> list[str]:
    base = {
        "data.train": f"[{corpus}]",
        "data.heldout_fraction": 0.2,
        "data.seq_len": 32,
        "data.batch_size": 8,
        "data.threads": 1,
        "data.prefetch": 2,
        "optim.warmup_steps": 2,
        "train.steps": steps,
        "train.log_every": 1,
        "train.eval_every": 100,
        "train.eval_batches": 2,
        "train.checkpoint_every": 2,
        "train.keep_last": 10,
    }
    base.update(extra)
    return MODEL + [f"{k}={v}" for k, v in base.items()]


def _subprocess_env(cache_dir) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    env["XLA_FLAGS"] = subprocess_xla_flags(1)  # one CPU device: the subprocesses compile less
    env["JAX_COMPILATION_CACHE_DIR"] = str(cache_dir)  # the three runs share compiled steps
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    return env


def _train_losses(workdir: pathlib.Path) -> dict[int, float]:
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if r["kind"] == "train"]
    assert steps == sorted(set(steps)), f"each step logged once, in order: {steps}"
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


def _final_state(workdir: pathlib.Path, step: int):
    return ocp.PyTreeCheckpointer().restore(str(workdir / "checkpoints" / str(step) / "state"))


# --- pieces -------------------------------------------------------------------------------


def test_weight_decay_skips_norms_and_ssm_scalars():
    cfg = load_config(TINY, with_overrides(MODEL, "model.n_layers=2", "model.ssm_dt_bias=true"))
    _, params = nnx.split(nnx.eval_shape(lambda: LanguageModel(cfg.model, rngs=nnx.Rngs(0))))  # shapes only
    flat = {jax.tree_util.keystr(p): m for p, m in jax.tree_util.tree_leaves_with_path(decay_mask(params))}
    skipped = sorted(k for k, decays in flat.items() if not decays)
    assert all(any(s in k for s in ("A_log", "'D'", "dt_bias", "norm']")) for k in skipped), skipped
    assert (
        sum("A_log" in k for k in skipped) == sum("dt_bias" in k for k in skipped) == 2
    )  # layers (K and V SSMs stacked)
    assert any("['norm']['weight']" == k[: len("['norm']['weight']")] for k in skipped)  # the final norm
    decayed = [k for k, decays in flat.items() if decays]
    assert all("kernel" in k or "embedding" in k or "conv_weight" in k or "out_proj" in k for k in decayed), decayed


def test_schedule_warms_up_linearly_then_decays_to_min_ratio():
    cfg = load_config(
        TINY, ["optim.lr=1e-2", "optim.warmup_steps=10", "optim.min_lr_ratio=1e-3", "train.steps=110"]
    ).optim
    schedule = make_schedule(cfg, 110)
    np.testing.assert_allclose([schedule(s) for s in (0, 5, 10)], [0.0, 5e-3, 1e-2], rtol=1e-6)
    np.testing.assert_allclose(schedule(60), 1e-2 * (1e-3 + (1 - 1e-3) * 0.5), rtol=1e-5)  # cosine midpoint
    np.testing.assert_allclose(schedule(110), 1e-5, rtol=1e-5)


def test_grad_accumulation_remat_and_the_sliced_loss_give_the_same_step():
    cfg = load_config(TINY, MODEL + ["data.seq_len=16", "data.batch_size=4", "optim.warmup_steps=0", "train.steps=1"])
    graphdef, params = init_model(cfg.model)
    # Plain SGD with lr 1: the step moves each parameter by exactly its (accumulated) gradient,
    # so the comparison is of gradients (Adam's first step, lr·g/(|g|+eps), would amplify float32
    # rounding wherever |g| is near eps).
    tx = optax.sgd(1.0)
    rng = np.random.default_rng(0)
    batch = {
        "inputs": rng.integers(0, 256, (4, 16)).astype(np.int32),
        "targets": rng.integers(0, 256, (4, 16)).astype(np.int32),
        "weights": (rng.random((4, 16)) > 0.3).astype(np.float32),
    }
    results = []
    for accum, options in ((1, {}), (2, {}), (1, {"remat": "block", "loss_slice": 5})):
        step = jax.jit(make_train_step(graphdef, tx, lambda count: 1.0, **options))
        state = {"params": params, "opt_state": tx.init(params), "step": jnp.int32(0)}
        split = {k: v.reshape(accum, 4 // accum, 16) for k, v in batch.items()}
        results.append(step(state, split))
    (s1, m1), *others = results
    for s2, m2 in others:
        np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-6)
        np.testing.assert_allclose(m1["grad_norm"], m2["grad_norm"], rtol=1e-5)
        # float32 rounding of the two summation orders, relative to the parameters' scale (some sit near 0)
        assert_close(s1["params"], s2["params"], 1e-5)


def test_flops_count_what_attamba_attends_to():
    # SPEC §4: mean keys per query of layer 0 at T = 1024.
    for path, keys in (
        ("attamba_k8_w8", 72.5),
        ("attamba_k4_w8", 135.5),
        ("attamba_k16_w16", 48.4),
        ("transformer_isoparam", 512.5),
    ):
        cfg = load_config(REPO / "configs" / "paper" / f"{path}.yaml").model
        assert mean_keys_per_query(cfg, 1024, 0) == pytest.approx(keys, abs=0.06)
    cfg = load_config(REPO / "configs" / "paper" / "attamba_k8_w8.yaml").model
    full = load_config(REPO / "configs" / "paper" / "attamba_k8_w8.yaml", ["model.pseudo_chunk=true"]).model
    assert attention_flops_per_token(cfg, 1024) < attention_flops_per_token(full, 1024) / 6
    n = 62_751_488
    expected = 6 * (n - 32000 * 512) + 3 * attention_flops_per_token(cfg, 1024)
    assert train_flops_per_token(cfg, n, 1024) == pytest.approx(expected)


def test_config_differences_allow_optim_train_and_implementation_changes_only():
    cfg = load_config(TINY)
    a = json.loads(json.dumps(cfg.to_dict()))
    changes = ["train.steps=999", "optim.lr=1e-4", "data.threads=3"]
    changes += ["model.ssm_implementation=chunked", "model.attention_implementation=dense"]  # the same function
    b = json.loads(json.dumps(load_config(TINY, changes).to_dict()))
    assert config_differences(a, b) == []
    c = json.loads(json.dumps(load_config(TINY, ["model.dim=64", "data.seq_len=128", "seed=5"]).to_dict()))
    diffs = config_differences(a, c)
    assert [d.split(":")[0] for d in diffs] == ["data.seq_len", "model.dim", "seed"]
    assert "128 in the checkpoint, 64 now" in diffs[1]


def test_sliding_windows_score_every_token_once_with_context():
    for n, t, stride in ((1, 8, 4), (7, 8, 4), (8, 8, 4), (9, 8, 4), (100, 16, 5), (100, 16, 16)):
        scored = []
        for w in sliding_windows(n, t, stride):
            assert w.stop - w.start <= t
            targets = range(w.score_from + 1, w.stop + 1)
            # Each scored target sees >= t - stride tokens, or everything from BOS on.
            assert all(j - w.start >= min(j, t - stride) for j in targets)
            scored.extend(targets)
        assert scored == list(range(1, n + 1))


def _scheduled_calls(stop_at=None) -> dict[str, list[tuple[int, list[int]]]]:
    """(step, steps whose metrics it was given) of each call of two hooks, in a run resumed at
    step 2 that ends at step 11, or at the stop signal read after ``stop_at``."""
    trainer = SimpleNamespace(start_step=2, cfg=SimpleNamespace(train=SimpleNamespace(steps=11)), checkpointer=None)
    hooks, calls = Hooks(trainer), {"every3": [], "every4_not_on_stop": []}

    def recorder(name):
        return lambda info: calls[name].append((info.step, [s for s, _ in info.metrics()]))

    hooks.add(recorder("every3"), every=3)
    hooks.add(recorder("every4_not_on_stop"), every=4, on_stop=False)
    for step in range(3, 12):
        metrics = {
            "loss": jnp.float32(step),
            "grad_norm": jnp.float32(1.0),
            "lr": jnp.float32(0.1),
            "state_finite": 1.0,
        }
        hooks.run(step, metrics, stopping=step == stop_at)
        if step == stop_at:
            break
    return calls


def test_hooks_run_every_n_steps_and_after_the_last_with_the_metrics_since_their_last_call():
    assert _scheduled_calls() == {
        "every3": [(3, [3]), (6, [4, 5, 6]), (9, [7, 8, 9]), (11, [10, 11])],
        "every4_not_on_stop": [(4, [3, 4]), (8, [5, 6, 7, 8]), (11, [9, 10, 11])],
    }


def test_hooks_run_at_a_stop_signal_unless_added_with_on_stop_false():
    assert _scheduled_calls(stop_at=7) == {
        "every3": [(3, [3]), (6, [4, 5, 6]), (7, [7])],
        "every4_not_on_stop": [(4, [3, 4])],
    }


def test_checkpoint_retention_keeps_the_newest_and_every_nth(tmp_path):
    ckpt = Checkpointer(tmp_path / "ckpt", keep_last=2, keep_every=4)
    state = {"w": jnp.arange(3.0)}
    for step in range(1, 10):
        ckpt.save(step, {"w": state["w"] + step}, None, {"step": step, "config": {}})
    ckpt.wait()
    assert ckpt.all_steps() == [4, 8, 9]
    assert ckpt.read_meta(8)["step"] == 8
    restored = ckpt.restore(
        8, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state), None
    )
    np.testing.assert_array_equal(restored["w"], np.arange(3.0) + 8)
    ckpt.close()


# --- preemption soak: exact resume through five SIGTERMs and a SIGKILL during a save ---------

_KILL_DURING_SAVE = """
import os, signal, sys
from attamba_jax import checkpointing
from attamba_jax.config import load_config
from attamba_jax.trainer import Trainer
config, workdir, kill_step, *overrides = sys.argv[1:]
save = checkpointing.Checkpointer.save
def save_then_die(self, step, *args, **kwargs):
    save(self, step, *args, **kwargs)  # returns with the write in flight (in <step>.orbax-checkpoint-tmp)
    if step == int(kill_step):
        assert (self.directory / f"{step}.orbax-checkpoint-tmp").is_dir(), "the write is in flight"
        os.kill(os.getpid(), signal.SIGKILL)
checkpointing.Checkpointer.save = save_then_die
Trainer(load_config(config, overrides), workdir, progress=False).run()
"""


def _records(workdir: pathlib.Path) -> list[dict]:
    """metrics.jsonl's records without their timings."""
    timing = ("tokens_per_s", "mfu")
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in timing} for line in lines]


def _stop_at(step: int):
    """A callback that sends SIGTERM after ``step``; the loop sees it after the next step."""
    import signal

    def callback(s):
        if s == step:
            os.kill(os.getpid(), signal.SIGTERM)

    return callback


@pytest.mark.filterwarnings("ignore:Sharding info not provided")  # the comparison reads checkpoints without a target
def test_a_run_through_five_sigterms_and_a_sigkill_during_a_save_ends_as_an_uninterrupted_run(tmp_path):
    # Given 60 steps (logged every 4, evaluated every 20, saved every 10) run straight through, and
    # the same run stopped by SIGTERM at 5 random steps and killed once while a save is in flight
    corpus = _corpus(tmp_path / "corpus")
    options = {"train.remat": "block", "train.loss_slice": 8}  # the memory savers, through a whole run
    cadence = {"train.log_every": 4, "train.eval_every": 20, "train.checkpoint_every": 10}
    args = _overrides(corpus, steps=60, **cadence, **options)
    Trainer(load_config(TINY, args), tmp_path / "a", progress=False).run()

    rng = np.random.default_rng(22)
    kill_save = int(rng.choice([30, 40]))  # the periodic save the SIGKILL lands in
    before = sorted(int(s) for s in rng.choice(np.arange(1, kill_save - 12), size=3, replace=False))
    after = sorted(int(s) for s in rng.choice(np.arange(kill_save + 1, 58), size=2, replace=False))
    schedule = f"SIGTERM after steps {before}, SIGKILL in the save of {kill_save}, SIGTERM after {after}"
    run_b = lambda callback=None: Trainer(load_config(TINY, args), tmp_path / "b", progress=False).run(callback)
    for s in before:
        result = run_b(_stop_at(s))
        assert (result.status, result.step) == ("signal", s + 1), schedule

    # the killed run computes as this process does: the same devices, the same matmul precision
    env = _subprocess_env(tmp_path / "jax_cache")
    env["XLA_FLAGS"] = os.environ["XLA_FLAGS"]
    env["JAX_DEFAULT_MATMUL_PRECISION"] = str(jax.config.jax_default_matmul_precision)
    killed = subprocess.run(
        [sys.executable, "-c", _KILL_DURING_SAVE, TINY, str(tmp_path / "b"), str(kill_save), *args],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert not (tmp_path / "b" / "checkpoints" / str(kill_save)).exists(), f"{schedule}: the save was not in flight"

    for s in after:
        result = run_b(_stop_at(s))
        assert (result.status, result.step) == ("signal", s + 1), schedule
    assert run_b().status == "finished"

    # Then every record of metrics.jsonl (losses, gradient norms, held-out losses) and the final
    # state equal the uninterrupted run's
    assert _records(tmp_path / "b") == _records(tmp_path / "a"), schedule
    assert [r["step"] for r in _records(tmp_path / "a") if r["kind"] == "train"] == list(range(4, 61, 4))
    chex.assert_trees_all_equal(_final_state(tmp_path / "a", 60), _final_state(tmp_path / "b", 60))


# --- one trained workdir, many checks (trained once per test process) ----------------------


class Trained(NamedTuple):
    run: pathlib.Path  # the workdir: checkpoints 2 and 4; do not change it, copy it (_copy)
    overrides: list[str]
    result: RunResult
    params: nnx.State  # the parameters at step 4, on the host


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Trained:
    root = tmp_path_factory.mktemp("trained")
    overrides = _overrides(_corpus(root / "corpus"), steps=4)
    trainer = Trainer(load_config(TINY, overrides), root / "run", progress=False)
    result = trainer.run()
    return Trained(root / "run", overrides, result, jax.device_get(trainer.state["params"]))


def _copy(trained: Trained, tmp_path: pathlib.Path) -> pathlib.Path:
    shutil.copytree(trained.run, tmp_path / "run")
    return tmp_path / "run"


@pytest.fixture(scope="module")
def scorer(trained):
    return load_scorer(trained.run, batch_size=2)


TEXT = "alpha beta gamma delta " * 40  # 920 bytes: many windows of T = 32


def test_a_run_writes_checkpoints_config_metrics_tensorboard_and_a_plot(trained):
    result, run = trained.result, trained.run
    assert result.status == "finished" and result.step == 4
    assert result.last_eval_loss < result.first_eval_loss
    assert sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == [2, 4]
    assert (run / "loss.png").stat().st_size > 1000
    assert any((run / "tensorboard").iterdir())
    assert load_config(run / "config.yaml") == load_config(TINY, trained.overrides)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) and r["grad_norm"] > 0 and r["lr"] >= 0 for r in train)
    assert train[0]["tokens_per_s"] is None and train[-1]["tokens_per_s"] > 0  # step 1 compiles, so it is not timed
    assert [r["step"] for r in records if r["kind"] == "eval"] == [0, 4]


def test_rerunning_a_finished_workdir_does_nothing(trained, tmp_path):
    again = Trainer(load_config(TINY, trained.overrides), _copy(trained, tmp_path), progress=False).run()
    assert again.status == "already_done" and again.step == 4


def test_another_model_config_is_refused_naming_the_key_and_touching_nothing(trained, tmp_path):
    run = _copy(trained, tmp_path)
    before = (run / "config.yaml").read_text()
    with pytest.raises(CheckpointError, match=r"different config:\n  model.dim: 32 in the checkpoint, 48 now"):
        Trainer(load_config(TINY, with_overrides(trained.overrides, "model.dim=48")), run, progress=False)
    assert (run / "config.yaml").read_text() == before


# Orbax's reader coroutines for the other arrays of the truncated checkpoint fail and are dropped
# after the first error; the checkpointer collects them without a report each: none may surface.
@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
def test_a_truncated_checkpoint_is_an_error_naming_the_folder_and_the_previous_step(trained, tmp_path):
    damaged = _copy(trained, tmp_path)
    state_dir = damaged / "checkpoints" / "4" / "state"
    biggest = max((p for p in state_dir.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    biggest.write_bytes(biggest.read_bytes()[: biggest.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"checkpoints/4 cannot be read .*resume from step 2"):
        Trainer(load_config(TINY, trained.overrides), damaged, progress=False)
    assert (damaged / "checkpoints" / "2").is_dir() and (damaged / "checkpoints" / "4").is_dir()
    gc.collect()  # anything left would be reported now, and fail the test


def _flip_bytes(path: pathlib.Path, n: int):
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid : mid + n] = bytes(b ^ 0xFF for b in data[mid : mid + n])
    path.write_bytes(bytes(data))  # same size: only the values differ


@pytest.mark.parametrize(
    "damage, message",
    [
        ("flip", r"is damaged: array \S+ does not match the checksum saved with it"),
        ("truncate", r"cannot be read \(state or data iterator: .*\)"),
    ],
)
def test_a_damaged_checkpoint_is_refused_on_the_command_line_with_the_message_alone(trained, tmp_path, damage, message):
    # Given checkpoint 4's largest data file with one byte flipped in its middle (its size
    # unchanged: only the checksums see it), or cut to half
    damaged = _copy(trained, tmp_path)
    state_dir = damaged / "checkpoints" / "4" / "state"
    biggest = max((p for p in state_dir.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    if damage == "flip":
        _flip_bytes(biggest, 1)
    else:
        biggest.write_bytes(biggest.read_bytes()[: biggest.stat().st_size // 2])
    # When train.py resumes the workdir
    cmd = [sys.executable, "train.py", "--no-progress", "--config", TINY, "--workdir", str(damaged), *trained.overrides]
    run = subprocess.run(cmd, env=_subprocess_env(tmp_path / "cache"), cwd=REPO, capture_output=True, text=True)
    # Then it exits 2, stderr holding the message alone: the checkpoint, what is wrong, the way out
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr[-3000:]
    assert re.fullmatch(
        rf"error: checkpoint \S+/checkpoints/4 {message}; "
        r"to resume from step 2, pass --resume-step 2 \(nothing is deleted\)",
        lines[0],
    ), lines[0]
    assert (damaged / "checkpoints" / "4").is_dir()  # nothing deleted


def test_resume_step_resumes_from_an_older_checkpoint_and_keeps_the_later_ones(trained, tmp_path):
    # Given a workdir whose checkpoint 4 is damaged
    run = _copy(trained, tmp_path)
    _flip_bytes(
        max((p for p in (run / "checkpoints/4/state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size), 1
    )
    with pytest.raises(CheckpointError, match=r"no checkpoint step 3 in \S+ \(it has \[2, 4\]\)"):
        Trainer(load_config(TINY, trained.overrides), run, progress=False, resume_step=3)
    # When the run resumes from step 2
    trainer = Trainer(load_config(TINY, trained.overrides), run, progress=False, resume_step=2)
    assert trainer.start_step == 2
    (moved,) = (run / "superseded").iterdir()
    assert moved.name.startswith("4-") and (moved / "state").is_dir()  # kept, out of the way
    trainer.run()
    # Then it trains steps 3 and 4 again, exactly as the first time
    chex.assert_trees_all_equal(jax.device_get(trainer.state["params"]), trained.params)
    assert sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == [2, 4]


def _edit_meta(run: pathlib.Path, step: int, edit):
    path = run / "checkpoints" / str(step) / "meta" / "metadata"
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))


def test_parameters_that_differ_from_their_checksum_are_refused_by_readers(trained, tmp_path):
    damaged = _copy(trained, tmp_path)
    name = next(
        k
        for k in json.loads((damaged / "checkpoints/4/meta/metadata").read_text())["checksums"]
        if k.startswith("params/")
    )
    _edit_meta(damaged, 4, lambda m: m["checksums"].update({name: "0" * 16}))
    with pytest.raises(CheckpointError, match=rf"checkpoints/4 is damaged: array {re.escape(name)} does not match"):
        restore_workdir(damaged)
    restore_workdir(damaged, step=2)  # the other checkpoint is sound


def test_a_data_iterator_state_that_differs_from_its_checksum_is_refused(trained, tmp_path):
    damaged = _copy(trained, tmp_path)
    (state,) = (damaged / "checkpoints" / "4" / "data").glob("process_0*.json")
    record = json.loads(state.read_text())
    record["next_index"] += 1
    state.write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match=r"checkpoints/4 is damaged: the data iterator's state does not match"):
        Trainer(load_config(TINY, trained.overrides), damaged, progress=False)


def test_checkpoints_without_checksums_restore_unverified(trained, tmp_path):
    old = _copy(trained, tmp_path)
    _edit_meta(old, 4, lambda m: (m.pop("checksums"), m.pop("iterator_checksum")))
    chex.assert_trees_all_equal(jax.device_get(restore_workdir(old).params), trained.params)


def test_a_non_finite_loss_stops_the_run_naming_the_step_and_keeps_the_last_good_checkpoint(trained, tmp_path):
    run = _copy(trained, tmp_path)
    longer = with_overrides(trained.overrides, "train.steps=8")
    trainer = Trainer(load_config(TINY, longer), run, progress=False)
    assert trainer.start_step == 4

    def poison(step):
        if step == 5:  # after step 5 is dispatched: step 6 computes on NaN parameters
            trainer.state["params"] = jax.tree.map(lambda x: x * jnp.nan, trainer.state["params"])

    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at step 6 .*last good checkpoint is step 4"):
        trainer.run(poison)
    assert sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == [2, 4]
    resumed = Trainer(load_config(TINY, longer), run, progress=False)
    assert resumed.start_step == 4
    assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(resumed.state["params"]))
    resumed.close()


def test_an_update_that_overflows_stops_the_run_before_its_state_is_saved(trained, tmp_path):
    # Given a resumed run whose optimizer moments hold inf after step 5: step 6's loss and gradient
    # are finite, but the parameters it updates are not (as when an extreme lr overflows the update)
    run = _copy(trained, tmp_path)
    longer = with_overrides(trained.overrides, "train.steps=8")
    trainer = Trainer(load_config(TINY, longer), run, progress=False)

    def poison(step):
        if step == 5:
            inf = lambda x: x * jnp.inf if jnp.issubdtype(x.dtype, jnp.floating) and x.ndim else x
            trainer.state["opt_state"] = jax.tree.map(inf, trainer.state["opt_state"])

    # Then the step is named, step 6 (a checkpoint step) is not saved, and the last checkpoint is good
    with pytest.raises(
        NonFiniteLossError, match=r"non-finite parameters or optimizer state after the update at step 6 "
    ):
        trainer.run(poison)
    assert sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == [2, 4]


def test_restoring_a_workdir_gives_the_parameters_the_trainer_saved_on_one_device(trained):
    cfg, graphdef, params, step = restore_workdir(trained.run)
    assert step == 4 and cfg == load_config(TINY, trained.overrides)
    chex.assert_trees_all_equal(jax.device_get(params), trained.params)
    assert {x.sharding for x in jax.tree.leaves(params)} == {jax.sharding.SingleDeviceSharding(jax.devices()[0])}
    assert graphdef == nnx.split(nnx.eval_shape(lambda: LanguageModel(cfg.model, rngs=nnx.Rngs(0))))[0]


def test_restoring_a_missing_step_is_an_error_naming_the_steps_there_are(trained):
    with pytest.raises(CheckpointError, match=r"no checkpoint step 3 in .*checkpoints \(it has \[2, 4\]\)"):
        restore_workdir(trained.run, step=3)


def test_evaluation_scores_the_latest_checkpoint_in_tokens_words_and_bytes(scorer):
    scorer, step = scorer
    assert step == 4
    score = scorer.score_text(TEXT, stride=16)
    report = score.report()
    assert report["tokens"] == report["bytes"] == len(TEXT) and report["words"] == 160
    assert report["bits_per_byte"] == pytest.approx(score.nll / (math.log(2) * len(TEXT)))
    assert report["word_perplexity"] == pytest.approx(math.exp(score.nll / 160))
    assert report["token_perplexity"] == pytest.approx(math.exp(score.nll / len(TEXT)))


def test_a_document_shorter_than_the_context_scores_as_one_forward_pass(scorer):
    scorer, _ = scorer
    short = "beta gamma alpha"
    tokens = jnp.asarray([[256] + list(short.encode())], jnp.int32)
    graphdef, _ = init_model(scorer.cfg.model)
    logits = jax.jit(lambda p, x: apply_model(graphdef, p, x))(scorer.params, tokens[:, :-1])
    nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), tokens[:, 1:]).sum()
    assert scorer.score_text(short, stride=16).nll == pytest.approx(float(nll), rel=1e-5)


def test_another_chunk_length_at_test_time_scores_the_same_tokens_differently(trained, scorer):
    scorer, _ = scorer
    score = scorer.score_text(TEXT, stride=16)
    other, _ = load_scorer(trained.run, batch_size=2, token_chunk=2)  # trained with K = 4
    other_score = other.score_text(TEXT, stride=16)
    assert other_score.tokens == score.tokens and other_score.nll != pytest.approx(score.nll, rel=1e-6)


# --- errors before anything runs ------------------------------------------------------------


def _batch_not_a_multiple_of_grad_accum(tmp_path):
    load_config(TINY, _overrides(_corpus(tmp_path / "corpus"), **{"optim.grad_accum": 3}))


def _unknown_key(tmp_path):
    load_config(TINY, ["optim.learning_rate=1"])


def _warmup_beyond_the_run(tmp_path):
    load_config(TINY, _overrides(_corpus(tmp_path / "corpus"), **{"optim.warmup_steps": 50}))


def _batch_not_a_multiple_of_8_devices(tmp_path):
    devices = cpu_devices(8)
    cfg = load_config(TINY, _overrides(_corpus(tmp_path / "corpus"), **{"data.batch_size": 4}))
    Trainer(cfg, tmp_path / "run", progress=False, devices=devices[:8])


@pytest.mark.parametrize(
    "build, match",
    [
        (_batch_not_a_multiple_of_grad_accum, "data.batch_size .8. must be a multiple of optim.grad_accum .3."),
        (_unknown_key, "unknown config key optim.learning_rate"),
        (_warmup_beyond_the_run, "optim.warmup_steps .50. must not exceed train.steps .4."),
        (_batch_not_a_multiple_of_8_devices, "multiple of mesh.data x mesh.fsdp = 8 x 1 = 8"),
    ],
    ids=["batch_vs_grad_accum", "unknown_key", "warmup_vs_steps", "batch_vs_mesh"],
)
def test_bad_configs_are_rejected_with_the_key_named(tmp_path, build, match):
    with pytest.raises(ConfigError, match=match):
        build(tmp_path)


def _tokenizer_beyond_the_vocab(tmp_path) -> list[str]:
    (tmp_path / "lines.txt").write_text("\n".join(f"alpha beta {i} gamma delta" for i in range(300)))
    sp = train_sentencepiece([tmp_path / "lines.txt"], tmp_path / "sp", vocab_size=300, threads=1)
    return _overrides(_corpus(tmp_path / "corpus"), **{"data.tokenizer": sp})


def _empty_corpus(tmp_path) -> list[str]:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("")
    return _overrides(str(tmp_path / "empty" / "*.txt"))


@pytest.mark.parametrize(
    "overrides, error, match",
    [
        (_tokenizer_beyond_the_vocab, TokenizerError, "300 ids but model.vocab_size is 258"),
        (_empty_corpus, DataError, "hold no training documents"),
    ],
    ids=["tokenizer_beyond_vocab", "empty_corpus"],
)
def test_tokenizer_beyond_the_model_vocab_and_empty_corpus_are_errors(tmp_path, overrides, error, match):
    with pytest.raises(error, match=match):
        Trainer(load_config(TINY, overrides(tmp_path)), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_evaluate_refuses_an_empty_file_and_a_binary_one(trained, tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "weights.txt").write_bytes(bytes(range(256)) * 8)
    for name, message in (
        ("empty.txt", "is empty: there is nothing to score"),
        ("weights.txt", "is not text: it holds NUL bytes"),
    ):
        assert evaluate_main(["--workdir", str(trained.run), "--text", str(tmp_path / name)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: --text {tmp_path / name} {message}") and err.count("\n") == 1, err


def test_generate_and_evaluate_on_a_workdir_print_no_library_warnings(trained, tmp_path):
    # Orbax's absl warnings about a read-only manager, runpy's about a module run twice: none
    (tmp_path / "t.txt").write_text(TEXT)
    env = _subprocess_env(tmp_path / "cache")
    for cmd, expected in (
        (["attamba_jax.generate", "--prompt", "ab", "--max-new-tokens", "3"], f"checkpoint step 4 of {trained.run}\n"),
        (["attamba_jax.evaluate", "--text", str(tmp_path / "t.txt")], ""),
    ):
        run = subprocess.run(
            [sys.executable, "-m", *cmd[:1], "--workdir", str(trained.run), *cmd[1:]],
            env=env,
            cwd=REPO,
            capture_output=True,
            text=True,
        )
        assert run.returncode == 0 and run.stderr == expected, run.stderr


def test_a_run_stopped_by_a_signal_mid_window_logs_the_records_of_a_run_that_did_not_stop(tmp_path):
    # Given the same 8 steps logged every 4, once straight and once stopped by SIGTERM after step 6
    # (checkpoint at the signal: steps 5 and 6 are in no record yet) and resumed
    import signal

    corpus = _corpus(tmp_path / "corpus")
    args = _overrides(corpus, steps=8, **{"train.log_every": 4, "train.checkpoint_every": 100})
    Trainer(load_config(TINY, args), tmp_path / "a", progress=False).run()

    def stop(step):
        if step == 5:  # read after step 6
            os.kill(os.getpid(), signal.SIGTERM)

    stopped = Trainer(load_config(TINY, args), tmp_path / "b", progress=False).run(stop)
    assert stopped.status == "signal" and stopped.step == 6
    Trainer(load_config(TINY, args), tmp_path / "b", progress=False).run()
    # Then metrics.jsonl holds the same records, value for value (timings aside)
    timing = ("tokens_per_s", "mfu")
    records = lambda run: [
        {k: v for k, v in json.loads(line).items() if k not in timing}
        for line in (run / "metrics.jsonl").read_text().splitlines()
    ]
    assert records(tmp_path / "b") == records(tmp_path / "a")
    assert [r["step"] for r in records(tmp_path / "a") if r["kind"] == "train"] == [4, 8]
