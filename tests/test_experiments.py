"""experiments/summarize.py: the replication table and loss curves from returned archives."""

import json
import pathlib
import subprocess
import sys

from attamba_jax.config import dump_config, load_config

REPO = pathlib.Path(__file__).resolve().parent.parent


def _fake_results(root: pathlib.Path, ppl: dict[str, float]):
    """One workdir per model as replication.sh packs it: metrics, config, wall time, evaluations."""
    for name, p in ppl.items():
        (root / name).mkdir(parents=True)
        # as the trainer writes it: flat (a shipped config names its base, relative to configs/paper/)
        (root / name / "config.yaml").write_text(dump_config(load_config(REPO / "configs" / "paper" / f"{name}.yaml")))
        rows = [{"kind": "train", "step": s, "loss": 5.0 - s / 100} for s in (10, 20)] + [
            {"kind": "eval", "step": 20, "loss": 4.9}
        ]
        (root / name / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
        (root / f"{name}.wall.json").write_text(json.dumps({"model": name, "exit": 0, "wall_s": 12}))
        for split in ("heldout", "wiki"):
            total = {"token_perplexity": p, "word_perplexity": 2 * p, "bits_per_byte": 1.25}
            (root / f"{name}.eval.{split}.json").write_text(json.dumps({"results": {"total": total}}))


def test_summarize_prints_one_table_per_group_and_draws_the_curves(tmp_path):
    _fake_results(tmp_path / "a", {"attamba_k8_w8": 39.5, "transformer_isokv8": 41.8})
    _fake_results(tmp_path / "b", {"transformer_isoparam": 44.2})
    png = tmp_path / "loss.png"
    out = subprocess.run(
        [
            sys.executable,
            "experiments/summarize.py",
            f"{tmp_path / 'a'}=lr 3e-3",
            f"{tmp_path / 'b'}=lr 1e-3",
            "--png",
            str(png),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "**lr 3e-3**" in out and "**lr 1e-3**" in out
    rows = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| model")]
    assert [r.split(" | ")[0] for r in rows] == ["| attamba_k8_w8", "| transformer_isokv8", "| transformer_isoparam"]
    attamba = rows[0].split(" | ")
    assert attamba[1] == "62,751,488" and attamba[3] == "0.3M" and attamba[5] == "39.50" and attamba[6] == "79.00"
    assert png.stat().st_size > 10_000
