"""Turn the results of ``experiments/replication.sh`` into a table and loss curves.

    python experiments/summarize.py RESULTS_DIR[=LABEL] [RESULTS_DIR=LABEL ...] --png docs/results_loss.png > table.md

Each RESULTS_DIR is an unpacked ``replication.tar.gz``: per model ``<name>/metrics.jsonl``,
``<name>/config.yaml``, ``<name>.wall.json`` and ``<name>.eval.{heldout,wiki}[.kK].json``.
Prints one Markdown table: model, parameters, KV-cache bytes per token at L=1024 (what a
decoder holds, ``cache.formula_bytes``), tokens seen, training wall time, and token / word
perplexity and bits per byte on the held-out books and on WikiText-2 raw test. Several
directories (e.g. one per learning rate) give one table each, titled by LABEL, and one panel
each in the PNG.
"""

from __future__ import annotations

import argparse
import json
import pathlib

from attamba_jax.cache import formula_bytes
from attamba_jax.config import load_config
from attamba_jax.describe import parameter_count


def _read_jsonl(path: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _metric(path: pathlib.Path) -> dict | None:
    return json.loads(path.read_text())["results"]["total"] if path.is_file() else None


def summarize(root: pathlib.Path) -> tuple[str, dict[str, list[dict]]]:
    rows, curves = [], {}
    names = sorted(p.name for p in root.iterdir() if p.is_dir() and (p / "metrics.jsonl").is_file())
    header = (
        "| model | params | KV bytes/token @1024 | tokens seen | train wall s | held-out tok ppl | held-out word ppl "
        "| held-out bpb | WikiText-2 tok ppl | WikiText-2 word ppl | WikiText-2 bpb |"
    )
    rows.append(header)
    rows.append("|---|" + "---:|" * (header.count("|") - 2))
    for name in names:
        cfg = load_config(root / name / "config.yaml")
        metrics = _read_jsonl(root / name / "metrics.jsonl")
        curves[name] = metrics
        steps = max((m["step"] for m in metrics if m["kind"] == "train"), default=0)
        tokens = steps * cfg.data.batch_size * cfg.data.seq_len
        wall = json.loads((root / f"{name}.wall.json").read_text()) if (root / f"{name}.wall.json").is_file() else {}
        for suffix, label, k in (("", name, None), (".k4", f"{name} @K=4", 4), (".k16", f"{name} @K=16", 16)):
            held, wiki = (
                _metric(root / f"{name}.eval.heldout{suffix}.json"),
                _metric(root / f"{name}.eval.wiki{suffix}.json"),
            )
            if suffix and held is None and wiki is None:
                continue
            kv = formula_bytes(cfg.model, 1, 1024, token_chunk=k) / 1024
            cells = [
                label,
                f"{parameter_count(cfg.model):,}",
                f"{kv:,.0f}",
                f"{tokens / 1e6:.1f}M",
                str(wall.get("wall_s", "–")),
            ]
            for m in (held, wiki):
                cells += (
                    ["–"] * 3
                    if m is None
                    else [f"{m['token_perplexity']:.2f}", f"{m['word_perplexity']:.2f}", f"{m['bits_per_byte']:.4f}"]
                )
            rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows), curves


def plot(groups: dict[str, dict[str, list[dict]]], png: str):
    """One panel per group: train loss (lines) and held-out loss (markers) against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(groups), figsize=(7 * len(groups), 4.5), squeeze=False, sharey=True)
    for ax, (label, curves) in zip(axes[0], groups.items()):
        for name, metrics in curves.items():
            train = [(m["step"], m["loss"]) for m in metrics if m["kind"] == "train"]
            held = [(m["step"], m["loss"]) for m in metrics if m["kind"] == "eval"]
            line = ax.plot(*zip(*train), label=f"{name} (train)", alpha=0.8)[0] if train else None
            if held:
                ax.plot(*zip(*held), "o--", color=line.get_color() if line else None, label=f"{name} (held-out)")
        ax.set_title(label)
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/token)")
        ax.set_ylim(top=min(8.0, ax.get_ylim()[1]))
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("results", nargs="+", help="RESULTS_DIR or RESULTS_DIR=LABEL")
    parser.add_argument("--png", default="results_loss.png")
    args = parser.parse_args()
    groups = {}
    for entry in args.results:
        root, _, label = entry.partition("=")
        table, groups[label or root] = summarize(pathlib.Path(root))
        if len(args.results) > 1:
            print(f"\n**{label or root}**\n")
        print(table)
    plot(groups, args.png)


if __name__ == "__main__":
    main()
