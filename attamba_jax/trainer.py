"""Training: the Trainer builds what one run needs; its loop steps and calls the hooks.

    trainer = Trainer(cfg, "runs/tiny")     # restores runs/tiny's latest checkpoint if there is one
    result = trainer.run()                  # trains to cfg.train.steps

Pieces: ``optimizer`` (AdamW and its schedule), ``train_step`` (the jitted, sharded step
and the mesh), ``hooks`` (logging, evaluation, checkpoints, signals, the non-finite check),
``checkpointing`` (Orbax). The Trainer reads and checks the data first, so that bad data
fails before anything is compiled or written; then it lays out the mesh, places the state,
jits the steps and, when the workdir holds a checkpoint of a compatible config, restores
the state and the data iterator from the latest one, so that a resumed run continues
exactly as if it had not stopped.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time
from collections.abc import Callable
from typing import Literal

import grain
import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from attamba_jax import data as data_lib
from attamba_jax.checkpointing import Checkpointer, CheckpointError, config_differences
from attamba_jax.config import Config, ConfigError, dump_config, upgrade_saved
from attamba_jax.flops import peak_flops_per_device, train_flops_per_token
from attamba_jax.hooks import (
    NonFiniteLossError as NonFiniteLossError,  # raised by the hooks; callers import it from here
)
from attamba_jax.hooks import RunHooks
from attamba_jax.model import count_params
from attamba_jax.optimizer import make_optimizer
from attamba_jax.sharding import DEFAULT_RULES, check_process_rows, logical_to_spec, use_mesh
from attamba_jax.tokenizer import check_fits, load_tokenizer
from attamba_jax.train_step import (
    batch_keys,
    init_train_state,
    jit_train_step,
    make_eval_step,
    mesh_from_config,
    train_batch_sharding,
)
from attamba_jax.workdir_lock import WorkdirLock


@dataclasses.dataclass
class RunResult:
    workdir: pathlib.Path
    step: int
    # finished: reached train.steps; signal: stopped by SIGTERM/SIGINT after saving;
    # already_done: the workdir's checkpoint was already at train.steps.
    status: Literal["finished", "signal", "already_done"]
    signal: int | None = None
    first_eval_loss: float | None = None
    last_eval_loss: float | None = None


class Trainer:
    """Everything one run needs, built once; ``run()`` trains from the latest checkpoint on."""

    def __init__(
        self,
        cfg: Config,
        workdir: str | pathlib.Path,
        *,
        progress: bool = True,
        devices=None,
        resume_step: int | None = None,
    ):
        """``devices``: the mesh's devices (default: every device of every process).
        ``resume_step``: resume from this checkpoint instead of the latest; the checkpoints after
        it move to ``WORKDIR/superseded/`` (kept, out of this run's way)."""
        self.cfg = cfg.validate()
        self.workdir = pathlib.Path(workdir)
        self.progress = progress
        mcfg, dcfg = cfg.model, cfg.data

        # Data first: bad data should fail before anything is compiled or written.
        self.tokenizer = load_tokenizer(dcfg.tokenizer)
        check_fits(self.tokenizer, mcfg.vocab_size)
        self.process_index, self.process_count = jax.process_index(), jax.process_count()
        self.corpus = data_lib.load_corpus(dcfg, self.tokenizer, mcfg.vocab_size, align=cfg.document_align)
        self.batch_keys = batch_keys(cfg)
        shard = dict(process_index=self.process_index, process_count=self.process_count)
        self.train_data = data_lib.train_dataset(
            dcfg, self.corpus.train, seed=cfg.seed, bos_id=self.tokenizer.bos_id, vocab_size=mcfg.vocab_size, **shard
        )
        self.epoch_windows = data_lib.epoch_windows(dcfg, self.corpus.train, **shard)
        self.eval_data = None
        if self.corpus.heldout is not None:
            self.eval_data = data_lib.eval_dataset(
                dcfg,
                self.corpus.heldout,
                bos_id=self.tokenizer.bos_id,
                vocab_size=mcfg.vocab_size,
                max_batches=cfg.train.eval_batches,
                **shard,
            )

        # Devices: the configured (data, fsdp, tensor) mesh; state placed by the logical-axis rules.
        self.mesh = mesh_from_config(cfg.mesh, devices)
        self.devices = list(self.mesh.devices.flat)
        micro = dcfg.batch_size // cfg.optim.grad_accum
        self.replicated = NamedSharding(self.mesh, P())
        # [microbatches, b, T] for training, [b, T] for evaluation: rows split over the data axes.
        self.batch_sharding = train_batch_sharding(self.mesh, micro)
        self.eval_sharding = NamedSharding(
            self.mesh, logical_to_spec(("batch", "length"), (micro, 1), self.mesh, DEFAULT_RULES)
        )
        try:
            check_process_rows(self.eval_sharding, micro)
        except ValueError as e:
            raise ConfigError(str(e)) from None

        # Model, optimizer, steps.
        self.tx, self.schedule = make_optimizer(cfg.optim, cfg.train.steps)
        self.graphdef, self.state, self.state_shardings = init_train_state(cfg, self.mesh, self.tx)
        self.num_params = count_params(self.state["params"])
        tcfg = cfg.train
        self._train_step = jit_train_step(
            self.graphdef,
            self.tx,
            self.schedule,
            self.state_shardings,
            self.batch_sharding,
            remat=tcfg.remat,
            loss_slice=tcfg.loss_slice,
        )
        self._eval_step = jax.jit(
            make_eval_step(self.graphdef, loss_slice=tcfg.loss_slice),
            in_shardings=(self.state_shardings["params"], self.eval_sharding),
            out_shardings=self.replicated,
        )
        self.tokens_per_step = dcfg.batch_size * dcfg.seq_len
        self.flops_per_step = train_flops_per_token(mcfg, self.num_params, dcfg.seq_len) * self.tokens_per_step
        peak = peak_flops_per_device(self.devices[0].device_kind, mcfg.dtype, cfg.train.peak_tflops)
        self.peak_flops = None if peak is None else peak * len(self.devices)

        # One writer per workdir (process 0 holds the lock for all); then checkpoints: resume
        # from the latest one when its config allows it.
        self.lock = WorkdirLock.acquire(self.workdir) if self.process_index == 0 else None
        self.checkpointer = Checkpointer(
            self.workdir / "checkpoints", keep_last=cfg.train.keep_last, keep_every=cfg.train.keep_every
        )
        self.start_step = 0
        self.log_window: list[tuple[int, dict[str, float]]] = []
        self.train_iter = iter(self.train_data)
        try:
            latest = self._restore(resume_step)
        except BaseException:
            self.close()
            raise
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "config.yaml").write_text(dump_config(cfg))
        self.last_saved_step = latest

    def _restore(self, resume_step: int | None) -> int | None:
        """Load checkpoint ``resume_step`` (default: the newest) into ``state`` and the data
        iterator; its step, or None."""
        cfg = self.cfg
        latest = self.checkpointer.latest_step()
        if resume_step is not None:
            steps = self.checkpointer.all_steps()
            if resume_step not in steps:
                raise CheckpointError(
                    f"--resume-step {resume_step}: no checkpoint step {resume_step} in {self.checkpointer.directory} "
                    f"(it has {steps})"
                )
            latest = resume_step
        if latest is not None:
            meta = self.checkpointer.read_meta(latest)
            current = json.loads(json.dumps(cfg.to_dict()))
            diffs = config_differences(upgrade_saved(meta["config"]), current)
            if diffs:
                raise CheckpointError(
                    f"{self.workdir} holds a run (checkpoint step {latest}) with a different config:\n  "
                    + "\n  ".join(diffs)
                    + f"\nUse another --workdir, or the config that run used ({self.workdir / 'config.yaml'})."
                )
            abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), self.state)
            self.state = self.checkpointer.restore(latest, abstract, self.train_iter, meta)
            self.start_step = latest
            # The metrics of the steps after the checkpoint's last log record, for the next one.
            self.log_window = [(int(s), m) for s, m in meta.get("log_window", [])]
            if self.process_index == 0:
                self._supersede_after(latest)
        return latest

    def _supersede_after(self, step: int):
        """Move the checkpoints after ``step`` to ``WORKDIR/superseded/<step>-<time>/``: this run
        writes its own from ``step`` on."""
        later = [s for s in self.checkpointer.all_steps() if s > step]
        if not later:
            return
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        for s in later:
            target = self.workdir / "superseded" / f"{s}-{stamp}"
            target.parent.mkdir(parents=True, exist_ok=True)
            (self.checkpointer.directory / str(s)).rename(target)
        self.checkpointer.reload()
        print(f"resuming from step {step}: moved the later checkpoints {later} to {self.workdir / 'superseded'}")

    def close(self):
        """Finish pending saves, stop the checkpoint manager and the data reader threads, and
        release the workdir."""
        try:
            self.checkpointer.wait()
            self.checkpointer.close()
            self.train_iter.close()
        finally:
            if self.lock is not None:
                self.lock.release()

    # --- helpers ---------------------------------------------------------------------------

    def device_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """This process's host batch ([b, T] arrays) -> the global [microbatches, B/microbatches, T] arrays."""
        a = self.cfg.optim.grad_accum
        return {
            k: jax.make_array_from_process_local_data(self.batch_sharding, batch[k].reshape(a, -1, batch[k].shape[-1]))
            for k in self.batch_keys
        }

    def step(self, device_batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        """One optimizer step on ``device_batch`` (dispatched asynchronously); its metrics, on device."""
        with use_mesh(self.mesh):
            self.state, metrics = self._train_step(self.state, device_batch)
        return metrics

    def evaluate(self) -> float | None:
        """Held-out loss (nats per counted token) of the current parameters."""
        if self.eval_data is None:
            return None
        nll, weight = 0.0, 0.0
        sums = []
        for batch in self.eval_data.to_iter_dataset(grain_read_options(self.cfg)):
            arrays = {k: jax.make_array_from_process_local_data(self.eval_sharding, batch[k]) for k in self.batch_keys}
            with use_mesh(self.mesh):
                sums.append(self._eval_step(self.state["params"], arrays))
        for s, w in jax.device_get(sums):
            nll, weight = nll + float(s), weight + float(w)
        return nll / max(weight, 1.0)

    def save(self, step: int, log_window: list[tuple[int, dict[str, float]]] = ()):
        """Save the state, the data iterator's position and the config as checkpoint ``step``
        (asynchronously), with ``log_window``: the metrics of the steps not yet in a log record,
        which a resumed run averages into its next one."""
        meta = {
            "step": step,
            "config": json.loads(json.dumps(self.cfg.to_dict())),
            "log_window": [[s, m] for s, m in log_window],
        }
        self.checkpointer.save(step, self.state, self.train_iter, meta)
        self.last_saved_step = step

    # --- the loop --------------------------------------------------------------------------

    def run(self, callback: Callable[[int], None] | None = None) -> RunResult:
        """Train from ``start_step`` to ``train.steps``; ``callback(step)`` runs after each step."""
        steps = self.cfg.train.steps
        if self.start_step >= steps:
            self.close()
            return RunResult(self.workdir, self.start_step, "already_done")
        try:
            with RunHooks(self, callback) as hooks:
                step = self.start_step
                while step < steps and hooks.stop_signal is None:
                    metrics = self.step(self.device_batch(next(self.train_iter)))
                    step += 1
                    hooks.after_step(step, metrics)
                hooks.finish(step)
        finally:
            self.close()  # an in-flight save of a good state still completes
        status = "finished" if hooks.stop_signal is None else "signal"
        return RunResult(
            self.workdir, step, status, hooks.stop_signal, hooks.evaluate.first_loss, hooks.evaluate.last_loss
        )


def grain_read_options(cfg: Config) -> grain.ReadOptions:
    return grain.ReadOptions(num_threads=cfg.data.threads, prefetch_buffer_size=cfg.data.prefetch)


def train(
    cfg: Config,
    workdir: str | pathlib.Path,
    *,
    progress: bool = True,
    callback: Callable[[int], None] | None = None,
    resume_step: int | None = None,
) -> RunResult:
    return Trainer(cfg, workdir, progress=progress, resume_step=resume_step).run(callback)
