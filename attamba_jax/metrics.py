"""Where a run's numbers go: ``metrics.jsonl``, TensorBoard event files and ``loss.png``.

One JSON object per line, ``{"kind": "train" | "eval", "step": ..., ...}``. A resumed run
first drops the records of steps after the checkpoint it resumes from (a killed run may
have logged steps it never saved), so the file always describes one consistent history.
"""

from __future__ import annotations

import json
import math
import pathlib

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
from tensorboardX import SummaryWriter  # noqa: E402


class MetricsLog:
    """``writer``: whether this process writes the files (process 0 of a multi-process run); the
    others keep the records in memory only."""

    def __init__(self, workdir: str | pathlib.Path, resume_step: int | None, *, writer: bool = True):
        workdir = pathlib.Path(workdir)
        self.jsonl_path = workdir / "metrics.jsonl"
        self.plot_path = workdir / "loss.png"
        self.records: list[dict] = []
        self.writer = writer
        if not writer:
            return
        if resume_step is not None and self.jsonl_path.exists():
            for line in self.jsonl_path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by a kill
                if record.get("step", math.inf) <= resume_step:
                    self.records.append(record)
        self.jsonl_path.write_text("".join(json.dumps(r) + "\n" for r in self.records))
        self._file = open(self.jsonl_path, "a")
        purge = None if resume_step is None else resume_step + 1
        self.tensorboard = SummaryWriter(str(workdir / "tensorboard"), purge_step=purge)

    def write(self, kind: str, step: int, values: dict[str, float | None]):
        record = {"kind": kind, "step": step, **values}
        self.records.append(record)
        if not self.writer:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        for name, value in values.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                self.tensorboard.add_scalar(f"{kind}/{name}", value, step)
        self.tensorboard.flush()

    def plot(self):
        """Training and held-out loss against step, into ``loss.png``."""
        if not self.writer:
            return
        train = [(r["step"], r["loss"]) for r in self.records if r["kind"] == "train" and math.isfinite(r["loss"])]
        heldout = [(r["step"], r["loss"]) for r in self.records if r["kind"] == "eval"]
        fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
        if train:
            ax.plot(*zip(*train), lw=1.2, label="train")
        if heldout:
            ax.plot(*zip(*heldout), "o-", ms=4, lw=1.2, label="held-out")
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats / token)")
        ax.grid(alpha=0.3)
        if train or heldout:
            ax.legend()
        fig.tight_layout()
        fig.savefig(self.plot_path)
        plt.close(fig)

    def close(self):
        if not self.writer:
            return
        self._file.close()
        self.tensorboard.close()
