"""Training: optax AdamW, one jitted step with donated state, the loop, metrics, signals, resume.

    trainer = Trainer(cfg, "runs/tiny")     # restores runs/tiny's latest checkpoint if there is one
    result = trainer.run()                  # trains to cfg.train.steps

The model is split once into its graph and its parameters; the train step is a pure,
jitted function of ``state = {"params", "opt_state", "step"}`` (donated, so the update
happens in place) and of a batch. Parameters and optimizer moments stay float32;
``model.dtype`` sets the compute dtype. Devices form the (data, fsdp, tensor) mesh of the
``mesh`` config section: the batch is split over data x fsdp, parameters and optimizer moments
are placed by the logical-axis rules of ``sharding`` (split over fsdp and tensor where the
sizes divide), and the step is one ``jax.jit`` with those in/out shardings, so gradient
all-reduces, reduce-scatters and parameter all-gathers are XLA's.

A step's loss is (sum of token NLL) / (number of counted tokens) over the whole global
batch, however it is cut into microbatches (``optim.grad_accum``), so accumulation changes
memory, not the result.
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
from typing import Any, Literal

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from attamba_jax import data as data_lib
from attamba_jax.checkpointing import Checkpointer, CheckpointError, config_differences
from attamba_jax.config import Config, ConfigError, MeshConfig, OptimConfig, dump_config, upgrade_saved
from attamba_jax.flops import peak_flops_per_device, train_flops_per_token
from attamba_jax.metrics import MetricsLog
from attamba_jax.model import apply_model, count_params, cross_entropy, init_model
from attamba_jax.sharding import DEFAULT_RULES, check_process_rows, logical_to_spec, make_mesh, tree_shardings, use_mesh
from attamba_jax.tokenizer import check_fits, load_tokenizer


class NonFiniteLossError(RuntimeError):
    """The loss or gradient became NaN/inf; the message names the step and the last good checkpoint."""


# --- optimizer ------------------------------------------------------------------------------

# Parameters that weight decay must not pull towards zero: the SSM's decay rates, skip
# gains and time-step biases, any bias, and every norm's gain.
_NO_DECAY_NAMES = frozenset({"A_log", "D", "dt_bias", "bias"})


def _path_names(path) -> list[str]:
    return [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]


def decay_mask(params) -> Any:
    """A pytree of bools like ``params``: True where weight decay applies."""

    def decays(path, _):
        names = _path_names(path)
        names = [n for n in names if n != "value"]  # nnx.Param's own field
        return not (names[-1] in _NO_DECAY_NAMES or any(n.endswith("norm") for n in names[:-1]))

    return jax.tree_util.tree_map_with_path(decays, params)


def make_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup 0 -> lr over warmup_steps, then cosine to lr * min_lr_ratio at total_steps."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.lr,
        warmup_steps=cfg.warmup_steps,
        decay_steps=total_steps,
        end_value=cfg.lr * cfg.min_lr_ratio,
    )


def make_optimizer(cfg: OptimConfig, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    schedule = make_schedule(cfg, total_steps)
    parts = [] if cfg.grad_clip is None else [optax.clip_by_global_norm(cfg.grad_clip)]
    parts.append(
        optax.adamw(schedule, b1=cfg.beta1, b2=cfg.beta2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=decay_mask)
    )
    return optax.chain(*parts), schedule


# --- the step functions ---------------------------------------------------------------------


def _nll_sum(graphdef, params, batch) -> tuple[jax.Array, jax.Array]:
    """(sum of weighted token NLL, sum of weights) of one [b, T] batch, in float32."""
    logits = apply_model(graphdef, params, batch["inputs"])
    mean, total = cross_entropy(logits, batch["targets"], batch["weights"])
    return mean * jnp.maximum(total, 1.0), total


def make_train_step(graphdef, tx: optax.GradientTransformation, schedule: optax.Schedule, param_shardings=None):
    """``(state, batch) -> (state, metrics)``; batch arrays are [microbatches, b, T].

    ``param_shardings``: keep the accumulated gradients sharded like the parameters (under
    fsdp XLA then reduce-scatters them instead of all-reducing full copies).
    """

    def shard_like_params(tree):
        return tree if param_shardings is None else jax.lax.with_sharding_constraint(tree, param_shardings)

    def step_fn(state, batch):
        params = state["params"]
        grad_fn = jax.value_and_grad(lambda p, mb: _nll_sum(graphdef, p, mb), has_aux=True)

        def micro(carry, mb):
            grads, nll, weight = carry
            (mb_nll, mb_weight), mb_grads = grad_fn(params, mb)
            return (shard_like_params(jax.tree.map(jnp.add, grads, mb_grads)), nll + mb_nll, weight + mb_weight), None

        zeros = shard_like_params(jax.tree.map(jnp.zeros_like, params))
        (grads, nll, weight), _ = jax.lax.scan(micro, (zeros, jnp.float32(0), jnp.float32(0)), batch)
        denom = jnp.maximum(weight, 1.0)
        grads = jax.tree.map(lambda g: g / denom, grads)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_state = {"params": optax.apply_updates(params, updates), "opt_state": opt_state, "step": state["step"] + 1}
        metrics = {"loss": nll / denom, "grad_norm": optax.tree.norm(grads), "lr": schedule(state["step"])}
        return new_state, metrics

    return step_fn


def mesh_from_config(cfg: MeshConfig, devices=None) -> jax.sharding.Mesh:
    """The (data, fsdp, tensor) mesh of ``cfg`` over ``devices`` (default: every device of every process)."""
    devices = list(jax.devices() if devices is None else devices)
    try:
        return make_mesh(cfg.shape(), devices)
    except ValueError as e:
        raise ConfigError(f"mesh config {cfg.shape()} does not fit the {len(devices)} devices: {e}") from None


def init_train_state(cfg: Config, mesh: jax.sharding.Mesh, tx: optax.GradientTransformation):
    """(graphdef, state, shardings): the initial train state placed on ``mesh`` by the logical rules.

    ``state = {"params", "opt_state", "step"}``; ``shardings`` has the same structure. Optimizer
    moments are placed like their parameters (they carry the same ``logical_axes``); step
    counts are replicated.
    """
    graphdef, params = init_model(cfg.model, seed=cfg.seed)
    replicated = NamedSharding(mesh, P())
    with use_mesh(mesh):
        param_shardings = tree_shardings(params, mesh)
        params = jax.device_put(params, param_shardings)
        opt_shardings = tree_shardings(jax.eval_shape(tx.init, params), mesh)
        opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
    state = {"params": params, "opt_state": opt_state, "step": jax.device_put(jnp.int32(0), replicated)}
    return graphdef, state, {"params": param_shardings, "opt_state": opt_shardings, "step": replicated}


def jit_train_step(graphdef, tx, schedule, shardings, batch_sharding: NamedSharding):
    """The train step jitted with the state's and the batch's shardings in and out, state donated.

    Call it inside ``use_mesh(mesh)`` so that the model's activation constraints apply.
    """
    replicated = NamedSharding(batch_sharding.mesh, P())
    return jax.jit(
        make_train_step(graphdef, tx, schedule, param_shardings=shardings["params"]),
        in_shardings=(shardings, batch_sharding),
        out_shardings=(shardings, replicated),
        donate_argnums=0,
    )


def train_batch_sharding(mesh: jax.sharding.Mesh, microbatch: int) -> NamedSharding:
    """[microbatches, b, T] batches: rows split over data x fsdp, which must divide ``microbatch``."""
    n = mesh.shape["data"] * mesh.shape["fsdp"]
    if microbatch % n:
        raise ConfigError(
            f"data.batch_size / optim.grad_accum = {microbatch} sequences per microbatch must be a multiple of "
            f"mesh.data x mesh.fsdp = {mesh.shape['data']} x {mesh.shape['fsdp']} = {n}"
        )
    return NamedSharding(mesh, logical_to_spec((None, "batch", "length"), (1, microbatch, 1), mesh, DEFAULT_RULES))


def make_eval_step(graphdef):
    def eval_fn(params, batch):
        return _nll_sum(graphdef, params, batch)

    return eval_fn


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
