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

A run writes its JSON after every model and takes up where an earlier run with the same
``--out`` stopped (models already there are not trained again).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from attamba_jax.cache import formula_bytes
from attamba_jax.config import Config, ModelConfig, OptimConfig, TrainConfig
from attamba_jax.model import make_forward
from attamba_jax.optimizer import make_optimizer
from attamba_jax.sharding import make_mesh, use_mesh
from attamba_jax.train_step import init_train_state, jit_train_step, train_batch_sharding

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


def sequences(setting: Setting, rows: int, vocab_size: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """``rows`` MQAR sequences of ``setting``: inputs, targets [rows, L] int32 (next-token targets)
    and weights [rows, L] float32, 1 at the N queried positions (their targets are the values)."""
    n, length = setting.pairs, setting.length
    half = vocab_size // 2
    if half - 1 < n:
        raise ValueError(f"MQAR: a vocabulary of {vocab_size} holds fewer than {n} distinct keys")
    keys = np.stack([rng.choice(np.arange(1, half), n, replace=False) for _ in range(rows)])
    values = np.stack([rng.choice(np.arange(half, vocab_size), n, replace=False) for _ in range(rows)])
    tokens = rng.integers(0, vocab_size, (rows, length + 1))  # the random filler
    tokens[:, 0 : 2 * n : 2], tokens[:, 1 : 2 * n : 2] = keys, values
    space = np.arange((length - 2 * n) // 2)  # gaps g: the query at 2N + 2g, its value at 2N + 2g + 1 <= L
    p = POWER_A * (space + 1.0) ** (POWER_A - 1.0)
    gaps = np.stack([rng.choice(space, n, replace=False, p=p / p.sum()) for _ in range(rows)])
    at = 2 * n + 2 * gaps  # the query's position (its target, the value, is the next token)
    row = np.arange(rows)[:, None]
    tokens[row, at] = keys
    tokens[row, at + 1] = values
    weights = np.zeros((rows, length), np.float32)
    weights[row, at] = 1.0
    return {
        "inputs": tokens[:, :-1].astype(np.int32),
        "targets": tokens[:, 1:].astype(np.int32),
        "weights": weights,
    }


def mixture(settings: Sequence[Setting], rows: int, vocab_size: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A training batch: each row one of ``settings`` (in turn), in a row of the longest length
    whose positions after the sequence are random tokens of weight 0."""
    length = max(s.length for s in settings)
    out = {
        "inputs": rng.integers(0, vocab_size, (rows, length)).astype(np.int32),
        "targets": rng.integers(0, vocab_size, (rows, length)).astype(np.int32),
        "weights": np.zeros((rows, length), np.float32),
    }
    for i, setting in enumerate(settings):
        picked = np.arange(i, rows, len(settings))
        part = sequences(setting, len(picked), vocab_size, rng)
        for key, value in part.items():
            out[key][picked, : setting.length] = value
    return out


def accuracy(predictions, batch) -> tuple[float, float]:
    """(correct, counted) over the queried positions (weight > 0) only."""
    counted = np.asarray(batch["weights"]) > 0
    correct = (np.asarray(predictions) == np.asarray(batch["targets"])) & counted
    return float(correct.sum()), float(counted.sum())


# --- the models --------------------------------------------------------------------------


def _base(vocab_size: int, dim: int, n_layers: int) -> dict:
    return dict(vocab_size=vocab_size, dim=dim, n_layers=n_layers, n_heads=max(1, dim // 32), multiple_of=16)


def model_grid(
    vocab_size: int, dim: int, n_layers: int, chunks, windows, longest: int
) -> dict[str, tuple[str, ModelConfig]]:
    """name -> (family, config): Attamba at every K x W; the full transformer; per K, the transformer
    shrunk to Attamba's KV width (isoKV: attention width dim / K) and the sliding-window transformer
    whose cache holds as many tokens as Attamba's at the ``longest`` test length (⌈L/K⌉ + W)."""
    base = _base(vocab_size, dim, n_layers)
    grid = {"transformer": ("transformer", ModelConfig(arch="transformer", **base))}
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
                    **base,
                ),
            )
        width = max(2, dim // k)
        heads = max(1, min(base["n_heads"], width // 2))
        iso = dict(base, n_heads=heads)
        grid[f"isokv_k{k}"] = ("isoKV", ModelConfig(arch="transformer", head_dim=width // heads, **iso))
        window = -(-longest // k) + min(windows)
        grid[f"sliding_w{window}"] = ("sliding window", ModelConfig(arch="transformer", sliding_window=window, **base))
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


def train_and_score(cfg: ModelConfig, preset: Preset, lr: float, seed: int = 0) -> dict:
    """Trains ``cfg`` on the preset's mixture at ``lr`` on one device and scores every test setting:
    {"loss": final training loss, "accuracy": {"L/N": accuracy}, "seconds": wall time}."""
    start = time.perf_counter()
    full = Config(
        model=cfg,
        optim=OptimConfig(lr=lr, warmup_steps=max(1, preset.steps // 10), min_lr_ratio=0.1, weight_decay=0.1),
        train=TrainConfig(steps=preset.steps),
        seed=seed,
    )
    cfg.validate()
    full.optim.validate()
    mesh = make_mesh({"data": 1, "fsdp": 1, "context": 1, "tensor": 1}, jax.devices()[:1])
    tx, schedule = make_optimizer(full.optim, preset.steps)
    graphdef, state, shardings = init_train_state(full, mesh, tx)
    step = jit_train_step(graphdef, tx, schedule, shardings, train_batch_sharding(mesh, preset.batch))
    rng = np.random.default_rng(seed)
    loss = float("nan")
    with use_mesh(mesh):
        for _ in range(preset.steps):
            batch = mixture(preset.train, preset.batch, preset.vocab_size, rng)
            state, metrics = step(state, {key: value[None] for key, value in batch.items()})
        loss = float(metrics["loss"])
    forward = make_forward(graphdef)
    predict = jax.jit(lambda params, tokens: jnp.argmax(forward(params, tokens), axis=-1))
    scores = {}
    test_rng = np.random.default_rng(seed + 1)
    for setting in preset.test:
        correct = counted = 0.0
        for first in range(0, preset.test_rows, preset.batch):
            batch = sequences(setting, min(preset.batch, preset.test_rows - first), preset.vocab_size, test_rng)
            c, n = accuracy(predict(state["params"], jnp.asarray(batch["inputs"])), batch)
            correct, counted = correct + c, counted + n
        scores[f"{setting.length}/{setting.pairs}"] = correct / counted
    return {"loss": loss, "accuracy": scores, "seconds": time.perf_counter() - start}


def run(preset_name: str, out: str, models: Sequence[str] | None = None, dims: Sequence[int] | None = None) -> dict:
    """Trains and scores the preset's grid (resuming ``out``), writing ``out`` after every run;
    ``models``, ``dims``: a part of the grid (names of ``model_grid``, widths of the preset)."""
    preset = PRESETS[preset_name]
    result = {"preset": preset_name, "runs": []}
    if os.path.exists(out):
        with open(out) as f:
            result = json.load(f)
        if result.get("preset") != preset_name:
            raise ValueError(f"{out} holds a run of preset {result.get('preset')!r}, not {preset_name!r}")
    result.update(device=str(jax.devices()[0].device_kind), jax=jax.__version__, python=platform.python_version())
    result["preset_settings"] = dataclasses.asdict(preset)
    done = {(r["model"], r["dim"], r["lr"]) for r in result["runs"]}
    longest = max(s.length for s in preset.test)
    wanted = models or preset.models
    known = model_grid(preset.vocab_size, preset.dims[0], preset.n_layers, preset.chunks, preset.windows, longest)
    unknown = sorted(set(wanted or ()) - set(known))
    if unknown:
        raise ValueError(f"MQAR: no models {unknown} in the {preset_name} grid; it has {sorted(known)}")
    for dim in dims or preset.dims:
        grid = model_grid(preset.vocab_size, dim, preset.n_layers, preset.chunks, preset.windows, longest)
        for name, (family, cfg) in grid.items():
            if wanted is not None and name not in wanted:
                continue
            for lr in preset.lrs:
                if (name, dim, lr) in done:
                    continue
                scored = train_and_score(cfg, preset, lr)
                kv = {f"{s.length}/{s.pairs}": kv_bytes_per_token(cfg, s.length) for s in preset.test}
                result["runs"].append(dict(model=name, family=family, dim=dim, lr=lr, kv_bytes_per_token=kv, **scored))
                print(
                    f"{name:18s} d={dim:4d} lr={lr:.1e} loss {scored['loss']:.3f} "
                    + " ".join(f"{key}:{acc:.3f}" for key, acc in scored["accuracy"].items())
                    + f"  ({scored['seconds']:.0f} s)",
                    flush=True,
                )
                _save(result, out)
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
    """Accuracy against KV-state bytes per token (log x), one line per family, one panel per test setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result.get("best") or best_runs(result["runs"])
    settings = list(runs[0]["accuracy"])
    cols = min(4, len(settings))
    fig, axes = plt.subplots(math.ceil(len(settings) / cols), cols, figsize=(4 * cols, 3.2), squeeze=False)
    for ax, s in zip(axes.flat, settings):
        for family in sorted({r["family"] for r in runs}):
            points = sorted((r["kv_bytes_per_token"][s], r["accuracy"][s]) for r in runs if r["family"] == family)
            ax.plot(*zip(*points), marker="o", label=family)
        ax.set_xscale("log")
        ax.set_title(f"L / pairs = {s}")
        ax.set_xlabel("KV state bytes per token")
        ax.set_ylabel("accuracy")
        ax.set_ylim(0, 1.02)
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    ap.add_argument("--models", default=None, help="comma-separated model names of the grid (default: the preset's)")
    ap.add_argument("--dims", default=None, help="comma-separated widths of the preset (default: all)")
    ap.add_argument("--out", default="mqar.json")
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
    result = run(args.preset, args.out, models, dims)
    print(table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
