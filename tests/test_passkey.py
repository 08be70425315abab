"""Passkey retrieval: prompts are as long as asked with the passkey where it is said to be,
an answer is the first number written, scoring follows the model (greedy and teacher forced), and a run on a
training workdir writes its results and heatmaps."""

import json
import pathlib
import re

import jax.numpy as jnp
import numpy as np
import pytest

from attamba_jax.checkpointing import Checkpointer
from attamba_jax.config import dump_config, load_config
from attamba_jax.model import apply_model, init_model
from attamba_jax.optimizer import make_optimizer
from attamba_jax.tasks import passkey
from attamba_jax.tokenizer import ByteTokenizer, load_tokenizer, train_sentencepiece

ROOT = pathlib.Path(__file__).resolve().parents[1]
BOOK = "It was the best of times, it was the worst of times; it was the age of wisdom. " * 80
TOK = ByteTokenizer()


def _trials(tok=TOK, **kw):
    options = dict(lengths=(512, 768), depths=3, trials=4, seed=1) | kw
    return passkey.make_trials(tok, passkey.filler_tokens(tok, [BOOK]), **options)


@pytest.fixture(scope="module")
def sentencepiece(tmp_path_factory):
    root = tmp_path_factory.mktemp("sp")
    (root / "book.txt").write_text(BOOK.replace("; ", ";\n") + "\nThe pass key is 12345. What is it?\n")
    return load_tokenizer(str(train_sentencepiece([root / "book.txt"], root / "tok", vocab_size=330, threads=1)))


@pytest.mark.parametrize("tokenizer", ["byte", "sentencepiece"])
def test_prompts_are_as_long_as_asked_and_hold_the_passkey_where_they_say(tokenizer, request):
    tok = TOK if tokenizer == "byte" else request.getfixturevalue("sentencepiece")
    trials = _trials(tok)
    assert len(trials) == 2 * 3 * 4
    for t in trials:
        assert len(t.tokens) == t.length and t.tokens[0] == tok.bos_id
        # The first mention's digits are where the trial says, after "The pass key is"
        assert tok.decode(t.tokens[t.key_start : t.key_end + 1]).strip() == str(t.key)
        assert tok.decode(t.tokens[: t.key_start]).rstrip().endswith(passkey.ANSWER_HEAD)
        text = tok.decode(t.tokens)
        assert text.endswith(passkey.QUESTION) and f"{t.key} is the pass key" in text
        # the answer is what followed "The pass key is" in the needle; the decoy is nowhere
        assert t.tokens[t.key_end - len(t.answer) + 1 : t.key_end + 1] == t.answer
        assert tok.decode(t.answer).strip() == str(t.key) and len(t.decoy) <= passkey.ANSWER_ROOM
        decoy = tok.decode(t.decoy).strip()
        assert len(decoy) == 5 and decoy != str(t.key) and decoy not in text
        assert 10_000 <= t.key < 100_000
    if tokenizer == "byte":  # bytes are tokens: depth 0 puts the needle in the filler's first SPREAD tokens
        for t in trials:
            before = t.key_start - 1 - len(passkey.PREFIX) - len(passkey.ANSWER_HEAD + " ")
            after = t.length - t.key_end - 1 - len(f". Remember it. {t.key} is the pass key.") - len(passkey.QUESTION)
            if t.depth == 0.0:
                assert 0 <= before < passkey.SPREAD
            if t.depth == 1.0:
                assert 0 < after <= passkey.SPREAD
    # The same seed gives the same prompts; another seed others
    assert _trials(tok) == trials
    assert _trials(tok, seed=2) != trials


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


def _oracle_scores(trials, rows):
    calls = []

    def oracle(prompts):  # reads the passkey off the prompt
        calls.append(("greedy", len(prompts)))
        return [" " + re.search(r"The pass key is (\d+)", TOK.decode(p)).group(1) + "." for p in prompts]

    def forced(prompts, answers):  # log p 0 and every token right for the prompt's key, nothing for others
        calls.append(("forced", len(prompts)))
        keys = [re.search(r"The pass key is (\d+)", TOK.decode(p)).group(1) for p in prompts]
        return [(0.0, len(a)) if TOK.decode(a).strip() == k else (-9.0, 0) for k, a in zip(keys, answers)]

    return passkey.score(trials, oracle, forced, rows=rows), calls


def test_scoring_follows_the_model_in_batches_of_one_shape():
    trials = _trials()
    results, calls = _oracle_scores(trials, rows=5)
    assert [r["right"] for r in results] == [True] * len(trials)
    assert all(r["answer_tokens_right"] == 6 and r["decoy_tokens_right"] == 0 for r in results)
    assert all(r["answer_logprob"] == 0.0 and r["decoy_logprob"] == -9.0 for r in results)
    # 24 trials in 5 batches of 5 rows (the last filled up); the teacher-forced batch holds the
    # answers and then the decoys
    assert calls == [("greedy", 5), ("forced", 10)] * 5


def test_teacher_forcing_is_the_full_forward_pass_scored_at_the_answer():
    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["model.dtype=float32", "model.dim=32", "model.n_heads=2"])
    graphdef, params = init_model(cfg.model, seed=3)
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(3, 256, 40)), list(rng.integers(3, 256, 40))]
    answers = [tuple(rng.integers(3, 256, 6)), tuple(rng.integers(3, 256, 6))]
    got = passkey.teacher_forcing(graphdef, params, pad_to=48)(prompts, answers)  # padded further
    # the reference: the whole model's logits, float64 log-softmax, at the positions before the answer
    logits = np.asarray(apply_model(graphdef, params, np.asarray([p + list(a) for p, a in zip(prompts, answers)])))
    logits = logits.astype(np.float64)[:, len(prompts[0]) - 1 : -1]
    logits = logits - logits.max(-1, keepdims=True)
    log_softmax = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    for row, (answer, (logp, hits)) in enumerate(zip(answers, got)):
        np.testing.assert_allclose(logp, log_softmax[row, np.arange(6), answer].sum(), rtol=1e-4, atol=1e-4)
        assert hits == int((logits[row].argmax(-1) == np.asarray(answer)).sum())


def test_summary_splits_by_depth_length_and_grid_position():
    trials = _trials()
    results, _ = _oracle_scores(trials, rows=24)
    for t, r in zip(trials, results):  # right at depth 0 only
        r["right"] = t.depth == 0.0
    model = dict(name="m", step=1, arch="attamba", token_chunk=4, window=8, offsets=[0, 1])
    out = passkey.summarize(model, trials, results)
    assert out["by_length_depth"]["512/0.000"]["accuracy"] == 1.0 and out["by_length_depth"]["512/0.000"]["trials"] == 4
    assert out["by_length_depth"]["768/0.500"]["accuracy"] == 0.0
    assert out["by_length"]["512"]["accuracy"] == pytest.approx(1 / 3)
    assert out["by_length"]["768"]["token_accuracy"] == 1.0 and out["by_length"]["768"]["decoy_token_accuracy"] == 0.0
    assert out["by_length"]["768"]["decoy_logprob"] == -9.0
    assert sum(cell["trials"] for cell in out["by_length_grid_position"].values()) == len(trials)
    assert out["in_window_trials"] == 0 and out["distance_to_end"]["min"] > 8
    # A transformer has no grid
    assert "by_length_grid_position" not in passkey.summarize(dict(model, token_chunk=None), trials, results)


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
    assert 0.0 <= result["by_length"]["512"]["accuracy"] <= 1.0
    assert result["by_length"]["512"]["decoy_logprob"] < 0.0 and set(result["trials"][0]) >= {"right", "answer_logprob"}
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
