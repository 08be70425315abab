"""Multi-query associative recall (MQAR, the Zoology protocol): what a K-fold smaller KV cache
costs in recall, Attamba against full, iso-KV and sliding-window transformers.

A sequence of length L with N pairs starts with its context, the pairs themselves
``k1 v1 k2 v2 ... kN vN`` (N distinct keys from ``[1, V/2)``, N distinct values from ``[V/2, V)``),
and then asks for every key once more: key i comes back at position ``2N + 2·g_i``, its value
right after it, with the gaps ``g_i`` drawn without replacement from ``0 .. (L - 2N) / 2 - 1``, with
probability ∝ ``(g + 1)^(a-1)``
(``a = 0.01``: most queries soon after the context, a long tail up to the end). Every other
position holds a random token. The target at a query is its key's value; the loss and the
accuracy count the N queried positions only (chance: 2/V).

Each model trains on a mixture of (L, N) settings, every row of a batch drawn from one of them
and laid out in a row of the longest training length (the rest random, never counted), at every
learning rate of the preset (the best kept, by mean test accuracy, as Zoology does); then each
test setting is scored on fresh sequences. A model's KV state at test length L is
``cache.formula_bytes`` for one row of L tokens (Attamba: its boundaries, window and both SSMs'
states), reported per token.

    python -m attamba_jax.tasks.mqar --preset tiny --out mqar_tiny.json        # a minute on a CPU
    python -m attamba_jax.tasks.mqar --preset zoology --out mqar.json          # the grid, on a GPU
    python -m attamba_jax.tasks.mqar --plot mqar.json                          # draw the plot again
    python -m attamba_jax.tasks.mqar --preset zoology --dims 256 --models attamba_k4_w32 \
        --lrs 7.7e-4,1.3e-3 --out mqar_probe.json                              # rates between the grid's

A run writes its JSON after every model and takes up where an earlier run with the same
``--out`` stopped (models already there are not trained again).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import math
import multiprocessing
import os
import platform
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from attamba_jax.cache import formula_bytes
from attamba_jax.config import ModelConfig, OptimConfig
from attamba_jax.loss import cross_entropy
from attamba_jax.model import init_model
from attamba_jax.optimizer import make_optimizer

POWER_A = 0.01  # the gaps' power law: p(g) ∝ g^(a-1)


@dataclasses.dataclass(frozen=True)
class Setting:
    """One (sequence length, number of pairs) of the task."""

    length: int
    pairs: int

    def __post_init__(self):
        if self.pairs < 1 or (self.length - 2 * self.pairs) // 2 < self.pairs:
            raise ValueError(
                f"MQAR: {self.pairs} pairs do not fit {self.length} tokens (the context takes 2 per pair, and each "
                "query needs its own even offset after it)"
            )


def _distinct(key: jax.Array, rows: int, n: int, low: int, high: int) -> jax.Array:
    """[rows, n] distinct integers of [low, high) per row, every n-subset and order equally likely
    (the n largest of i.i.d. uniforms)."""
    return jax.lax.top_k(jax.random.uniform(key, (rows, high - low)), n)[1] + low


def sequences(setting: Setting, rows: int, vocab_size: int, key: jax.Array) -> dict[str, jax.Array]:
    """``rows`` MQAR sequences of ``setting``: inputs, targets [rows, L] int32 (next-token targets)
    and weights [rows, L] float32, 1 at the N queried positions (their targets are the values).

    Jittable (the setting, rows and vocabulary are static): training draws every batch on the
    device. The gaps are drawn without replacement with probability ∝ (g + 1)^(a-1) as the top N
    of log p + Gumbel noise, which is sampling one gap after another from what is left.
    """
    n, length = setting.pairs, setting.length
    half = vocab_size // 2
    if half - 1 < n:
        raise ValueError(f"MQAR: a vocabulary of {vocab_size} holds fewer than {n} distinct keys")
    k_keys, k_values, k_gaps, k_filler = jax.random.split(key, 4)
    keys = _distinct(k_keys, rows, n, 1, half)
    values = _distinct(k_values, rows, n, half, vocab_size)
    space = (length - 2 * n) // 2  # gaps g: the query at 2N + 2g, its value at 2N + 2g + 1 <= L
    log_p = (POWER_A - 1.0) * jnp.log(jnp.arange(space, dtype=jnp.float32) + 1.0)
    gaps = jax.lax.top_k(log_p + jax.random.gumbel(k_gaps, (rows, space)), n)[1]
    at = 2 * n + 2 * gaps  # the query's position (its target, the value, is the next token)
    row = jnp.arange(rows)[:, None]
    tokens = jax.random.randint(k_filler, (rows, length + 1), 0, vocab_size)  # the random filler
    tokens = tokens.at[:, 0 : 2 * n : 2].set(keys).at[:, 1 : 2 * n : 2].set(values)
    tokens = tokens.at[row, at].set(keys).at[row, at + 1].set(values)
    weights = jnp.zeros((rows, length), jnp.float32).at[row, at].set(1.0)
    return {"inputs": tokens[:, :-1].astype(jnp.int32), "targets": tokens[:, 1:].astype(jnp.int32), "weights": weights}


def mixture(
    settings: Sequence[Setting], rows: int, vocab_size: int, key: jax.Array, length: int | None = None
) -> dict[str, jax.Array]:
    """A batch: each row one of ``settings`` (in turn), in a row of ``length`` tokens (default the
    longest setting's) whose positions after the sequence are random tokens of weight 0."""
    length = max(s.length for s in settings) if length is None else length
    if length < max(s.length for s in settings):
        raise ValueError(f"MQAR: rows of {length} tokens cannot hold settings {[s.length for s in settings]}")
    k_inputs, k_targets, *k_parts = jax.random.split(key, 2 + len(settings))
    out = {
        "inputs": jax.random.randint(k_inputs, (rows, length), 0, vocab_size, jnp.int32),
        "targets": jax.random.randint(k_targets, (rows, length), 0, vocab_size, jnp.int32),
        "weights": jnp.zeros((rows, length), jnp.float32),
    }
    for i, (setting, k_part) in enumerate(zip(settings, k_parts)):
        picked = np.arange(i, rows, len(settings))
        part = sequences(setting, len(picked), vocab_size, k_part)
        out = {name: value.at[picked, : setting.length].set(part[name]) for name, value in out.items()}
    return out


def accuracy(predictions, batch) -> tuple[float, float]:
    """(correct, counted) over the queried positions (weight > 0) only."""
    counted = np.asarray(batch["weights"]) > 0
    correct = (np.asarray(predictions) == np.asarray(batch["targets"])) & counted
    return float(correct.sum()), float(counted.sum())


# --- the models --------------------------------------------------------------------------


def _base(vocab_size: int, dim: int, n_layers: int) -> dict:
    return dict(vocab_size=vocab_size, dim=dim, n_layers=n_layers, n_heads=max(1, dim // 32), multiple_of=16)


# Every model trains its learning rates at once under jax.vmap, on the XLA paths of its ops (the
# suite holds the Pallas kernels equal to them; at these sizes a step is many small ops either way).
_ATTAMBA_PATHS = dict(ssm_implementation="chunked", attention_implementation="compressed")
_TRANSFORMER_PATHS = dict(attention_implementation="xla")


def model_grid(
    vocab_size: int, dim: int, n_layers: int, chunks, windows, longest: int
) -> dict[str, tuple[str, ModelConfig]]:
    """name -> (family, config): Attamba at every K x W; the full transformer; per K, the transformer
    shrunk to Attamba's KV width (isoKV: attention width dim / K) and the sliding-window transformer
    whose cache holds as many tokens as Attamba's at the ``longest`` test length (⌈L/K⌉ + W)."""
    base = _base(vocab_size, dim, n_layers)
    grid = {"transformer": ("transformer", ModelConfig(arch="transformer", **_TRANSFORMER_PATHS, **base))}
    for k in chunks:
        for w in windows:
            grid[f"attamba_k{k}_w{w}"] = (
                "attamba",
                ModelConfig(
                    arch="attamba",
                    token_chunk=k,
                    window=w,
                    ssm_state_dim=16,
                    ssm_hidden_dim=dim,
                    ssm_heads=max(1, dim // 32),
                    **_ATTAMBA_PATHS,
                    **base,
                ),
            )
        width = max(2, dim // k)
        heads = max(1, min(base["n_heads"], width // 2))
        iso = dict(base, n_heads=heads)
        iso_cfg = ModelConfig(arch="transformer", head_dim=width // heads, **_TRANSFORMER_PATHS, **iso)
        grid[f"isokv_k{k}"] = ("isoKV", iso_cfg)
        window = -(-longest // k) + min(windows)
        sliding = ModelConfig(arch="transformer", sliding_window=window, **_TRANSFORMER_PATHS, **base)
        grid[f"sliding_w{window}"] = ("sliding window", sliding)
    return grid


@dataclasses.dataclass(frozen=True)
class Preset:
    vocab_size: int
    n_layers: int
    dims: tuple[int, ...]
    chunks: tuple[int, ...]
    windows: tuple[int, ...]
    train: tuple[Setting, ...]
    test: tuple[Setting, ...]
    lrs: tuple[float, ...]
    steps: int
    batch: int
    test_rows: int
    models: tuple[str, ...] | None = None  # a subset of the grid's names (None: all)


def _settings(pairs) -> tuple[Setting, ...]:
    return tuple(Setting(length, n) for length, n in pairs)


PRESETS = {
    # A minute on a CPU, a smoke run: a 4-pair task over a small vocabulary, one width, one learning
    # rate, too few steps for full recall (its numbers say nothing of the models).
    "tiny": Preset(
        vocab_size=32,
        n_layers=2,
        dims=(64,),
        chunks=(4,),
        windows=(8,),
        train=_settings([(32, 4)]),
        test=_settings([(32, 4), (64, 4)]),
        lrs=(1e-2,),
        steps=200,
        batch=64,
        test_rows=128,
        models=("transformer", "attamba_k4_w8"),
    ),
    # Zoology's settings: vocabulary 8192, trained on 64-256 tokens with 4-64 pairs, tested up to
    # 1024 tokens with 256 pairs; two layers at three widths, four learning rates.
    "zoology": Preset(
        vocab_size=8192,
        n_layers=2,
        dims=(64, 128, 256),
        chunks=(4, 8, 16),
        windows=(8, 32),
        train=_settings([(64, 4), (128, 8), (256, 16), (256, 32), (256, 64)]),
        test=_settings([(64, 4), (64, 8), (64, 16), (128, 32), (256, 64), (512, 128), (1024, 256)]),
        lrs=tuple(float(x) for x in np.logspace(-4, -2, 4)),
        steps=3000,
        batch=64,
        test_rows=256,
    ),
}


def kv_bytes_per_token(cfg: ModelConfig, length: int) -> float:
    """The model's KV state (``cache.formula_bytes``) for one row of ``length`` tokens, per token."""
    return formula_bytes(cfg, 1, length) / length


# --- training and scoring -------------------------------------------------------------------


def _chunk(steps: int, most: int = 250) -> int:
    """The steps per jitted call: the largest divisor of ``steps`` up to ``most``."""
    return max(d for d in range(1, min(steps, most) + 1) if steps % d == 0)


def _unit_optimizer(preset: Preset) -> optax.GradientTransformation:
    """The project's AdamW (``make_optimizer``) at peak learning rate 1: warmup over a tenth of the
    steps, cosine to a tenth, weight decay 0.1. Its update is linear in the peak rate (the
    schedule is, and the decoupled decay is scaled by it), so ``optax.scale(lr)`` after it is
    the same optimizer at peak ``lr``: one compiled step serves every learning rate."""
    optim = OptimConfig(lr=1.0, warmup_steps=max(1, preset.steps // 10), min_lr_ratio=0.1, weight_decay=0.1)
    optim.validate()
    return make_optimizer(optim, preset.steps)[0]  # the schedule is inside it


def queried(batch: dict[str, jax.Array], most: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(at, targets, weights) [rows, most]: each row's queried positions first (``most`` >= its
    number of queries; the slots after them hold other positions at weight 0), and the targets
    and weights there."""
    weights, at = jax.lax.top_k(batch["weights"], most)
    return at, jnp.take_along_axis(batch["targets"], at, axis=1), weights


def query_loss(graphdef, params, batch: dict[str, jax.Array], most: int) -> jax.Array:
    """The mean cross-entropy over the queried positions of a [rows, L] batch, the head applied
    there only: the weighted mean over every position (``train_step.nll_sum``), without the
    vocabulary-wide logits of the positions that count nothing."""
    at, targets, weights = queried(batch, most)
    logits = nnx.merge(graphdef, params).logits_at(batch["inputs"], at)
    return cross_entropy(logits, targets, weights)[0]


def train(cfg: ModelConfig, preset: Preset, lrs: Sequence[float], seed: int = 0, progress=None):
    """Trains ``cfg`` on the preset's mixture at every learning rate of ``lrs`` at once (one stacked
    train state under ``jax.vmap``; the same initial parameters and batches for all), on the
    default device. Returns (graphdef, the stacked parameters [len(lrs), ...], final losses).
    ``progress(step, losses)``: called after every jitted call of steps (``_chunk``)."""
    cfg.validate()
    graphdef, params = init_model(cfg, seed=seed)
    unit_tx = _unit_optimizer(preset)
    most = max(s.pairs for s in preset.train)

    def at_rate(lr):
        return optax.chain(unit_tx, optax.scale(lr))

    one = {"params": params, "opt_state": at_rate(1.0).init(params)}
    states = jax.tree.map(lambda x: jnp.stack([x] * len(lrs)), one)
    rates = jnp.asarray(lrs, jnp.float32)

    def step(state, batch, lr):
        loss, grads = jax.value_and_grad(query_loss, argnums=1)(graphdef, state["params"], batch, most)
        updates, opt_state = at_rate(lr).update(grads, state["opt_state"], state["params"])
        return {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state}, loss

    def steps(states, key):
        def body(states, key):
            batch = mixture(preset.train, preset.batch, preset.vocab_size, key)
            return jax.vmap(step, in_axes=(0, None, 0))(states, batch, rates)

        return jax.lax.scan(body, states, jax.random.split(key, chunk))

    chunk = _chunk(preset.steps)
    run_chunk = jax.jit(steps, donate_argnums=0)
    key = jax.random.key(seed)
    for i in range(preset.steps // chunk):
        states, losses = run_chunk(states, jax.random.fold_in(key, i))
        if progress is not None:
            progress((i + 1) * chunk, [float(x) for x in losses[-1]])
    return graphdef, states["params"], [float(x) for x in losses[-1]]


def score(graphdef, stacked_params, preset: Preset, seed: int = 0, rows: int = 32) -> list[dict[str, float]]:
    """Per parameter set of ``stacked_params``, the accuracy on every test setting: {"L/N": acc},
    over ``preset.test_rows`` fresh sequences per setting (the same for every model), each laid
    out in a row of the longest test length (causal models: what follows a sequence is never seen)."""
    longest = max(s.length for s in preset.test)
    most = max(s.pairs for s in preset.test)

    def predictions(params, tokens, at):
        return jnp.argmax(nnx.merge(graphdef, params).logits_at(tokens, at), axis=-1)

    predict = jax.jit(jax.vmap(predictions, in_axes=(0, None, None)))
    test_key = jax.random.key(seed + 1)
    sets = jax.tree.leaves(stacked_params)[0].shape[0]
    correct = np.zeros((sets, len(preset.test)))
    counted = np.zeros(len(preset.test))
    for s, setting in enumerate(preset.test):
        for first in range(0, preset.test_rows, rows):
            n = min(rows, preset.test_rows - first)
            key = jax.random.fold_in(jax.random.fold_in(test_key, s), first)
            batch = mixture((setting,), n, preset.vocab_size, key, length=longest)
            at, targets, weights = (np.asarray(a) for a in queried(batch, most))
            pad = ((0, rows - n), (0, 0))
            got = np.asarray(predict(stacked_params, np.pad(batch["inputs"], pad), np.pad(at, pad)))[:, :n]
            for i in range(sets):
                c, counted_here = accuracy(got[i], {"targets": targets, "weights": weights})
                correct[i, s] += c
            counted[s] += counted_here
    names = [f"{s.length}/{s.pairs}" for s in preset.test]
    return [dict(zip(names, (c / counted).tolist())) for c in correct]


def train_and_score(preset_name: str, name: str, dim: int, lrs: Sequence[float], seed: int = 0) -> list[dict]:
    """One model of the grid at one width, trained at every rate of ``lrs`` and scored: a run
    record per rate (the JSON's "runs")."""
    preset = PRESETS[preset_name]
    start = time.perf_counter()
    print(f"{name} d={dim}: training at {len(lrs)} learning rates", flush=True)
    family, cfg = _grid(preset, dim)[name]

    def progress(step, losses):
        print(
            f"{name} d={dim}: step {step}/{preset.steps} loss "
            + " ".join(f"{x:.3f}" for x in losses)
            + f" ({time.perf_counter() - start:.0f} s)",
            flush=True,
        )

    graphdef, params, losses = train(cfg, preset, lrs, seed, progress)
    scores = score(graphdef, params, preset, seed)
    seconds = time.perf_counter() - start
    kv = {f"{s.length}/{s.pairs}": kv_bytes_per_token(cfg, s.length) for s in preset.test}
    device = dict(device=str(jax.devices()[0].device_kind), jax=jax.__version__, python=platform.python_version())
    return [
        dict(model=name, family=family, dim=dim, lr=lr, kv_bytes_per_token=kv, loss=loss, accuracy=acc, **device)
        | {"seconds": seconds, "rates_at_once": len(lrs)}
        for lr, loss, acc in zip(lrs, losses, scores)
    ]


def _grid(preset: Preset, dim: int) -> dict[str, tuple[str, ModelConfig]]:
    longest = max(s.length for s in preset.test)
    return model_grid(preset.vocab_size, dim, preset.n_layers, preset.chunks, preset.windows, longest)


def run(
    preset_name: str,
    out: str,
    models: Sequence[str] | None = None,
    dims: Sequence[int] | None = None,
    jobs: int = 1,
    lrs: Sequence[float] | None = None,
) -> dict:
    """Trains and scores the preset's grid (resuming ``out``), writing ``out`` after every model;
    ``models``, ``dims``: a part of the grid (names of ``model_grid``, widths of the preset);
    ``lrs``: peak learning rates instead of the preset's (a finer probe: give it its own ``out``,
    since the best run of a model is taken over every rate its file holds);
    ``jobs`` > 1: that many worker processes at once (each its own JAX client: set
    XLA_PYTHON_CLIENT_MEM_FRACTION for a GPU they share), the widest models first."""
    preset = PRESETS[preset_name]
    result = {"preset": preset_name, "runs": []}
    if os.path.exists(out):
        with open(out) as f:
            result = json.load(f)
        if result.get("preset") != preset_name:
            raise ValueError(f"{out} holds a run of preset {result.get('preset')!r}, not {preset_name!r}")
    result["preset_settings"] = dataclasses.asdict(preset)
    done = {(r["model"], r["dim"], r["lr"]) for r in result["runs"]}
    wanted = models or preset.models
    unknown = sorted(set(wanted or ()) - set(_grid(preset, preset.dims[0])))
    if unknown:
        raise ValueError(
            f"MQAR: no models {unknown} in the {preset_name} grid; it has {sorted(_grid(preset, preset.dims[0]))}"
        )
    todo = []
    for dim in sorted(dims or preset.dims, reverse=True):
        for name in _grid(preset, dim):
            left = [lr for lr in (lrs or preset.lrs) if (name, dim, lr) not in done]
            if (wanted is None or name in wanted) and left:
                todo.append((preset_name, name, dim, left))

    def record(runs):
        result["runs"].extend(runs)
        for r in runs:
            print(
                f"{r['model']:18s} d={r['dim']:4d} lr={r['lr']:.1e} loss {r['loss']:.3f} "
                + " ".join(f"{key}:{acc:.3f}" for key, acc in r["accuracy"].items())
                + f"  ({r['seconds']:.0f} s for {r['rates_at_once']} rates)",
                flush=True,
            )
        _save(result, out)

    if jobs <= 1:
        for job in todo:
            record(train_and_score(*job))
    else:
        with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            for done_job in concurrent.futures.as_completed([pool.submit(train_and_score, *job) for job in todo]):
                record(done_job.result())
    result["best"] = best_runs(result["runs"])
    _save(result, out)
    return result


def _save(result: dict, path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, path)


def best_runs(runs: list[dict]) -> list[dict]:
    """Per (model, width), the run at the learning rate with the best mean test accuracy."""
    best: dict[tuple[str, int], dict] = {}
    for r in runs:
        key, mean = (r["model"], r["dim"]), float(np.mean(list(r["accuracy"].values())))
        if key not in best or mean > best[key]["mean_accuracy"]:
            best[key] = dict(r, mean_accuracy=mean)
    return sorted(best.values(), key=lambda r: (r["dim"], r["family"], r["model"]))


def table(result: dict) -> str:
    """The best runs: accuracy and KV bytes per token at each test setting, a Markdown table."""
    runs = result.get("best") or best_runs(result["runs"])
    settings = list(runs[0]["accuracy"]) if runs else []
    lines = ["| model | d | lr | " + " | ".join(f"{s} acc (B/tok)" for s in settings) + " |"]
    lines.append("|---|---|---|" + "---|" * len(settings))
    for r in runs:
        cells = [f"{r['accuracy'][s]:.3f} ({r['kv_bytes_per_token'][s]:.0f})" for s in settings]
        lines.append(f"| {r['model']} | {r['dim']} | {r['lr']:.1e} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    """Accuracy against KV-state bytes per token (log x), one panel per test setting: every model
    a point (the marker tells the width), and per family and width a line through its frontier
    (the best accuracy any of its models reaches with at most that many bytes; line style: width)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result.get("best") or best_runs(result["runs"])
    settings = list(runs[0]["accuracy"])
    dims = sorted({r["dim"] for r in runs})
    markers, styles = dict(zip(dims, "o^sDv")), dict(zip(dims, ["-", "--", ":", "-.", "-"]))
    cols = min(4, len(settings))
    rows = math.ceil(len(settings) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
    for ax, s in zip(axes.flat, settings):
        for i, family in enumerate(sorted({r["family"] for r in runs})):
            color = f"C{i}"
            for dim in dims:
                mine = sorted(
                    (r for r in runs if r["family"] == family and r["dim"] == dim),
                    key=lambda r: r["kv_bytes_per_token"][s],
                )
                if not mine:
                    continue
                frontier = np.maximum.accumulate([r["accuracy"][s] for r in mine])
                ax.plot(
                    [r["kv_bytes_per_token"][s] for r in mine],
                    frontier,
                    styles[dim],
                    color=color,
                    label=family if dim == dims[0] else None,
                )
                for r in mine:
                    ax.plot(r["kv_bytes_per_token"][s], r["accuracy"][s], markers[dim], color=color, alpha=0.8)
        ax.set_xscale("log")
        ax.set_title(f"L / pairs = {s}")
        ax.set_xlabel("KV state bytes per token")
        ax.set_ylabel("accuracy")
        ax.set_ylim(0, 1.02)
    for ax in axes.flat[len(settings) :]:
        ax.axis("off")
    widths = ", ".join(f"{markers[d]}{styles[d]} d={d}" for d in dims)
    axes.flat[0].legend(fontsize=7, title=f"markers: {widths}", title_fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    ap.add_argument("--models", default=None, help="comma-separated model names of the grid (default: the preset's)")
    ap.add_argument("--dims", default=None, help="comma-separated widths of the preset (default: all)")
    ap.add_argument("--out", default="mqar.json")
    ap.add_argument("--jobs", type=int, default=1, help="worker processes training models at once (default 1)")
    ap.add_argument("--lrs", default=None, help="comma-separated peak learning rates (default: the preset's)")
    ap.add_argument("--plot", metavar="JSON", help="only draw the plot (next to the JSON) of an earlier run")
    args = ap.parse_args(argv)
    if args.plot:
        with open(args.plot) as f:
            result = json.load(f)
        plot(result, os.path.splitext(args.plot)[0] + ".png")
        print(table(result))
        return 0
    models = args.models.split(",") if args.models else None
    dims = [int(d) for d in args.dims.split(",")] if args.dims else None
    preset = PRESETS[args.preset]
    if dims and not set(dims) <= set(preset.dims):
        ap.error(f"--dims {dims}: the {args.preset} preset's widths are {list(preset.dims)}")
    if args.jobs < 1:
        ap.error(f"--jobs must be at least 1, got {args.jobs}")
    try:
        lrs = [float(x) for x in args.lrs.split(",")] if args.lrs else None
    except ValueError:
        ap.error(f"--lrs {args.lrs!r}: not a comma-separated list of numbers")
    if lrs and not all(0 < lr < 1 for lr in lrs):
        ap.error(f"--lrs {lrs}: every peak learning rate must lie in (0, 1)")
    result = run(args.preset, args.out, models, dims, args.jobs, lrs)
    print(table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
