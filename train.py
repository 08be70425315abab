"""Train a model: ``python train.py`` (the tiny CPU config on the embedded corpus), or

    python train.py --config configs/paper/attamba_k8_w8.yaml --workdir runs/k8 data.train=[.data/x.train.bin] ...

Re-running with the same --workdir resumes from its latest checkpoint.

Several hosts: run the same command on every host with --distributed (or with
JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID set); see the README's
"Multi-host" section.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys

DEFAULT_CONFIG = pathlib.Path(__file__).parent / "configs" / "tiny.yaml"
DISTRIBUTED_ENV = {
    "coordinator_address": "JAX_COORDINATOR_ADDRESS",
    "num_processes": "JAX_NUM_PROCESSES",
    "process_id": "JAX_PROCESS_ID",
}


def distributed_args(flag: bool, environ) -> dict | None:
    """Arguments for ``jax.distributed.initialize``, or None for a single-process run.

    Explicit JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID win; ``--distributed``
    alone leaves them to jax's cluster auto-detection (SLURM, Open MPI, Cloud TPU, ...).
    """
    given = {key: environ[var] for key, var in DISTRIBUTED_ENV.items() if environ.get(var)}
    if not given and not flag:
        return None
    if given and "coordinator_address" not in given:
        raise ValueError(
            f"{', '.join(DISTRIBUTED_ENV[k] for k in given)} set without JAX_COORDINATOR_ADDRESS (host:port of process 0)"
        )
    for key in ("num_processes", "process_id"):
        if key in given:
            try:
                given[key] = int(given[key])
            except ValueError:
                raise ValueError(f"{DISTRIBUTED_ENV[key]} must be an integer, got {given[key]!r}") from None
    return given


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config (default: configs/tiny.yaml)")
    parser.add_argument("--workdir", help="checkpoints, metrics, plots (default: runs/<config name>)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (log lines only)")
    parser.add_argument(
        "--resume-step",
        type=int,
        metavar="N",
        help="resume from checkpoint N instead of the latest (later checkpoints move to WORKDIR/superseded/)",
    )
    parser.add_argument(
        "--distributed",
        action="store_true",
        help="one process per host: join the others through jax.distributed (implied by JAX_COORDINATOR_ADDRESS)",
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="section.key=value", help="config overrides, e.g. train.steps=100"
    )
    args = parser.parse_args(argv)
    try:
        distributed = distributed_args(args.distributed, os.environ)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if distributed is not None:
        import jax

        jax.distributed.initialize(**distributed)  # before anything touches a device

    from attamba_jax.checkpointing import CheckpointError
    from attamba_jax.config import ConfigError, load_config
    from attamba_jax.data import DataError
    from attamba_jax.tokenizer import TokenizerError
    from attamba_jax.trainer import NonFiniteLossError, train
    from attamba_jax.workdir_lock import WorkdirLockError

    workdir = pathlib.Path(args.workdir or pathlib.Path("runs") / pathlib.Path(args.config).stem)
    try:
        cfg = load_config(args.config, args.overrides)
        print(f"config {args.config}; workdir {workdir}", flush=True)
        result = train(cfg, workdir, progress=not args.no_progress, resume_step=args.resume_step)
    except (ConfigError, DataError, TokenizerError, CheckpointError, NonFiniteLossError, WorkdirLockError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2 if not isinstance(e, NonFiniteLossError) else 3
    if result.status == "already_done":
        print(
            f"{workdir} already holds a run at step {result.step} (train.steps={cfg.train.steps}); "
            "raise train.steps to continue it or pass another --workdir"
        )
    if result.status == "signal":
        return 128 + result.signal
    return 0


if __name__ == "__main__":
    sys.exit(main())
