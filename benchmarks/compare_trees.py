"""Two source trees side by side: the whole training step of each, timed in one run, as ratios.

    python -m benchmarks.compare_trees --baseline .baseline --shapes 16x1024,1x16384 --out compare.json

Runs ``bench_train_step`` of the checkout and of ``--baseline`` (another checkout of the project,
e.g. ``git archive <commit> | tar -x -C .baseline``) in alternating fresh processes, ABBA order per
round, so that drift of the machine over the run falls on both trees alike. Each process times
every (model, shape) as the trainer runs steps (``bench_train_step``'s ``step_ms``). The table gives
each round's step-time ratio checkout / baseline and their mean; compiled programs are cached
per tree (``JAX_COMPILATION_CACHE_DIR``), so later rounds start faster.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _command(tree: pathlib.Path, out: pathlib.Path, args) -> list[str]:
    script = (
        ["-m", "benchmarks.bench_train_step"]
        if (tree / "benchmarks" / "__init__.py").exists()
        else [str(tree / "benchmarks" / "bench_train_step.py")]
    )
    return [
        sys.executable,
        *script,
        "--shapes",
        args.shapes,
        "--models",
        args.models,
        "--reps",
        str(args.reps),
        "--out",
        str(out),
        "--png",
        str(out.with_suffix(".png")),
    ]


def run_tree(name: str, tree: pathlib.Path, work: pathlib.Path, round_: int, args) -> list[dict]:
    out = work / f"{name}_{round_}.json"
    env = dict(os.environ, PYTHONUNBUFFERED="1", JAX_COMPILATION_CACHE_DIR=str(work / f"cache_{name}"))
    env["PYTHONPATH"] = os.pathsep.join([str(tree), env.get("PYTHONPATH", "")])
    print(f"--- round {round_}: {name} ({tree})", flush=True)
    subprocess.run(_command(tree, out, args), cwd=tree, env=env, check=True)
    return json.loads(out.read_text())["cases"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline", required=True, help="the other source tree")
    ap.add_argument("--shapes", default="16x1024,1x16384")
    ap.add_argument("--models", default="attamba,transformer")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=2, help="ABBA rounds: each runs both trees twice")
    ap.add_argument("--out", default="compare_trees.json")
    args = ap.parse_args()
    trees = {"checkout": ROOT, "baseline": pathlib.Path(args.baseline).resolve()}
    runs: dict[str, list[list[dict]]] = {"checkout": [], "baseline": []}
    with tempfile.TemporaryDirectory() as tmp:
        work = pathlib.Path(tmp)
        order = ["baseline", "checkout", "checkout", "baseline"]
        for r in range(args.rounds):
            for i, name in enumerate(order):
                runs[name].append(run_tree(name, trees[name], work, 2 * r + i // 2, args))
    keys = [(c["model"], c["batch"], c["length"]) for c in runs["checkout"][0]]
    step = lambda cases, key: next(c.get("step_ms") for c in cases if (c["model"], c["batch"], c["length"]) == key)
    rows = []
    print(
        f"\n{'model':<12} {'B':>3} {'L':>6} {'checkout ms':>12} {'baseline ms':>12} {'ratios (per run pair)':>26} {'mean':>6}"
    )
    for key in keys:
        new = [step(c, key) for c in runs["checkout"]]
        old = [step(c, key) for c in runs["baseline"]]
        ratios = [n / o for n, o in zip(new, old)]
        rows.append(
            {
                "model": key[0],
                "batch": key[1],
                "length": key[2],
                "checkout_ms": new,
                "baseline_ms": old,
                "ratios": ratios,
                "mean_ratio": statistics.mean(ratios),
            }
        )
        print(
            f"{key[0]:<12} {key[1]:>3} {key[2]:>6} {statistics.median(new):>12.2f} {statistics.median(old):>12.2f} "
            f"{' '.join(f'{r:.3f}' for r in ratios):>26} {statistics.mean(ratios):>6.3f}"
        )
    result = {"baseline": str(trees["baseline"]), "shapes": args.shapes, "rows": rows, "runs": runs}
    pathlib.Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
