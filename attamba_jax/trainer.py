"""Training: the loop, metrics, signals, resume.

    trainer = Trainer(cfg, "runs/tiny")     # restores runs/tiny's latest checkpoint if there is one
    result = trainer.run()                  # trains to cfg.train.steps

The optimizer is ``optimizer``'s, the jitted, sharded step and the mesh are ``train_step``'s.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import signal
import threading
import time
from collections.abc import Callable
from typing import Literal

import grain
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from attamba_jax import data as data_lib
from attamba_jax.checkpointing import Checkpointer, CheckpointError, config_differences
from attamba_jax.config import Config, ConfigError, dump_config, upgrade_saved
from attamba_jax.flops import peak_flops_per_device, train_flops_per_token
from attamba_jax.metrics import MetricsLog
from attamba_jax.model import count_params
from attamba_jax.optimizer import make_optimizer
from attamba_jax.sharding import DEFAULT_RULES, check_process_rows, logical_to_spec, use_mesh
from attamba_jax.tokenizer import check_fits, load_tokenizer
from attamba_jax.train_step import init_train_state, jit_train_step, make_eval_step, mesh_from_config, train_batch_sharding


class NonFiniteLossError(RuntimeError):
    """The loss or gradient became NaN/inf; the message names the step and the last good checkpoint."""


# --- the loop -------------------------------------------------------------------------------


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

    def __init__(self, cfg: Config, workdir: str | pathlib.Path, *, progress: bool = True, devices=None):
        """``devices``: the mesh's devices (default: every device of every process)."""
        self.cfg = cfg.validate()
        self.workdir = pathlib.Path(workdir)
        self.progress = progress
        mcfg, dcfg = cfg.model, cfg.data

        # Data first: bad data should fail before anything is compiled or written.
        self.tokenizer = load_tokenizer(dcfg.tokenizer)
        check_fits(self.tokenizer, mcfg.vocab_size)
        self.process_index, self.process_count = jax.process_index(), jax.process_count()
        self.corpus = data_lib.load_corpus(dcfg, self.tokenizer, mcfg.vocab_size)
        shard = dict(process_index=self.process_index, process_count=self.process_count)
        self.train_data = data_lib.train_dataset(
            dcfg, self.corpus.train, seed=cfg.seed, bos_id=self.tokenizer.bos_id, vocab_size=mcfg.vocab_size, **shard
        )
        self.epoch_windows = data_lib.epoch_windows(dcfg, self.corpus.train, **shard)
        self.eval_data = None
        if self.corpus.heldout is not None:
            self.eval_data = data_lib.eval_dataset(
                dcfg, self.corpus.heldout, bos_id=self.tokenizer.bos_id, vocab_size=mcfg.vocab_size,
                max_batches=cfg.train.eval_batches, **shard,
            )

        # Devices: the configured (data, fsdp, tensor) mesh; state placed by the logical-axis rules.
        self.mesh = mesh_from_config(cfg.mesh, devices)
        self.devices = list(self.mesh.devices.flat)
        micro = dcfg.batch_size // cfg.optim.grad_accum
        self.replicated = NamedSharding(self.mesh, P())
        # [microbatches, b, T] for training, [b, T] for evaluation: rows split over the data axes.
        self.batch_sharding = train_batch_sharding(self.mesh, micro)
        self.eval_sharding = NamedSharding(self.mesh, logical_to_spec(("batch", "length"), (micro, 1), self.mesh, DEFAULT_RULES))
        try:
            check_process_rows(self.eval_sharding, micro)
        except ValueError as e:
            raise ConfigError(str(e)) from None

        # Model, optimizer, steps.
        self.tx, self.schedule = make_optimizer(cfg.optim, cfg.train.steps)
        self.graphdef, self.state, self.state_shardings = init_train_state(cfg, self.mesh, self.tx)
        self.num_params = count_params(self.state["params"])
        self._train_step = jit_train_step(self.graphdef, self.tx, self.schedule, self.state_shardings, self.batch_sharding)
        self._eval_step = jax.jit(
            make_eval_step(self.graphdef),
            in_shardings=(self.state_shardings["params"], self.eval_sharding),
            out_shardings=self.replicated,
        )
        self.tokens_per_step = dcfg.batch_size * dcfg.seq_len
        self.flops_per_step = train_flops_per_token(mcfg, self.num_params, dcfg.seq_len) * self.tokens_per_step
        peak = peak_flops_per_device(self.devices[0].device_kind, mcfg.dtype, cfg.train.peak_tflops)
        self.peak_flops = None if peak is None else peak * len(self.devices)

        # Checkpoints: resume from the latest one when its config allows it.
        self.checkpointer = Checkpointer(self.workdir / "checkpoints", keep_last=cfg.train.keep_last, keep_every=cfg.train.keep_every)
        self.start_step = 0
        self.train_iter = iter(self.train_data)
        try:
            latest = self._restore_latest()
        except BaseException:
            self.close()
            raise
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "config.yaml").write_text(dump_config(cfg))
        self.last_saved_step = latest
        self._stop_signal: int | None = None

    def _restore_latest(self) -> int | None:
        """Load the newest checkpoint into ``state`` and the data iterator; its step, or None."""
        cfg = self.cfg
        latest = self.checkpointer.latest_step()
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
            self.state = self.checkpointer.restore(latest, abstract, self.train_iter)
            self.start_step = latest
        return latest

    def close(self):
        """Finish pending saves and stop the checkpoint manager and the data reader threads."""
        self.checkpointer.wait()
        self.checkpointer.close()
        self.train_iter.close()

    # --- helpers ---------------------------------------------------------------------------

    def device_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """This process's host batch ([b, T] arrays) -> the global [microbatches, B/microbatches, T] arrays."""
        a = self.cfg.optim.grad_accum
        return {
            k: jax.make_array_from_process_local_data(self.batch_sharding, batch[k].reshape(a, -1, batch[k].shape[-1]))
            for k in ("inputs", "targets", "weights")
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
            arrays = {k: jax.make_array_from_process_local_data(self.eval_sharding, batch[k]) for k in ("inputs", "targets", "weights")}
            with use_mesh(self.mesh):
                sums.append(self._eval_step(self.state["params"], arrays))
        for s, w in jax.device_get(sums):
            nll, weight = nll + float(s), weight + float(w)
        return nll / max(weight, 1.0)

    def _save(self, step: int):
        meta = {"step": step, "config": json.loads(json.dumps(self.cfg.to_dict()))}
        self.checkpointer.save(step, self.state, self.train_iter, meta)
        self.last_saved_step = step

    def _on_signal(self, signum, frame):
        self._stop_signal = signum

    def _check_finite(self, pending: list[tuple[int, dict]]) -> list[tuple[int, dict]]:
        """Fetch the pending step metrics; stop at the first non-finite loss or gradient."""
        fetched = [(step, {k: float(v) for k, v in m.items()}) for step, m in jax.device_get(pending)]
        for step, m in fetched:
            if not (math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"])):
                self.checkpointer.wait()
                good = self.checkpointer.latest_step()
                where = (
                    f"the last good checkpoint is step {good} in {self.checkpointer.directory}; re-running resumes from it"
                    if good is not None
                    else "no checkpoint was saved before it"
                )
                raise NonFiniteLossError(
                    f"non-finite loss at step {step} (loss {m['loss']}, grad norm {m['grad_norm']}); stopped without saving it: "
                    f"{where}. Lower optim.lr or check the data."
                )
        return fetched

    # --- the loop --------------------------------------------------------------------------

    def run(self, callback: Callable[[int], None] | None = None) -> RunResult:
        """Train from ``start_step`` to ``train.steps``; ``callback(step)`` runs after each step."""
        cfg, tcfg = self.cfg, self.cfg.train
        result = RunResult(self.workdir, self.start_step, "finished")
        if self.start_step >= tcfg.steps:
            result.status = "already_done"
            self.close()
            return result
        log = MetricsLog(self.workdir, resume_step=self.start_step if self.last_saved_step is not None else None)
        say = tqdm.write if self.progress else print
        say(
            f"workdir {self.workdir.absolute()}\n"
            f"model {cfg.model.arch}: {self.num_params:,} parameters, {self.flops_per_step / self.tokens_per_step / 1e6:.1f} MFLOP "
            f"per trained token; data: {len(self.corpus.train):,} training tokens"
            + (f", {len(self.corpus.heldout):,} held-out" if self.corpus.heldout is not None else ", no held-out set")
            + f"; {len(self.devices)} x {self.devices[0].device_kind}"
        )
        if self.start_step:
            say(f"resumed from checkpoint step {self.start_step}")

        handlers = {}
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                handlers[signum] = signal.signal(signum, self._on_signal)
        bar = tqdm(total=tcfg.steps, initial=self.start_step, unit="step", dynamic_ncols=True, disable=not self.progress, mininterval=1.0)
        try:
            if self.start_step == 0 and self.eval_data is not None:
                result.first_eval_loss = self.evaluate()
                log.write("eval", 0, {"loss": result.first_eval_loss})
                say(f"step 0: held-out loss {result.first_eval_loss:.4f}")
            pending: list[tuple[int, dict]] = []
            timer_start, timed_steps, paused = None, 0, 0.0
            step = self.start_step
            while step < tcfg.steps:
                batch = next(self.train_iter)
                metrics = self.step(self.device_batch(batch))
                step += 1
                pending.append((step, metrics))
                bar.update(1)
                if callback is not None:
                    callback(step)
                if timer_start is None:  # the first step compiles: time from its end
                    jax.block_until_ready(metrics)
                    timer_start, timed_steps, paused = time.perf_counter(), 0, 0.0
                else:
                    timed_steps += 1
                stopping = self._stop_signal is not None
                last = step == tcfg.steps
                if step % tcfg.log_every == 0 or last or stopping:
                    fetched = self._check_finite(pending)
                    pending = []
                    elapsed = time.perf_counter() - timer_start - paused
                    tps = timed_steps * self.tokens_per_step / elapsed if timed_steps and elapsed > 0 else None
                    mfu = None if tps is None or self.peak_flops is None else tps / self.tokens_per_step * self.flops_per_step / self.peak_flops
                    values = {
                        "loss": float(np.mean([m["loss"] for _, m in fetched])),
                        "grad_norm": float(np.mean([m["grad_norm"] for _, m in fetched])),
                        "lr": fetched[-1][1]["lr"],
                        "tokens_per_s": tps,
                        "mfu": mfu,
                        "epoch": step * (cfg.data.batch_size // self.process_count) / self.epoch_windows,
                    }
                    log.write("train", step, values)
                    bar.set_postfix(loss=f"{values['loss']:.3f}", tok_s="-" if tps is None else f"{tps:,.0f}", refresh=False)
                    timer_start, timed_steps, paused = time.perf_counter(), 0, 0.0
                t_pause = time.perf_counter()
                if self.eval_data is not None and (step % tcfg.eval_every == 0 or last):
                    result.last_eval_loss = self.evaluate()
                    log.write("eval", step, {"loss": result.last_eval_loss})
                    log.plot()
                    say(f"step {step}: held-out loss {result.last_eval_loss:.4f}")
                if step % tcfg.checkpoint_every == 0 or last or stopping:
                    if pending:
                        self._check_finite(pending)  # never save a state that followed a NaN
                    self._save(step)
                paused += time.perf_counter() - t_pause
                if stopping:
                    result.status, result.signal = "signal", self._stop_signal
                    break
            result.step = step
            self.checkpointer.wait()
            log.plot()
            if result.status == "signal":
                say(f"stopped by signal {result.signal} at step {step}; checkpoint saved, re-run to resume")
            else:
                say(f"done: step {step}, checkpoints in {self.checkpointer.directory}, metrics in {log.jsonl_path}, plot {log.plot_path}")
            return result
        finally:
            bar.close()
            for signum, handler in handlers.items():
                signal.signal(signum, handler)
            self.close()  # an in-flight save of a good state still completes
            log.close()


def grain_read_options(cfg: Config) -> grain.ReadOptions:
    return grain.ReadOptions(num_threads=cfg.data.threads, prefetch_buffer_size=cfg.data.prefetch)


def train(cfg: Config, workdir: str | pathlib.Path, *, progress: bool = True, callback: Callable[[int], None] | None = None) -> RunResult:
    return Trainer(cfg, workdir, progress=progress).run(callback)
