"""Passkey retrieval: prompts are as long as asked with the passkey where it is said to be,
an answer is the first number written, scoring follows the continuations, and a run on a
training workdir writes its results and heatmaps."""

import json
import pathlib
import re

import jax.numpy as jnp
import numpy as np
import pytest

from attamba_jax.checkpointing import Checkpointer
from attamba_jax.config import dump_config, load_config
from attamba_jax.model import init_model
from attamba_jax.optimizer import make_optimizer
from attamba_jax.tasks import passkey
from attamba_jax.tokenizer import ByteTokenizer

ROOT = pathlib.Path(__file__).resolve().parents[1]
BOOK = "It was the best of times, it was the worst of times; it was the age of wisdom. " * 80
TOK = ByteTokenizer()


def _trials(**kw):
    options = dict(lengths=(512, 768), depths=3, trials=4, seed=1) | kw
    return passkey.make_trials(TOK, passkey.filler_tokens(TOK, [BOOK]), **options)


def test_prompts_are_as_long_as_asked_and_hold_the_passkey_where_they_say():
    trials = _trials()
    assert len(trials) == 2 * 3 * 4
    for t in trials:
        assert len(t.tokens) == t.length and t.tokens[0] == TOK.bos_id
        # The first mention's digits are where the trial says, after "The pass key is"
        assert TOK.decode(t.tokens[t.key_start : t.key_end + 1]) == f" {t.key}"
        assert TOK.decode(t.tokens[: t.key_start]).endswith(passkey.NEEDLE_HEAD)
        assert TOK.decode(t.tokens).endswith(passkey.QUESTION) and f"{t.key} is the pass key" in TOK.decode(t.tokens)
        assert 10_000 <= t.key < 100_000
    # Depth 0 puts the needle in the filler's first SPREAD tokens, depth 1 in its last ones (bytes are tokens here)
    for t in trials:
        before = t.key_start - 1 - len(passkey.PREFIX) - len(passkey.NEEDLE_HEAD)
        after = t.length - t.key_end - 1 - len(passkey.NEEDLE_TAIL.format(key=t.key)) - len(passkey.QUESTION)
        if t.depth == 0.0:
            assert 0 <= before < passkey.SPREAD
        if t.depth == 1.0:
            assert 0 < after <= passkey.SPREAD
    # The same seed gives the same prompts; another seed others
    assert _trials() == trials
    assert _trials(seed=2) != trials


def test_a_prompt_too_short_for_the_needle_is_refused():
    with pytest.raises(ValueError, match="a prompt of 200 tokens leaves"):
        _trials(lengths=(200,))
    with pytest.raises(ValueError, match="the books hold"):
        passkey.make_trials(TOK, passkey.filler_tokens(TOK, ["short"]), lengths=(512,), depths=1, trials=1)


@pytest.mark.parametrize(
    "text, right",
    [
        (" 12345.", True),
        ("12345 is", True),
        (" the key 12345", True),
        (" 1234", False),
        (" 123456", False),
        ("", False),
    ],
)
def test_the_answer_is_the_first_number_written(text, right):
    assert passkey.answered(text, 12345) is right


def test_scoring_follows_the_continuations_in_batches_of_one_shape():
    trials = _trials()
    calls = []

    def oracle(prompts):  # reads the passkey off the prompt
        calls.append(len(prompts))
        return [" " + re.search(r"The pass key is (\d+)", TOK.decode(p)).group(1) + "." for p in prompts]

    assert passkey.score(trials, oracle, rows=5) == [True] * len(trials)
    assert calls == [5] * 5  # 24 trials in batches of 5, the last filled up
    assert passkey.score(trials, lambda prompts: [" 00000"] * len(prompts), rows=5) == [False] * len(trials)


def test_summary_splits_by_depth_length_and_grid_position():
    trials = _trials()
    right = [t.depth == 0.0 for t in trials]
    model = dict(name="m", step=1, arch="attamba", token_chunk=4, window=8, offsets=[0, 1])
    out = passkey.summarize(model, trials, right)
    assert out["by_length_depth"]["512/0.000"] == dict(accuracy=1.0, trials=4)
    assert out["by_length_depth"]["768/0.500"] == dict(accuracy=0.0, trials=4)
    assert out["by_length"] == {"512": pytest.approx(1 / 3), "768": pytest.approx(1 / 3)}
    assert sum(cell["trials"] for cell in out["by_length_grid_position"].values()) == len(trials)
    assert out["in_window_trials"] == 0 and out["distance_to_end"]["min"] > 8
    # A transformer has no grid
    assert "by_length_grid_position" not in passkey.summarize(dict(model, token_chunk=None), trials, right)


def test_a_run_on_a_workdir_writes_results_and_heatmaps(tmp_path, capsys):
    # Given a workdir as the trainer writes it, a tiny byte-level Attamba,
    cfg = load_config(
        ROOT / "configs" / "tiny.yaml",
        ["model.dim=32", "model.n_layers=2", "model.n_heads=2", "model.ssm_hidden_dim=32", "model.ssm_heads=2"],
    )
    graphdef, params = init_model(cfg.model, seed=1)
    tx, _ = make_optimizer(cfg.optim, cfg.train.steps)
    work = tmp_path / "attamba_tiny"
    work.mkdir()
    (work / "config.yaml").write_text(dump_config(cfg))
    ckpt = Checkpointer(work / "checkpoints", keep_last=2, keep_every=None)
    ckpt.save(
        3,
        {"params": params, "opt_state": tx.init(params), "step": jnp.int32(3)},
        None,
        {"step": 3, "config": cfg.to_dict()},
    )
    ckpt.wait()
    ckpt.close()
    (tmp_path / "book.txt").write_text(BOOK)
    out = tmp_path / "passkey.json"
    # when the task runs on it,
    argv = ["--workdir", str(work), "--books", str(tmp_path / "*.txt"), "--out", str(out)]
    assert passkey.main(argv + ["--lengths", "512", "--depths", "2", "--trials", "3", "--tokens-per-call", "2048"]) == 0
    # then every trial is scored and summarised with the model's grid,
    result = json.loads(out.read_text())
    assert len(result["trials"]) == 6 and result["model"]["step"] == 3
    assert result["model"]["token_chunk"] == 4 and result["model"]["offsets"] == [0, 2]
    assert set(result["by_length_depth"]) == {"512/0.000", "512/1.000"}
    assert 0.0 <= result["by_length"]["512"] <= 1.0
    assert "| attamba_tiny |" in capsys.readouterr().out
    # and --plot draws the heatmaps of runs and prints their tables.
    png = tmp_path / "passkey.png"
    assert passkey.main(["--plot", str(out), str(out), "--png", str(png)]) == 0
    assert png.stat().st_size > 0 and "accuracy by depth" in capsys.readouterr().out


def test_the_command_line_checks_its_arguments(tmp_path):
    with pytest.raises(SystemExit):
        passkey.main(["--workdir", str(tmp_path)])  # no books, no out
    with pytest.raises(SystemExit):
        passkey.main(["--workdir", str(tmp_path), "--books", str(tmp_path / "none*.txt"), "--out", "x.json"])
    np.testing.assert_equal(passkey.filler_tokens(TOK, []).shape, (0,))
