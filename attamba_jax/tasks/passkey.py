"""Passkey retrieval on a trained model: a 5-digit number hidden in filler text from held-out
books, asked for at the end, answered by greedy decoding.

A prompt of exactly L tokens is ``[BOS] PREFIX filler[:a] NEEDLE filler[a:] QUESTION`` with the
needle ``The pass key is 12345. Remember it. 12345 is the pass key.``, the filler a random stretch
of the held-out books' tokens and ``a`` the depth's share of the filler, moved on by a random
0 … 15 tokens so that the passkey falls at every position of a chunk grid (Attamba's K ≤ 16).
The model continues the prompt greedily (``generate``, the serving path: prefill, then the
cache) for ``NEW_TOKENS`` tokens; a trial is right when the first run of digits it writes is the
passkey. Every model given the same tokenizer, books and seed gets the same prompts.

    python -m attamba_jax.tasks.passkey --workdir runs/attamba_k8_w8 --books 'heldout/*.txt' \\
        --out passkey_attamba_k8_w8.json          # lengths 256 … 4096, 10 depths, 100 trials each
    python -m attamba_jax.tasks.passkey --plot passkey_*.json --png passkey.png   # heatmaps, tables

Besides accuracy by depth and length, the JSON and the tables give it by where the passkey
falls on the model's chunk grid (its last digit's position mod K; with the layers' offsets
``o_l`` a position p ends a chunk of layer l when p + o_l + 1 is a multiple of K) and by its
distance from the prompt's end against the window W.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import re
from collections.abc import Callable, Sequence

import numpy as np

PREFIX = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there.\n"
)
NEEDLE_HEAD = "\nThe pass key is"
NEEDLE_KEY = " {key}"
NEEDLE_TAIL = ". Remember it. {key} is the pass key.\n"
QUESTION = "\nWhat is the pass key? The pass key is"
LENGTHS = (256, 512, 1024, 2048, 4096)
DEPTHS = 10  # depths 0, 1/9, ..., 1 of the filler
TRIALS = 100  # per (length, depth)
SPREAD = 16  # the needle moves on by 0 .. SPREAD-1 tokens: every grid position of K <= 16
NEW_TOKENS = 12


@dataclasses.dataclass(frozen=True)
class Trial:
    """One prompt: its tokens and where the passkey (its first mention's digits) sits."""

    length: int
    depth: float
    key: int
    tokens: tuple[int, ...]
    key_start: int  # position of the first mention's first token of " 12345"
    key_end: int  # position of its last token


def filler_tokens(tokenizer, texts: Sequence[str]) -> np.ndarray:
    """The books' tokens, one after another (no BOS/EOS): what the filler is cut from."""
    ids = [np.asarray(tokenizer.encode(text), np.int32) for text in texts]
    out = np.concatenate(ids) if ids else np.zeros((0,), np.int32)
    return out[(out != tokenizer.bos_id) & (out != tokenizer.eos_id)]


def make_trials(
    tokenizer,
    filler: np.ndarray,
    lengths: Sequence[int] = LENGTHS,
    depths: int = DEPTHS,
    trials: int = TRIALS,
    seed: int = 0,
) -> list[Trial]:
    """``trials`` prompts per (length, depth), each exactly ``length`` tokens."""
    encode = lambda text: [int(t) for t in tokenizer.encode(text)]  # noqa: E731
    prefix, head, question = encode(PREFIX), encode(NEEDLE_HEAD), encode(QUESTION)
    rng = np.random.default_rng(seed)
    out = []
    for length in lengths:
        for depth in np.linspace(0.0, 1.0, depths):
            for _ in range(trials):
                key = int(rng.integers(10_000, 100_000))
                digits, tail = encode(NEEDLE_KEY.format(key=key)), encode(NEEDLE_TAIL.format(key=key))
                room = length - 1 - len(prefix) - len(head) - len(digits) - len(tail) - len(question)
                if room < SPREAD:
                    raise ValueError(f"passkey: a prompt of {length} tokens leaves {room} tokens of filler")
                if len(filler) < room:
                    raise ValueError(
                        f"passkey: the books hold {len(filler)} tokens, a {length}-token prompt needs {room}"
                    )
                start = int(rng.integers(0, len(filler) - room + 1))
                text = [int(t) for t in filler[start : start + room]]
                at = min(room, int(round(depth * (room - SPREAD))) + int(rng.integers(0, SPREAD)))
                tokens = [tokenizer.bos_id, *prefix, *text[:at], *head, *digits, *tail, *text[at:], *question]
                key_start = 1 + len(prefix) + at + len(head)
                out.append(Trial(length, float(depth), key, tuple(tokens), key_start, key_start + len(digits) - 1))
    return out


def answered(continuation: str, key: int) -> bool:
    """Whether the first run of digits in ``continuation`` is ``key``."""
    found = re.search(r"\d+", continuation)
    return found is not None and found.group() == str(key)


def score(trials: Sequence[Trial], continue_prompts: Callable[[list[list[int]]], list[str]], rows: int) -> list[bool]:
    """Right or wrong per trial; ``continue_prompts`` continues a batch of ``rows`` prompts (text
    out). The last batch is filled up with copies of its last prompt (one shape for all)."""
    right = []
    for first in range(0, len(trials), rows):
        part = trials[first : first + rows]
        prompts = [list(t.tokens) for t in part]
        continuations = continue_prompts(prompts + [prompts[-1]] * (rows - len(part)))
        right += [answered(text, t.key) for t, text in zip(part, continuations)]
    return right


def greedy(graphdef, params, tokenizer, pad_to: int) -> Callable[[list[list[int]]], list[str]]:
    """Greedy continuation of a batch through ``generate`` (prefill, then decode with the cache),
    the prompts right-padded to ``pad_to`` tokens: one compiled shape for every length."""
    from attamba_jax.generate import generate

    def continue_prompts(prompts):
        out = generate(
            graphdef, params, prompts, max_new_tokens=NEW_TOKENS, stop_tokens=[tokenizer.eos_id], pad_to=pad_to
        )
        return [
            tokenizer.decode([int(t) for t in row[:n] if t != tokenizer.eos_id])
            for row, n in zip(out.tokens, out.lengths)
        ]

    return continue_prompts


# --- results ----------------------------------------------------------------------------------


def _model_summary(cfg, name: str, step: int) -> dict:
    from pallas_kernels.chunk_grid import layer_offset

    m = cfg.model
    summary = dict(name=name, step=step, arch=m.arch, token_chunk=None, window=None, offsets=None)
    if m.arch == "attamba":
        k = m.token_chunk
        summary.update(
            token_chunk=k, window=m.window, offsets=[layer_offset(layer, k, m.n_layers) for layer in range(m.n_layers)]
        )
    return summary


def summarize(model: dict, trials: Sequence[Trial], right: Sequence[bool]) -> dict:
    """Accuracy by (length, depth), by (length, grid position of the passkey's last digit) for
    Attamba, and the passkey's distance from the prompt's end against the window."""
    lengths = sorted({t.length for t in trials})
    depths = sorted({t.depth for t in trials})
    grid = {}
    for length in lengths:
        for depth in depths:
            hits = [r for t, r in zip(trials, right) if t.length == length and t.depth == depth]
            grid[f"{length}/{depth:.3f}"] = dict(accuracy=float(np.mean(hits)), trials=len(hits))
    out = dict(
        model=model,
        by_length_depth=grid,
        by_length={str(n): float(np.mean([r for t, r in zip(trials, right) if t.length == n])) for n in lengths},
    )
    distance = [t.length - 1 - t.key_end for t in trials]
    out["distance_to_end"] = dict(min=int(min(distance)), max=int(max(distance)))
    if model["token_chunk"]:
        k, w = model["token_chunk"], model["window"]
        out["in_window_trials"] = int(sum(d < w for d in distance))
        by_position = {}
        for length in lengths:
            for p in range(k):
                hits = [r for t, r in zip(trials, right) if t.length == length and t.key_end % k == p]
                if hits:
                    by_position[f"{length}/{p}"] = dict(accuracy=float(np.mean(hits)), trials=len(hits))
        out["by_length_grid_position"] = by_position
    return out


def run(
    workdir: str,
    books: Sequence[str],
    out: str,
    *,
    lengths: Sequence[int] = LENGTHS,
    depths: int = DEPTHS,
    trials: int = TRIALS,
    seed: int = 0,
    tokens_per_call: int = 65536,
) -> dict:
    """Loads ``workdir``'s latest checkpoint, scores every trial and writes ``out`` (JSON)."""
    from attamba_jax.generate import load_workdir

    graphdef, params, cfg, tokenizer, step = load_workdir(workdir)
    texts = []
    for path in books:
        with open(path, encoding="utf-8") as f:
            texts.append(f.read())
    prompts = make_trials(tokenizer, filler_tokens(tokenizer, texts), lengths, depths, trials, seed)
    longest = max(lengths)
    right = score(prompts, greedy(graphdef, params, tokenizer, longest), rows=max(1, tokens_per_call // longest))
    model = _model_summary(cfg, os.path.basename(os.path.normpath(workdir)), step)
    result = summarize(model, prompts, right)
    result["setup"] = dict(
        books=[os.path.basename(b) for b in books],
        seed=seed,
        trials_per_cell=trials,
        lengths=list(lengths),
        depths=depths,
    )
    result["trials"] = [
        dict(length=t.length, depth=t.depth, key=t.key, key_start=t.key_start, key_end=t.key_end, right=r)
        for t, r in zip(prompts, right)
    ]
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, out)
    return result


def table(results: Sequence[dict]) -> str:
    """Accuracy by length per model, then by depth and length, Markdown."""
    lengths = sorted({int(n) for r in results for n in r["by_length"]})
    lines = ["| model | " + " | ".join(f"{n}" for n in lengths) + " |", "|---|" + "---:|" * len(lengths)]
    for r in results:
        lines.append(
            f"| {r['model']['name']} | "
            + " | ".join(f"{r['by_length'].get(str(n), float('nan')):.2f}" for n in lengths)
            + " |"
        )
    for r in results:
        depths = sorted({float(key.split("/")[1]) for key in r["by_length_depth"]})
        lines += ["", f"{r['model']['name']}: accuracy by depth (rows) and length (columns)", ""]
        lines += ["| depth | " + " | ".join(f"{n}" for n in lengths) + " |", "|---|" + "---:|" * len(lengths)]
        for d in depths:
            cells = [r["by_length_depth"].get(f"{n}/{d:.3f}", {}).get("accuracy", float("nan")) for n in lengths]
            lines.append(f"| {d:.2f} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")
        if "by_length_grid_position" in r:
            k = r["model"]["token_chunk"]
            lines += [
                "",
                f"{r['model']['name']}: accuracy by the passkey's last digit's position mod K = {k} (rows)",
                "",
            ]
            lines += ["| position | " + " | ".join(f"{n}" for n in lengths) + " |", "|---|" + "---:|" * len(lengths)]
            for p in range(k):
                cells = [
                    r["by_length_grid_position"].get(f"{n}/{p}", {}).get("accuracy", float("nan")) for n in lengths
                ]
                lines.append(f"| {p} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")
    return "\n".join(lines)


def plot(results: Sequence[dict], path: str) -> None:
    """A heatmap of accuracy (depth × length) per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(3.6 * len(results), 3.4), squeeze=False)
    for ax, r in zip(axes[0], results):
        lengths = sorted({int(key.split("/")[0]) for key in r["by_length_depth"]})
        depths = sorted({float(key.split("/")[1]) for key in r["by_length_depth"]})
        acc = np.array([[r["by_length_depth"][f"{n}/{d:.3f}"]["accuracy"] for n in lengths] for d in depths])
        ax.imshow(acc, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        for (i, j), a in np.ndenumerate(acc):
            ax.text(j, i, f"{a:.2f}", ha="center", va="center", fontsize=6)
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], fontsize=7)
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths], fontsize=7)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("passkey depth")
        ax.set_title(r["model"]["name"], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", help="a training workdir (config.yaml + checkpoints/); its latest checkpoint")
    ap.add_argument("--books", nargs="+", help="the held-out books' text files or globs (the filler)")
    ap.add_argument("--out", help="the results JSON")
    ap.add_argument("--lengths", default=",".join(map(str, LENGTHS)), help="comma-separated prompt lengths")
    ap.add_argument("--depths", type=int, default=DEPTHS, help="depths from 0 to 1 of the filler (default 10)")
    ap.add_argument("--trials", type=int, default=TRIALS, help="prompts per (length, depth) (default 100)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokens-per-call", type=int, default=65536, help="prompt tokens per generate call (memory)")
    ap.add_argument("--plot", nargs="+", metavar="JSON", help="only draw the heatmaps and print the tables of runs")
    ap.add_argument("--png", default="passkey.png", help="with --plot: where the heatmaps go")
    args = ap.parse_args(argv)
    if args.plot:
        results = []
        for path in args.plot:
            with open(path) as f:
                results.append(json.load(f))
        plot(results, args.png)
        print(table(results))
        return 0
    if not (args.workdir and args.books and args.out):
        ap.error("--workdir, --books and --out are needed (or --plot)")
    books = sorted({path for pattern in args.books for path in glob.glob(pattern)})
    if not books:
        ap.error(f"--books {args.books} match no file")
    lengths = [int(n) for n in args.lengths.split(",")]
    if args.depths < 1 or args.trials < 1 or args.tokens_per_call < 1 or min(lengths) < 1:
        ap.error("--depths, --trials, --tokens-per-call and every length must be positive")
    result = run(
        args.workdir,
        books,
        args.out,
        lengths=lengths,
        depths=args.depths,
        trials=args.trials,
        seed=args.seed,
        tokens_per_call=args.tokens_per_call,
    )
    print(table([result]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
