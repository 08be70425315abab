"""The MQAR recall task: its sequences follow the protocol, the accuracy counts the queried
positions only, and the tiny preset runs, its full-attention model learning a 4-pair task."""

import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from attamba_jax.model import init_model
from attamba_jax.tasks import mqar

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_sequences_hold_the_pairs_and_ask_for_each_key_once():
    # Given fresh MQAR sequences of 128 tokens with 8 pairs over a vocabulary of 256
    setting, vocab = mqar.Setting(128, 8), 256
    batch = mqar.sequences(setting, 16, vocab, jax.random.key(0))
    inputs, targets, weights = (np.asarray(batch[k]) for k in ("inputs", "targets", "weights"))
    assert inputs.shape == targets.shape == weights.shape == (16, 128)
    np.testing.assert_array_equal(inputs[:, 1:], targets[:, :-1])  # next-token targets
    for row in range(16):
        keys, values = inputs[row, 0:16:2], inputs[row, 1:16:2]
        # Then the context holds distinct keys from the lower half (not 0) and distinct values from the upper half
        assert len(set(keys)) == 8 and keys.min() >= 1 and keys.max() < vocab // 2
        assert len(set(values)) == 8 and values.min() >= vocab // 2
        # and each key is queried once after the context, its target the value it came with
        queried = np.flatnonzero(weights[row])
        assert len(queried) == 8 and queried.min() >= 16
        assert np.all(np.diff(queried) >= 2)  # a query and its value never overlap another query
        answer = dict(zip(keys, values))
        assert sorted(inputs[row, queried]) == sorted(keys)
        assert all(targets[row, q] == answer[inputs[row, q]] for q in queried)


def test_the_gaps_follow_the_power_law_most_queries_early():
    batch = mqar.sequences(mqar.Setting(1024, 16), 64, 8192, jax.random.key(1))
    offsets = np.flatnonzero(np.asarray(batch["weights"]).reshape(-1)) % 1024 - 32
    assert np.median(offsets) < 1024 / 4  # p(g) ∝ g^(a-1): a long tail, mass at small gaps


def test_accuracy_counts_the_queried_positions_only():
    batch = jax.tree.map(np.asarray, mqar.sequences(mqar.Setting(64, 4), 8, 128, jax.random.key(2)))
    queried = batch["weights"] > 0
    # Right at every queried position and wrong everywhere else: all correct
    right_at_queries = np.where(queried, batch["targets"], (batch["targets"] + 1) % 128)
    assert mqar.accuracy(right_at_queries, batch) == (32.0, 32.0)
    # Wrong at every queried position and right everywhere else: none
    wrong_at_queries = np.where(queried, (batch["targets"] + 1) % 128, batch["targets"])
    assert mqar.accuracy(wrong_at_queries, batch) == (0.0, 32.0)


def test_mixture_rows_lay_each_setting_out_in_the_longest_row():
    settings = (mqar.Setting(64, 4), mqar.Setting(128, 8))
    batch = jax.tree.map(np.asarray, mqar.mixture(settings, 6, 128, jax.random.key(3)))
    assert batch["inputs"].shape == (6, 128)
    counts = batch["weights"].sum(axis=1)
    np.testing.assert_array_equal(counts, [4, 8, 4, 8, 4, 8])
    assert not batch["weights"][0::2, 64:].any()  # nothing counted past a shorter sequence
    # and test rows lay a setting out in a longer row; too short a row is refused
    assert mqar.mixture(settings[:1], 2, 128, jax.random.key(4), length=256)["inputs"].shape == (2, 256)
    with pytest.raises(ValueError, match="rows of 100 tokens cannot hold"):
        mqar.mixture(settings, 2, 128, jax.random.key(4), length=100)


def test_sequences_jit_and_vary_with_the_key():
    setting = mqar.Setting(64, 8)
    draw = jax.jit(lambda key: mqar.sequences(setting, 4, 64, key))
    a, b = draw(jax.random.key(5)), draw(jax.random.key(6))
    chex.assert_trees_all_equal(a, mqar.sequences(setting, 4, 64, jax.random.key(5)))
    assert not np.array_equal(a["inputs"], b["inputs"])


def test_the_unit_rate_optimizer_scaled_is_the_optimizer_at_that_rate():
    # The grid trains its learning rates at once: AdamW at peak 1, then optax.scale(lr)
    from attamba_jax.config import OptimConfig
    from attamba_jax.optimizer import make_optimizer

    preset = mqar.PRESETS["tiny"]
    unit = mqar._unit_optimizer(preset)
    params = {"w": jax.random.normal(jax.random.key(7), (8, 8)), "bias": jnp.ones((8,))}
    grads = jax.tree.map(lambda x: 0.3 * jnp.cos(x), params)
    for lr in (1e-3, 3e-2):
        direct, _ = make_optimizer(
            OptimConfig(lr=lr, warmup_steps=preset.steps // 10, min_lr_ratio=0.1, weight_decay=0.1), preset.steps
        )
        scaled = optax.chain(unit, optax.scale(lr))
        s_direct, s_scaled = direct.init(params), scaled.init(params)
        for _ in range(3):  # through the warmup, with decay on the matrix
            u_direct, s_direct = direct.update(grads, s_direct, params)
            u_scaled, s_scaled = scaled.update(grads, s_scaled, params)
            chex.assert_trees_all_close(u_scaled, u_direct, rtol=1e-6, atol=1e-9)


def test_the_loss_at_the_queries_is_the_weighted_loss_over_every_position():
    # Given the tiny transformer (what is tested is the head at the queries, not the model) and a
    # mixture batch (rows of 4 and 8 queries in 64 tokens)
    from attamba_jax.train_step import nll_sum

    preset = mqar.PRESETS["tiny"]
    _, cfg = mqar._grid(preset, 64)["transformer"]
    graphdef, params = init_model(cfg, seed=3)
    batch = mqar.mixture((mqar.Setting(32, 4), mqar.Setting(64, 8)), 4, preset.vocab_size, jax.random.key(8))
    # Then the head at the queried positions only gives the mean over all weighted positions, and its gradient

    def reference(p):
        total, weight = nll_sum(graphdef, p, batch)
        return total / weight

    got, got_grad = jax.jit(jax.value_and_grad(lambda p: mqar.query_loss(graphdef, p, batch, most=8)))(params)
    want, want_grad = jax.jit(jax.value_and_grad(reference))(params)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    chex.assert_trees_all_close(got_grad, want_grad, rtol=1e-5, atol=1e-6)


def test_rates_trained_at_once_equal_each_trained_alone():
    # Given the tiny preset shortened to 6 steps
    preset = mqar.PRESETS["tiny"]
    short = dataclasses.replace(preset, steps=6)
    _, cfg = mqar._grid(preset, 64)["transformer"]  # (what is tested is the optimizer under vmap, not the model)
    # When two learning rates train at once under vmap, and each alone
    _, both, losses = mqar.train(cfg, short, [1e-3, 1e-2])
    for i, lr in [(1, 1e-2)]:  # the larger rate, the one rounding moves most
        _, alone, loss = mqar.train(cfg, short, [lr])
        # Then each is the run it would have been alone
        chex.assert_trees_all_close(
            jax.tree.map(lambda x, i=i: x[i], both), jax.tree.map(lambda x: x[0], alone), rtol=1e-4, atol=1e-5
        )
        np.testing.assert_allclose(losses[i], loss[0], rtol=1e-5)


def test_settings_that_do_not_fit_are_refused():
    with pytest.raises(ValueError, match="8 pairs do not fit 20 tokens"):
        mqar.Setting(20, 8)


def test_the_grid_holds_every_family_and_isokv_is_narrower():
    grid = mqar.model_grid(8192, 64, 2, (4, 8, 16), (8, 32), longest=1024)
    families = {family for family, _ in grid.values()}
    assert families == {"attamba", "transformer", "isoKV", "sliding window"}
    assert len([n for n in grid if n.startswith("attamba")]) == 6
    full, iso = grid["transformer"][1], grid["isokv_k8"][1]
    assert iso.n_heads * iso.resolved_head_dim == 64 // 8
    # At 1024 tokens Attamba K8/W8 keeps about 1/8 of the transformer's KV bytes, and so does isoKV K8
    att = grid["attamba_k8_w8"][1]
    ratio = mqar.kv_bytes_per_token(att, 1024) / mqar.kv_bytes_per_token(full, 1024)
    assert 0.1 < ratio < 0.25, ratio
    assert mqar.kv_bytes_per_token(iso, 1024) == mqar.kv_bytes_per_token(full, 1024) / 8


def test_the_tiny_preset_runs_and_full_attention_learns_four_pairs(tmp_path):
    # When the tiny preset runs as a user runs it (its own process: XLA's default optimisation, one CPU device)
    out = tmp_path / "mqar.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", PYTHONPATH=str(ROOT))
    done = subprocess.run(
        [sys.executable, "-m", "attamba_jax.tasks.mqar", "--preset", "tiny", "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| transformer | 64 |" in done.stdout  # the table
    result = json.loads(out.read_text())
    best = {r["model"]: r for r in result["best"]}
    assert set(best) == {"transformer", "attamba_k4_w8"}
    # Then the full transformer answers the 4-pair task well above chance (2 / vocabulary), and so does Attamba
    chance = 2 / mqar.PRESETS["tiny"].vocab_size
    for name in best:
        assert best[name]["accuracy"]["32/4"] > 3 * chance, best[name]
    # and a second run with the same output resumes: nothing is trained again
    assert mqar.run("tiny", str(out))["runs"] == result["runs"]
    # and --plot draws the plot next to the JSON and prints the table again
    assert mqar.main(["--plot", str(out)]) == 0
    assert (tmp_path / "mqar.png").stat().st_size > 0


def test_given_rates_replace_the_presets_and_bad_ones_are_refused(tmp_path, monkeypatch, capsys):
    # When a run is given learning rates of its own (a finer probe), only those are trained
    asked = []

    def fake_train(preset_name, name, dim, lrs, seed=0):
        asked.append((name, dim, tuple(lrs)))
        return [
            dict(
                model=name,
                dim=dim,
                lr=lr,
                family="f",
                loss=0.0,
                accuracy={"32/4": 0.5},
                seconds=0.0,
                rates_at_once=len(lrs),
            )
            for lr in lrs
        ]

    monkeypatch.setattr(mqar, "train_and_score", fake_train)
    out = str(tmp_path / "probe.json")
    mqar.run("tiny", out, models=["transformer"], lrs=[3e-3, 5e-3])
    assert asked == [("transformer", 64, (3e-3, 5e-3))]
    # and a second run with one rate more trains that one only
    mqar.run("tiny", out, models=["transformer"], lrs=[3e-3, 5e-3, 7e-3])
    assert asked[-1] == ("transformer", 64, (7e-3,))
    # and rates that are no learning rates are refused by name before anything runs
    for bad in ("0", "1e-3,x", "2"):
        with pytest.raises(SystemExit):
            mqar.main(["--preset", "tiny", "--lrs", bad, "--out", str(tmp_path / "bad.json")])
        assert "--lrs" in capsys.readouterr().err
    assert not (tmp_path / "bad.json").exists()
