"""Passkey retrieval on a trained model: a 5-digit number hidden in filler text from held-out
books, asked for at the end, answered by greedy decoding and scored under teacher forcing.

A prompt of exactly L tokens is ``[BOS] PREFIX filler[:a] NEEDLE filler[a:] QUESTION`` with the
needle ``The pass key is 12345. Remember it. 12345 is the pass key.`` and the question ``What is
the pass key? The pass key is`` (each piece encoded whole, as the tokenizer splits natural
text), the filler a random stretch of the held-out books' tokens and ``a`` the depth's share of
the filler, moved on by a random 0 … 15 tokens so that the passkey falls at every position of a
chunk grid (Attamba's K ≤ 16). Two scores per trial:

- greedy: the model continues the prompt (``generate``, the serving path: prefill, then the
  cache) for ``NEW_TOKENS`` tokens; right when the first run of digits it writes is the passkey.
- teacher forced: one forward pass of the prompt followed by the answer (the needle's own tokens
  after ``The pass key is``: a space and the digits); the answer's log-probability and the
  share of its tokens that are the model's argmax given the true ones before. The same for a
  decoy key found nowhere in the prompt gives the chance level. A model that retrieves part
  of the key, or only once it is started on it, shows here when greedy accuracy is zero.

Every model given the same tokenizer, books and seed gets the same prompts.

    python -m attamba_jax.tasks.passkey --workdir runs/attamba_k8_w8 --books 'heldout/*.txt' \\
        --out passkey_attamba_k8_w8.json          # lengths 256 … 4096, 10 depths, 100 trials each
    python -m attamba_jax.tasks.passkey --plot passkey_*.json --png passkey.png   # heatmaps, tables

Besides the scores by depth and length, the JSON and the tables give them by where the passkey
falls on the model's chunk grid (its last token's position mod K; with the layers' offsets
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
    "I will quiz you about the important information there."
)
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
ANSWER_HEAD = "The pass key is"  # the needle's start and the question's end: the answer follows it
QUESTION = "What is the pass key? " + ANSWER_HEAD
LENGTHS = (256, 512, 1024, 2048, 4096)
DEPTHS = 10  # depths 0, 1/9, ..., 1 of the filler
TRIALS = 100  # per (length, depth)
SPREAD = 16  # the needle moves on by 0 .. SPREAD-1 tokens: every grid position of K <= 16
NEW_TOKENS = 12
ANSWER_ROOM = 16  # most tokens an answer may take (the teacher-forced rows' extra width)


@dataclasses.dataclass(frozen=True)
class Trial:
    """One prompt: its tokens, where the passkey (its first mention) sits, and the answers scored
    under teacher forcing: the needle's own tokens after ``ANSWER_HEAD`` up to the passkey's last
    digit, and the same for a decoy key that is nowhere in the prompt."""

    length: int
    depth: float
    key: int
    tokens: tuple[int, ...]
    key_start: int  # position of the first mention's first token holding a digit of the key
    key_end: int  # position of its last token
    answer: tuple[int, ...]
    decoy: tuple[int, ...]


def filler_tokens(tokenizer, texts: Sequence[str]) -> np.ndarray:
    """The books' tokens, one after another (no BOS/EOS): what the filler is cut from."""
    ids = [np.asarray(tokenizer.encode(text), np.int32) for text in texts]
    out = np.concatenate(ids) if ids else np.zeros((0,), np.int32)
    return out[(out != tokenizer.bos_id) & (out != tokenizer.eos_id)]


def _needle(tokenizer, key: int, head: list[int]) -> tuple[list[int], int, int]:
    """The needle's tokens (encoded whole, as the tokenizer splits natural text), and the span
    (first, last) of the tokens spelling the key's first mention."""
    needle = [int(t) for t in tokenizer.encode(NEEDLE.format(key=key))]
    if needle[: len(head)] != head:
        raise ValueError(f"passkey: the tokenizer splits {NEEDLE!r} so that it does not start with {ANSWER_HEAD!r}")
    digits = str(key)
    last = next(i for i in range(len(head), len(needle)) if digits in tokenizer.decode(needle[: i + 1]))
    first = next(j for j in range(last, -1, -1) if digits in tokenizer.decode(needle[j : last + 1]))
    if last + 1 - len(head) > ANSWER_ROOM:
        raise ValueError(f"passkey: the tokenizer spells the key {key} in more than {ANSWER_ROOM} tokens")
    return needle, first, last


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
    prefix, head, question = encode(PREFIX), encode(ANSWER_HEAD), encode(QUESTION)
    if question[-len(head) :] != head:
        raise ValueError(f"passkey: the tokenizer splits {QUESTION!r} so that it does not end with {ANSWER_HEAD!r}")
    rng = np.random.default_rng(seed)
    out = []
    for length in lengths:
        for depth in np.linspace(0.0, 1.0, depths):
            for _ in range(trials):
                key, decoy_key = (int(k) for k in rng.choice(np.arange(10_000, 100_000), 2, replace=False))
                needle, first, last = _needle(tokenizer, key, head)
                decoy, _, decoy_last = _needle(tokenizer, decoy_key, head)
                room = length - 1 - len(prefix) - len(needle) - len(question)
                if room < SPREAD:
                    raise ValueError(f"passkey: a prompt of {length} tokens leaves {room} tokens of filler")
                if len(filler) < room:
                    raise ValueError(
                        f"passkey: the books hold {len(filler)} tokens, a {length}-token prompt needs {room}"
                    )
                start = int(rng.integers(0, len(filler) - room + 1))
                text = [int(t) for t in filler[start : start + room]]
                at = min(room, int(round(depth * (room - SPREAD))) + int(rng.integers(0, SPREAD)))
                tokens = [tokenizer.bos_id, *prefix, *text[:at], *needle, *text[at:], *question]
                offset = 1 + len(prefix) + at
                out.append(
                    Trial(
                        length,
                        float(depth),
                        key,
                        tuple(tokens),
                        offset + first,
                        offset + last,
                        tuple(needle[len(head) : last + 1]),
                        tuple(decoy[len(head) : decoy_last + 1]),
                    )
                )
    return out


def answered(continuation: str, key: int) -> bool:
    """Whether the first run of digits in ``continuation`` is ``key``."""
    found = re.search(r"\d+", continuation)
    return found is not None and found.group() == str(key)


def score(
    trials: Sequence[Trial],
    continue_prompts: Callable[[list[list[int]]], list[str]],
    teacher_force: Callable[[list[list[int]], list[tuple[int, ...]]], list[tuple[float, int]]],
    rows: int,
) -> list[dict]:
    """Per trial: ``right`` (the greedy continuation's first number is the key), and under teacher
    forcing the answer's and the decoy's log-probability (nats) and tokens the model's argmax gets
    right. ``continue_prompts`` continues a batch of prompts (text out); ``teacher_force`` scores
    answers after prompts: (log p, tokens right) per row. Trials go in batches of ``rows``, the
    last filled up with copies of its last trial."""
    results = []
    for first in range(0, len(trials), rows):
        part = list(trials[first : first + rows])
        filled = part + [part[-1]] * (rows - len(part))
        prompts = [list(t.tokens) for t in filled]
        texts = continue_prompts(prompts)
        forced = teacher_force(prompts + prompts, [t.answer for t in filled] + [t.decoy for t in filled])
        for j, t in enumerate(part):
            (logp, hits), (decoy_logp, decoy_hits) = forced[j], forced[rows + j]
            results.append(
                dict(
                    right=answered(texts[j], t.key),
                    answer_logprob=logp,
                    answer_tokens_right=hits,
                    decoy_logprob=decoy_logp,
                    decoy_tokens_right=decoy_hits,
                )
            )
    return results


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


def teacher_forcing(
    graphdef, params, pad_to: int
) -> Callable[[list[list[int]], list[tuple[int, ...]]], list[tuple[float, int]]]:
    """Scores ``answer`` after ``prompt`` in one forward pass of ``prompt + answer``, right-padded
    to ``pad_to + ANSWER_ROOM`` tokens (one compiled shape for prompts up to ``pad_to``): the
    answer's summed log-probability and how many of its tokens are the argmax given the ones
    before."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from attamba_jax.loss import token_nll

    @jax.jit
    def forward(params, tokens, at, targets, valid):
        logits = nnx.merge(graphdef, params).logits_at(tokens, at)  # [B, A, vocab]
        logp = -token_nll(logits, targets)
        hits = jnp.argmax(logits, axis=-1) == targets
        return jnp.sum(jnp.where(valid, logp, 0.0), axis=1), jnp.sum(hits & valid, axis=1)

    def teacher_force(prompts, answers):
        width = pad_to + ANSWER_ROOM
        if max(len(p) for p in prompts) > pad_to:
            raise ValueError(f"passkey: a prompt is longer than pad_to={pad_to}")
        b = len(prompts)
        tokens = np.zeros((b, width), np.int32)
        at = np.zeros((b, ANSWER_ROOM), np.int32)
        targets = np.zeros((b, ANSWER_ROOM), np.int32)
        valid = np.zeros((b, ANSWER_ROOM), bool)
        for row, (prompt, answer) in enumerate(zip(prompts, answers)):
            n = len(prompt)
            tokens[row, : n + len(answer)] = [*prompt, *answer]
            at[row] = n - 1 + np.arange(ANSWER_ROOM)  # position i predicts token i + 1
            targets[row, : len(answer)] = answer
            valid[row, : len(answer)] = True
        logp, hits = jax.device_get(forward(params, tokens, at, targets, valid))
        return [(float(x), int(y)) for x, y in zip(logp, hits)]

    return teacher_force


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


def _cell(trials: Sequence[Trial], results: Sequence[dict]) -> dict:
    """Greedy accuracy and the teacher-forced scores of some trials (``score``'s results)."""
    answer_tokens = sum(len(t.answer) for t in trials)
    decoy_tokens = sum(len(t.decoy) for t in trials)
    return dict(
        accuracy=float(np.mean([r["right"] for r in results])),
        trials=len(results),
        answer_logprob=float(np.mean([r["answer_logprob"] for r in results])),
        decoy_logprob=float(np.mean([r["decoy_logprob"] for r in results])),
        token_accuracy=sum(r["answer_tokens_right"] for r in results) / answer_tokens,
        decoy_token_accuracy=sum(r["decoy_tokens_right"] for r in results) / decoy_tokens,
    )


def summarize(model: dict, trials: Sequence[Trial], results: Sequence[dict]) -> dict:
    """By (length, depth), by length, by (length, grid position of the passkey's last token) for
    Attamba: greedy accuracy and the teacher-forced scores (``_cell``); the passkey's distance
    from the prompt's end against the window."""

    def cell(keep):
        chosen = [(t, r) for t, r in zip(trials, results) if keep(t)]
        return _cell([t for t, _ in chosen], [r for _, r in chosen]) if chosen else None

    lengths = sorted({t.length for t in trials})
    depths = sorted({t.depth for t in trials})
    out = dict(
        model=model,
        by_length_depth={
            f"{n}/{d:.3f}": cell(lambda t, n=n, d=d: t.length == n and t.depth == d) for n in lengths for d in depths
        },
        by_length={str(n): cell(lambda t, n=n: t.length == n) for n in lengths},
    )
    distance = [t.length - 1 - t.key_end for t in trials]
    out["distance_to_end"] = dict(min=int(min(distance)), max=int(max(distance)))
    if model["token_chunk"]:
        k, w = model["token_chunk"], model["window"]
        out["in_window_trials"] = int(sum(d < w for d in distance))
        by_position = {}
        for n in lengths:
            for p in range(k):
                found = cell(lambda t, n=n, p=p: t.length == n and t.key_end % k == p)
                if found:
                    by_position[f"{n}/{p}"] = found
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
    # Every batch one shape (the longest prompt's): two compiled programs in all, which costs less
    # than compiling per length where the model's kernels take long to compile.
    longest = max(lengths)
    results = score(
        prompts,
        greedy(graphdef, params, tokenizer, longest),
        teacher_forcing(graphdef, params, longest),
        rows=max(1, tokens_per_call // longest),
    )
    model = _model_summary(cfg, os.path.basename(os.path.normpath(workdir)), step)
    result = summarize(model, prompts, results)
    result["setup"] = dict(
        books=[os.path.basename(b) for b in books],
        seed=seed,
        trials_per_cell=trials,
        lengths=list(lengths),
        depths=depths,
    )
    result["trials"] = [
        dict(length=t.length, depth=t.depth, key=t.key, key_start=t.key_start, key_end=t.key_end) | r
        for t, r in zip(prompts, results)
    ]
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, out)
    return result


def _grid_table(title: str, rows: Sequence[tuple[str, Sequence[float]]], lengths: Sequence[int]) -> list[str]:
    lines = ["", title, "", "| | " + " | ".join(str(n) for n in lengths) + " |", "|---|" + "---:|" * len(lengths)]
    return lines + [f"| {label} | " + " | ".join(f"{c:.2f}" for c in cells) + " |" for label, cells in rows]


def table(results: Sequence[dict]) -> str:
    """Markdown: per model and length, greedy accuracy and the teacher-forced scores; then per
    model by depth and, for Attamba, by the passkey's position on the chunk grid."""
    lengths = sorted({int(n) for r in results for n in r["by_length"]})
    nan = dict(accuracy=float("nan"), token_accuracy=float("nan"), decoy_token_accuracy=float("nan"))
    at = lambda cells, key: cells.get(key) or nan  # noqa: E731
    lines = [
        "Greedy accuracy (the first number written is the passkey) by context length:",
        "",
        "| model | " + " | ".join(str(n) for n in lengths) + " |",
        "|---|" + "---:|" * len(lengths),
    ]
    lines += [
        f"| {r['model']['name']} | "
        + " | ".join(f"{at(r['by_length'], str(n))['accuracy']:.2f}" for n in lengths)
        + " |"
        for r in results
    ]
    lines += [
        "",
        "Teacher forced: the share of the passkey's tokens the model's argmax gets right, the key in the "
        "prompt / a decoy key that is not (chance level):",
        "",
        "| model | " + " | ".join(str(n) for n in lengths) + " |",
        "|---|" + "---:|" * len(lengths),
    ]
    for r in results:
        cells = [at(r["by_length"], str(n)) for n in lengths]
        lines.append(
            f"| {r['model']['name']} | "
            + " | ".join(f"{c['token_accuracy']:.2f} / {c['decoy_token_accuracy']:.2f}" for c in cells)
            + " |"
        )
    for r in results:
        name, depths = r["model"]["name"], sorted({float(key.split("/")[1]) for key in r["by_length_depth"]})
        for metric, what in (("accuracy", "greedy accuracy"), ("token_accuracy", "teacher-forced token accuracy")):
            rows = [(f"{d:.2f}", [at(r["by_length_depth"], f"{n}/{d:.3f}")[metric] for n in lengths]) for d in depths]
            lines += _grid_table(f"{name}: {what} by depth (rows) and length (columns)", rows, lengths)
        if "by_length_grid_position" in r:
            k = r["model"]["token_chunk"]
            rows = [
                (str(p), [at(r["by_length_grid_position"], f"{n}/{p}")["token_accuracy"] for n in lengths])
                for p in range(k)
            ]
            lines += _grid_table(
                f"{name}: teacher-forced token accuracy by the passkey's last token's position mod K = {k} (rows)",
                rows,
                lengths,
            )
    return "\n".join(lines)


def plot(results: Sequence[dict], path: str) -> None:
    """Heatmaps (depth × length) per model: greedy accuracy (top), teacher-forced token accuracy
    of the passkey (bottom)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = (("accuracy", "greedy accuracy"), ("token_accuracy", "teacher-forced token accuracy"))
    fig, axes = plt.subplots(len(metrics), len(results), figsize=(3.6 * len(results), 6.6), squeeze=False)
    for col, r in enumerate(results):
        lengths = sorted({int(key.split("/")[0]) for key in r["by_length_depth"]})
        depths = sorted({float(key.split("/")[1]) for key in r["by_length_depth"]})
        for row, (metric, what) in enumerate(metrics):
            ax = axes[row, col]
            acc = np.array([[r["by_length_depth"][f"{n}/{d:.3f}"][metric] for n in lengths] for d in depths])
            ax.imshow(acc, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
            for (i, j), a in np.ndenumerate(acc):
                ax.text(j, i, f"{a:.2f}", ha="center", va="center", fontsize=6)
            ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], fontsize=7)
            ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths], fontsize=7)
            ax.set_xlabel("context length (tokens)")
            ax.set_ylabel("passkey depth")
            ax.set_title(f"{r['model']['name']}: {what}", fontsize=8)
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
    ap.add_argument("--tokens-per-call", type=int, default=65536, help="prompt tokens per batch (memory)")
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
