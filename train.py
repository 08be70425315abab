"""Train a model: ``python train.py`` (the tiny CPU config on the embedded corpus), or

    python train.py --config configs/paper/attamba_k8_w8.yaml --workdir runs/k8 data.train=[.data/x.train.bin] ...

Re-running with the same --workdir resumes from its latest checkpoint.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

DEFAULT_CONFIG = pathlib.Path(__file__).parent / "configs" / "tiny.yaml"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config (default: configs/tiny.yaml)")
    parser.add_argument("--workdir", help="checkpoints, metrics, plots (default: runs/<config name>)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (log lines only)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides, e.g. train.steps=100")
    args = parser.parse_args(argv)

    from attamba_jax.checkpointing import CheckpointError
    from attamba_jax.config import ConfigError, load_config
    from attamba_jax.data import DataError
    from attamba_jax.tokenizer import TokenizerError
    from attamba_jax.trainer import NonFiniteLossError, train

    workdir = pathlib.Path(args.workdir or pathlib.Path("runs") / pathlib.Path(args.config).stem)
    try:
        cfg = load_config(args.config, args.overrides)
        print(f"config {args.config}; workdir {workdir}", flush=True)
        result = train(cfg, workdir, progress=not args.no_progress)
    except (ConfigError, DataError, TokenizerError, CheckpointError, NonFiniteLossError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2 if not isinstance(e, NonFiniteLossError) else 3
    if result.status == "already_done":
        print(f"{workdir} already holds a run at step {result.step} (train.steps={cfg.train.steps}); "
              "raise train.steps to continue it or pass another --workdir")
    if result.status == "signal":
        return 128 + result.signal
    return 0


if __name__ == "__main__":
    sys.exit(main())
