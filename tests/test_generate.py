"""Generation: greedy decoding follows the forward pass, sampling options, stop tokens, CLI, notebook."""

from __future__ import annotations

import functools
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attamba_jax.checkpointing import Checkpointer
from attamba_jax.config import ModelConfig, dump_config, load_config
from attamba_jax.generate import Sampling, generate, main, sample
from attamba_jax.model import apply_model, init_model
from attamba_jax.optimizer import make_optimizer
from attamba_jax.tokenizer import ByteTokenizer

ROOT = pathlib.Path(__file__).resolve().parents[1]
SMALL = dict(vocab_size=64, dim=32, n_heads=4, multiple_of=16)
SSM = dict(ssm_state_dim=8, ssm_hidden_dim=48, ssm_heads=4)
# offsets 0, 2; GQA
ATTAMBA = ModelConfig(arch="attamba", token_chunk=4, window=3, n_layers=2, n_kv_heads=2, head_dim=16, **SMALL, **SSM)
PROMPTS = [[1, 2, 3], [5], [7, 8, 9, 10, 11, 12, 13]]  # different lengths: rows decode at different positions
NEW = 8


@functools.cache
def _model(cfg: ModelConfig):
    return init_model(cfg, seed=3)


@pytest.mark.parametrize(
    "cfg, token_chunk",
    [
        (ATTAMBA, None),
        (ATTAMBA, 6),  # trained at K=4, decoded at K'=6 (offsets 0, 3)
        (ModelConfig(arch="transformer", n_layers=2, sliding_window=4, **SMALL), None),
    ],
    ids=["attamba", "attamba_at_k6", "transformer_window4"],
)
def test_greedy_generation_follows_the_forward(cfg, token_chunk):
    # Given prompts of different lengths,
    graphdef, params = _model(cfg)
    # when each is continued greedily,
    out = generate(graphdef, params, PROMPTS, max_new_tokens=NEW, token_chunk=token_chunk)
    np.testing.assert_array_equal(out.lengths, NEW)
    # then every generated token is the argmax of the full forward over prompt + generated text,
    # which holds only if each row decoded at its own positions.
    width = max(map(len, PROMPTS)) + NEW
    seqs = np.zeros((len(PROMPTS), width), np.int32)
    for row, prompt in enumerate(PROMPTS):
        seqs[row, : len(prompt) + NEW] = list(prompt) + out.tokens[row].tolist()
    logits = jax.jit(functools.partial(apply_model, graphdef, token_chunk=token_chunk))(params, jnp.asarray(seqs))
    for row, prompt in enumerate(PROMPTS):
        predicted = np.argmax(logits[row, len(prompt) - 1 : len(prompt) - 1 + NEW], axis=-1)
        np.testing.assert_array_equal(predicted, out.tokens[row])


@pytest.fixture(scope="module")
def attamba():
    return _model(ATTAMBA)


def _run(model, **kw):
    graphdef, params = model
    return generate(graphdef, params, PROMPTS, max_new_tokens=NEW, **kw)


def test_padding_prompts_further_changes_nothing(attamba):
    # pad_to: one compiled shape for batches of different prompt lengths, the same tokens
    np.testing.assert_array_equal(_run(attamba, pad_to=16).tokens, _run(attamba).tokens)
    with pytest.raises(ValueError, match="pad_to=5 is shorter than the longest prompt"):
        _run(attamba, pad_to=5)


def test_greedy_is_deterministic_and_ignores_the_seed(attamba):
    a, b = _run(attamba, seed=0), _run(attamba, seed=7)
    np.testing.assert_array_equal(a.tokens, b.tokens)


def test_top_k_one_and_tiny_top_p_are_greedy(attamba):
    greedy = _run(attamba)
    np.testing.assert_array_equal(_run(attamba, temperature=1.5, top_k=1, seed=4).tokens, greedy.tokens)
    np.testing.assert_array_equal(_run(attamba, temperature=1.5, top_p=1e-6, seed=4).tokens, greedy.tokens)


def test_sampling_is_reproducible_per_seed(attamba):
    a, b, c = (_run(attamba, temperature=1.0, seed=s) for s in (11, 11, 12))
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert not np.array_equal(a.tokens, c.tokens)


def test_stop_tokens_end_rows(attamba):
    greedy = _run(attamba).tokens
    stop = int(greedy[0, 2])
    out = _run(attamba, stop_tokens=[stop], pad_id=63)
    for row in range(len(PROMPTS)):
        hits = np.flatnonzero(greedy[row] == stop)
        n = int(hits[0]) + 1 if hits.size else NEW
        assert out.lengths[row] == n
        np.testing.assert_array_equal(out.tokens[row, :n], greedy[row, :n])
        assert np.all(out.tokens[row, n:] == 63)
    assert out.lengths[0] <= 3


def test_sample_keeps_to_top_k_and_top_p():
    logits = jax.random.normal(jax.random.key(0), (4, 50)) * 3
    keys = jax.random.split(jax.random.key(1), 400)
    draw = jax.jit(jax.vmap(sample, in_axes=(None, 0, None)))
    order = np.argsort(-np.asarray(logits), axis=-1)
    # top-k: only the k best tokens of each row are ever drawn, and all of them can be.
    drawn = np.asarray(draw(logits, keys, Sampling(1.0, 5, 1.0)))  # [400, 4]
    for row in range(4):
        assert set(drawn[:, row]) == set(order[row, :5])
    # top-p: the smallest prefix of the ranking whose probability reaches p.
    p = 0.6
    drawn = np.asarray(draw(logits, keys, Sampling(1.0, 0, p)))
    probs = np.asarray(jax.nn.softmax(logits, axis=-1))
    for row in range(4):
        mass = np.cumsum(probs[row, order[row]])
        nucleus = order[row, : int(np.searchsorted(mass, p)) + 1]
        assert set(drawn[:, row]) <= set(nucleus)
        assert len(set(drawn[:, row])) > 1 or len(nucleus) == 1
    # greedy
    np.testing.assert_array_equal(sample(logits, keys[0], Sampling(0.0, 0, 1.0)), order[:, 0])


def test_generate_rejects_bad_arguments(attamba):
    graphdef, params = attamba
    with pytest.raises(ValueError, match="at least one token"):
        generate(graphdef, params, [[1], []], max_new_tokens=2)
    with pytest.raises(ValueError, match="temperature"):
        generate(graphdef, params, [[1]], max_new_tokens=2, temperature=-1.0)
    with pytest.raises(ValueError, match="top_p"):
        generate(graphdef, params, [[1]], max_new_tokens=2, top_p=0.0)
    with pytest.raises(ValueError, match="stop token"):
        generate(graphdef, params, [[1]], max_new_tokens=2, stop_tokens=[64])


SMALL_TINY = [  # configs/tiny.yaml, shrunk so that the CLI tests compile quickly
    "model.dim=32",
    "model.n_layers=1",
    "model.n_heads=2",
    "model.multiple_of=16",
    "model.ssm_hidden_dim=48",
    "model.ssm_heads=2",
    "model.ssm_state_dim=8",
]


def test_cli_generates_from_a_config(capsys):
    argv = [
        "--config",
        str(ROOT / "configs" / "tiny.yaml"),
        "--prompt",
        "ab",
        "--prompt",
        "xyz",
        "--max-new-tokens",
        "4",
    ]
    assert main(argv + SMALL_TINY) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "--- sample 1 of 2 ---" and lines[1].startswith("ab")
    second = lines.index("--- sample 2 of 2 ---")
    assert lines[second + 1].startswith("xyz")


@pytest.mark.parametrize(
    "flag, message",
    [
        (["--max-new-tokens", "0"], "max_new_tokens must be >= 1"),
        (["--top-p", "0"], "top_p must be in \\(0, 1\\]"),
        (["--temperature", "-1"], "temperature must be >= 0"),
        (["--token-chunk", "0"], "token_chunk must be >= 1"),
    ],
)
def test_cli_checks_its_flags_before_loading_anything(tmp_path, capsys, flag, message):
    # The workdir does not exist: the flag's error comes first
    assert main(["--workdir", str(tmp_path / "missing"), "--prompt", "ab", *flag]) == 2
    err = capsys.readouterr().err
    assert re.fullmatch(f"error: {message}.*\n", err), err


def test_cli_loads_a_training_workdir(tmp_path, capsys):
    # Given a workdir as the trainer writes it (config.yaml + an Orbax checkpoint of the state)
    # holding parameters that differ from a fresh initialisation,
    cfg = load_config(ROOT / "configs" / "tiny.yaml", SMALL_TINY)
    graphdef, params = init_model(cfg.model, seed=cfg.seed + 1)
    tx, _ = make_optimizer(cfg.optim, cfg.train.steps)
    (tmp_path / "config.yaml").write_text(dump_config(cfg))
    ckpt = Checkpointer(tmp_path / "checkpoints", keep_last=2, keep_every=None)
    state = {"params": params, "opt_state": tx.init(params), "step": jnp.int32(7)}
    ckpt.save(7, state, None, {"step": 7, "config": cfg.to_dict()})
    ckpt.wait()
    ckpt.close()
    # when the CLI generates from it,
    assert main(["--workdir", str(tmp_path), "--prompt", "ab", "--max-new-tokens", "6"]) == 0
    printed = capsys.readouterr().out.splitlines()
    # then it decodes with the saved parameters and the byte tokenizer.
    tok = ByteTokenizer()
    out = generate(graphdef, params, [[tok.bos_id, *b"ab"]], max_new_tokens=6, stop_tokens=[tok.eos_id])
    ids = [int(t) for t in out.tokens[0, : out.lengths[0]] if t != tok.eos_id]
    assert printed == ["ab" + tok.decode(ids)]
    assert main(["--workdir", str(tmp_path / "missing"), "--prompt", "ab"]) == 2


def test_quickstart_notebook_runs():
    # the dev extra (pip install -e ".[dev]") brings these; a machine without them skips, naming them
    nbclient = pytest.importorskip("nbclient", reason="needs the dev extra's nbclient")
    nbformat = pytest.importorskip("nbformat", reason="needs the dev extra's nbformat")

    path = ROOT / "examples" / "quickstart.ipynb"
    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        notebook, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    )
    client.execute()  # raises CellExecutionError on any failing cell
    text = "".join(o.get("text", "") for c in notebook.cells if c.cell_type == "code" for o in c.outputs)
    assert "parameters" in text and "MiB" in text
