"""What the training loop does besides stepping: hooks, each run every N steps.

    hooks = Hooks(trainer)
    hooks.add(LogMetrics(...), every=cfg.train.log_every)
    hooks.add(Evaluate(...), every=cfg.train.eval_every, on_stop=False)
    ...
    hooks.run(step, metrics, stopping=False)    # after each step

A hook added with ``every=N`` is called after each step that is a multiple of N, after the
last step of the run (``train.steps``) and, unless added with ``on_stop=False``, after the
step at which a stop signal ends the run. Hooks run in the order they were added, with a
``StepInfo``: the step, the trainer, and the metrics of the steps since their previous call.
``RunHooks`` is the trainer's set of them, with what comes before the first step and after
the last.

Invariants:
  * Step metrics stay on the device until a hook asks for them, so the host waits for the
    device only at the steps that log or save, and dispatches the next step meanwhile.
  * Every fetch of step metrics checks them: a NaN/inf loss or gradient norm, or a step whose
    updated parameters or optimizer state hold a NaN/inf (``state_finite``, computed inside the
    jitted step), raises ``NonFiniteLossError`` before any hook logs it or saves that state.
  * tokens/s and MFU count the time spent stepping only: not the first step of a run (it
    compiles), not evaluation, not saving.
  * SIGTERM/SIGINT do not interrupt a step: the step in flight is logged and saved, then the
    run ends with status "signal" (``train.py`` exits with 128 + the signal).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import jax
import numpy as np
from tqdm.auto import tqdm

from attamba_jax.checkpointing import Checkpointer
from attamba_jax.metrics import MetricsLog

if TYPE_CHECKING:
    from attamba_jax.trainer import Trainer

# One step's metrics on the host: {"loss", "grad_norm", "lr", "state_finite"}.
Metrics = dict[str, float]


class NonFiniteLossError(RuntimeError):
    """The loss or gradient became NaN/inf; the message names the step and the last good checkpoint."""


def check_finite(fetched: list[tuple[int, Metrics]], checkpointer: Checkpointer):
    """Raise NonFiniteLossError at the first step whose loss, gradient norm or updated state
    (parameters and optimizer state) is not finite."""
    for step, m in fetched:
        loss_ok = math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"])
        if not loss_ok or m["state_finite"] != 1.0:
            checkpointer.wait()
            good = checkpointer.latest_step()
            where = (
                f"the last good checkpoint is step {good} in {checkpointer.directory}; re-running resumes from it"
                if good is not None
                else "no checkpoint was saved before it"
            )
            what = "loss" if not loss_ok else "parameters or optimizer state after the update"
            raise NonFiniteLossError(
                f"non-finite {what} at step {step} (loss {m['loss']}, grad norm {m['grad_norm']}); "
                f"stopped without saving it: {where}. Lower optim.lr or check the data."
            )


# --- scheduling ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StepInfo:
    """What a hook is called with, after ``step`` optimizer steps."""

    step: int
    trainer: Trainer
    _metrics: Callable[[], list[tuple[int, Metrics]]] = dataclasses.field(repr=False)

    def metrics(self) -> list[tuple[int, Metrics]]:
        """(step, metrics) of each step since this hook's previous call (or the run's start), checked finite."""
        return self._metrics()


@dataclasses.dataclass
class _Entry:
    hook: Callable[[StepInfo], None]
    every: int
    on_stop: bool
    last_call: int  # the step of the hook's previous call; the run's start step before the first


class Hooks:
    """Hooks and when they run; the per-step metrics that their calls have not yet covered."""

    def __init__(self, trainer: Trainer):
        self.trainer = trainer
        self._entries: list[_Entry] = []
        self._on_device: list[tuple[int, dict[str, jax.Array]]] = []
        self._fetched: list[tuple[int, Metrics]] = []

    def add(self, hook: Callable[[StepInfo], None], *, every: int, on_stop: bool = True):
        self._entries.append(_Entry(hook, every, on_stop, self.trainer.start_step))

    def run(self, step: int, metrics: dict[str, jax.Array], *, stopping: bool):
        """Call the hooks due after ``step``, whose metrics (on device, not waited for) are ``metrics``."""
        self._on_device.append((step, metrics))
        last = step == self.trainer.cfg.train.steps
        for entry in self._entries:
            if step % entry.every == 0 or last or (stopping and entry.on_stop):
                entry.hook(StepInfo(step, self.trainer, functools.partial(self.metrics_after, entry.last_call)))
                entry.last_call = step
        # Steps that every hook has been called since can no longer be asked for.
        oldest = min((entry.last_call for entry in self._entries), default=step)
        self._on_device = [(s, m) for s, m in self._on_device if s > oldest]
        self._fetched = [(s, m) for s, m in self._fetched if s > oldest]

    def metrics_after(self, step: int) -> list[tuple[int, Metrics]]:
        """(step, metrics) of the steps after ``step`` that some hook has not yet been called
        since, checked finite."""
        if self._on_device:
            fetched = [(s, {k: float(v) for k, v in m.items()}) for s, m in jax.device_get(self._on_device)]
            self._on_device = []
            check_finite(fetched, self.trainer.checkpointer)
            self._fetched += fetched
        return [(s, m) for s, m in self._fetched if s > step]


# --- the hooks -----------------------------------------------------------------------------


class StepClock:
    """Time spent stepping since the last lap: from the end of the run's first step on (that one
    compiles), less the time hooks spend in ``pause()`` (evaluation, saving). Called every step."""

    def __init__(self):
        self.start: float | None = None
        self.steps = 0
        self.paused = 0.0

    def __call__(self, info: StepInfo):
        if self.start is None:
            jax.block_until_ready(info.trainer.state["step"])  # an output of the first step: it has run
            self.restart()
        else:
            self.steps += 1

    def lap(self) -> tuple[int, float]:
        """(steps, seconds) since the last restart, the first step not counted."""
        return self.steps, time.perf_counter() - self.start - self.paused

    def restart(self):
        self.start, self.steps, self.paused = time.perf_counter(), 0, 0.0

    @contextlib.contextmanager
    def pause(self) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.paused += time.perf_counter() - started


class ProgressBar:
    """The tqdm bar of steps (disabled without ``progress``), updated every step."""

    def __init__(self, trainer: Trainer):
        self.bar = tqdm(
            total=trainer.cfg.train.steps,
            initial=trainer.start_step,
            unit="step",
            dynamic_ncols=True,
            disable=not trainer.progress,
            mininterval=1.0,
        )

    def __call__(self, info: StepInfo):
        self.bar.update(1)

    def show(self, loss: float, tokens_per_s: float | None):
        tok_s = "-" if tokens_per_s is None else f"{tokens_per_s:,.0f}"
        self.bar.set_postfix(loss=f"{loss:.3f}", tok_s=tok_s, refresh=False)

    def close(self):
        self.bar.close()


class LogMetrics:
    """One "train" record per call into metrics.jsonl and TensorBoard: the mean loss and gradient
    norm of the steps since the previous record, the last step's lr, tokens/s, MFU and epoch;
    the loss and tokens/s beside the progress bar."""

    def __init__(self, trainer: Trainer, log: MetricsLog, clock: StepClock, bar: ProgressBar):
        self.log, self.clock, self.bar = log, clock, bar
        # A resumed run's first record also averages the steps before its checkpoint that no
        # record covered: a stop does not change the records.
        self.carried = list(trainer.log_window)
        self.last_step = trainer.start_step  # the step of the last record

    def __call__(self, info: StepInfo):
        t = info.trainer
        fetched = self.carried + info.metrics()
        self.carried = []
        self.last_step = info.step
        steps, seconds = self.clock.lap()  # after the fetch: the wait for the device is stepping time
        tps = steps * t.tokens_per_step / seconds if steps and seconds > 0 else None
        mfu = None if tps is None or t.peak_flops is None else tps / t.tokens_per_step * t.flops_per_step / t.peak_flops
        values = {
            "loss": float(np.mean([m["loss"] for _, m in fetched])),
            "grad_norm": float(np.mean([m["grad_norm"] for _, m in fetched])),
            "lr": fetched[-1][1]["lr"],
            "tokens_per_s": tps,
            "mfu": mfu,
            "epoch": info.step * (t.cfg.data.batch_size // t.process_count) / t.epoch_windows,
        }
        self.log.write("train", info.step, values)
        self.bar.show(values["loss"], tps)
        self.clock.restart()


class Evaluate:
    """Held-out loss as an "eval" record, a fresh loss.png and a printed line; ``first_loss`` is
    the one before the first step of a fresh run, ``last_loss`` the latest."""

    def __init__(self, trainer: Trainer, log: MetricsLog, clock: StepClock, say: Callable[[str], None]):
        self.trainer, self.log, self.clock, self.say = trainer, log, clock, say
        self.first_loss: float | None = None
        self.last_loss: float | None = None

    def before_first_step(self):
        self.first_loss = self.trainer.evaluate()
        self.log.write("eval", 0, {"loss": self.first_loss})
        self.say(f"step 0: held-out loss {self.first_loss:.4f}")

    def __call__(self, info: StepInfo):
        with self.clock.pause():
            self.last_loss = self.trainer.evaluate()
            self.log.write("eval", info.step, {"loss": self.last_loss})
            self.log.plot()
            self.say(f"step {info.step}: held-out loss {self.last_loss:.4f}")


class SaveCheckpoint:
    """Save the state, the data position and the config (asynchronously), once the metrics of
    every step since the previous save are known to be finite; with them the metrics of the
    steps since the last log record (``LogMetrics`` runs before, so at a log step there are none)."""

    def __init__(self, clock: StepClock, hooks: Hooks, log: LogMetrics):
        self.clock, self.hooks, self.log = clock, hooks, log

    def __call__(self, info: StepInfo):
        with self.clock.pause():
            info.metrics()  # raises NonFiniteLossError rather than save a state that followed a NaN
            window = self.log.carried + self.hooks.metrics_after(self.log.last_step)
            info.trainer.save(info.step, window)


class StopSignals:
    """SIGTERM/SIGINT during a run: remembered in ``caught`` rather than raised, so that the loop
    ends after saving the step in flight. Python lets only the main thread install handlers; the
    previous ones are back on exit."""

    def __enter__(self) -> StopSignals:
        self.caught: int | None = None
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._catch)
        return self

    def _catch(self, signum, frame):
        self.caught = signum

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


# --- the trainer's set -----------------------------------------------------------------------


def _silent(*_):
    """``say`` on every process but the first."""


class RunHooks:
    """The trainer's hooks for one run, in the order they run after a step:

        progress bar      every step
        callback(step)    every step, when given
        step clock        every step (waits for the first: it compiles)
        LogMetrics        every train.log_every steps and after the last
        Evaluate          every train.eval_every steps and after the last, when there is a held-out set
        SaveCheckpoint    every train.checkpoint_every steps, after the last and at a stop signal

    Entering opens metrics.jsonl (resumed: cut after the checkpoint's step), prints the run's
    header, catches stop signals and, on a fresh run, evaluates the initial parameters;
    ``finish`` waits for the saves, plots and prints the last line; exiting closes the bar,
    gives the signals back and closes the log.
    """

    def __init__(self, trainer: Trainer, callback: Callable[[int], None] | None = None):
        self.trainer, self.callback = trainer, callback
        self.stop_signal: int | None = None  # the signal that ends the run, as read after its last step

    def __enter__(self) -> RunHooks:
        t, tcfg = self.trainer, self.trainer.cfg.train
        with contextlib.ExitStack() as stack:
            main = t.process_index == 0  # of several processes, the first writes the log and prints
            log = MetricsLog(t.workdir, resume_step=t.last_saved_step, writer=main)
            self.log = stack.enter_context(contextlib.closing(log))
            self.say = (tqdm.write if t.progress else print) if main else _silent  # tqdm.write: the bar stays below
            self.say(
                f"workdir {t.workdir.absolute()}\n"
                f"model {t.cfg.model.arch}: {t.num_params:,} parameters, "
                f"{t.flops_per_step / t.tokens_per_step / 1e6:.1f} MFLOP per trained token; "
                f"data: {len(t.corpus.train):,} training tokens"
                + (f", {len(t.corpus.heldout):,} held-out" if t.corpus.heldout is not None else ", no held-out set")
                + f"; {len(t.devices)} x {t.devices[0].device_kind}"
            )
            if t.start_step:
                self.say(f"resumed from checkpoint step {t.start_step}")
            self.signals = stack.enter_context(StopSignals())
            bar = stack.enter_context(contextlib.closing(ProgressBar(t)))
            clock = StepClock()
            self.evaluate = Evaluate(t, self.log, clock, self.say)

            self.hooks = Hooks(t)
            self.hooks.add(bar, every=1)
            if self.callback is not None:
                self.hooks.add(lambda info: self.callback(info.step), every=1)
            self.hooks.add(clock, every=1)
            # Not at a stop signal either: the records of a stopped and resumed run are those of a
            # run that did not stop (the unlogged steps travel in the checkpoint).
            log_metrics = LogMetrics(t, self.log, clock, bar)
            self.hooks.add(log_metrics, every=tcfg.log_every, on_stop=False)
            if t.eval_data is not None:
                # Not at a stop signal: it asks the run to end soon (a preemption's grace period is short).
                self.hooks.add(self.evaluate, every=tcfg.eval_every, on_stop=False)
            self.hooks.add(SaveCheckpoint(clock, self.hooks, log_metrics), every=tcfg.checkpoint_every)

            if t.start_step == 0 and t.eval_data is not None:
                self.evaluate.before_first_step()
            self._close = stack.pop_all()
        return self

    def after_step(self, step: int, metrics: dict[str, jax.Array]):
        # One reading per step: a signal that comes while the hooks run stops the run at the next step.
        self.stop_signal = self.signals.caught
        self.hooks.run(step, metrics, stopping=self.stop_signal is not None)

    def finish(self, step: int):
        t = self.trainer
        t.checkpointer.wait()
        self.log.plot()
        if self.stop_signal is not None:
            self.say(f"stopped by signal {self.stop_signal} at step {step}; checkpoint saved, re-run to resume")
        else:
            self.say(
                f"done: step {step}, checkpoints in {t.checkpointer.directory}, metrics in {self.log.jsonl_path}, "
                f"plot {self.log.plot_path}"
            )

    def __exit__(self, *exc):
        self._close.close()
