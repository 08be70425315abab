"""Checkpoints: one Orbax ``CheckpointManager`` step = train state + data iterator + config.

    <workdir>/checkpoints/<step>/
      state/   params, optimizer state and step (Orbax StandardSave, float32)
      data/    the grain iterator's position, one file per process (grain's handler)
      meta/    {"step": ..., "config": {...}} (JsonSave)

Saving is asynchronous: ``save`` returns once the arrays are copied off the device and
the iterator position is taken, and the files are written in the background; a step's
folder appears only when it is complete, so a killed save leaves the previous steps as
they were. Retention keeps the newest ``keep_last`` steps plus every step that is a
multiple of ``keep_every``.

A checkpoint written with a different model or data config cannot continue this run;
``config_differences`` names what differs. A checkpoint that cannot be read (truncated,
corrupt) raises ``CheckpointError`` naming its folder; nothing is deleted.

Checksums: meta holds a checksum of every saved array (two 32-bit sums of the array's bits,
one weighted by position, computed on the device in one jitted call) and a SHA-256 of the
data iterator's state; restoring recomputes them and refuses a checkpoint whose values differ,
naming the array, like any damaged checkpoint. Checkpoints written before checksums existed
restore unverified.

``restore_workdir`` reads what evaluation and generation need of a workdir: its config and
one checkpoint's parameters (the "params" subtree of "state" only; the optimizer state is
neither read nor built).
"""

from __future__ import annotations

import gc
import hashlib
import inspect
import json
import logging
import pathlib
import sys
from typing import Any, NamedTuple

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from attamba_jax.config import Config, load_saved_config
from attamba_jax.model import LanguageModel


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the folder and the problem."""


# Keys that may change between a checkpoint and the run that resumes from it: they change
# neither the shapes of the state nor the order of the data (the implementations of the two
# ops compute the same function: tests hold every one to the reference).
RESUMABLE_CHANGES = frozenset(
    {"data.prefetch", "data.threads", "model.ssm_implementation", "model.attention_implementation"}
)
# Sections that may change freely (a longer run, another learning rate, other logging,
# another device mesh: the state is restored onto the current mesh's shardings).
RESUMABLE_SECTIONS = ("optim.", "train.", "mesh.")


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = tuple(value) if isinstance(value, list) else value
    return out


def config_differences(saved: dict, current: dict) -> list[str]:
    """``"key: saved -> current"`` for every key that forbids resuming from ``saved``."""
    a, b = _flatten(saved), _flatten(current)
    diffs = []
    for key in sorted(set(a) | set(b)):
        if key in RESUMABLE_CHANGES or key.startswith(RESUMABLE_SECTIONS):
            continue
        if a.get(key, "<absent>") != b.get(key, "<absent>"):
            diffs.append(f"{key}: {a.get(key, '<absent>')!r} in the checkpoint, {b.get(key, '<absent>')!r} now")
    return diffs


def _bits(x: jax.Array) -> jax.Array:
    """The array's bits as uint32 (one element per value; 16-bit and 8-bit types widened)."""
    width = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
    bits = jax.lax.bitcast_convert_type(x, width) if x.dtype != jnp.bool_ else x
    return bits.astype(jnp.uint32).reshape(-1)


@jax.jit
def _array_checksums(leaves: list[jax.Array]) -> jax.Array:
    """[len(leaves), 2] uint32: one transfer for all."""

    def one(x):
        bits = _bits(x)
        weights = 2 * jax.lax.iota(jnp.uint32, bits.shape[0]) + 1  # odd: any one changed value shows
        return jnp.stack([jnp.sum(bits, dtype=jnp.uint32), jnp.sum(bits * weights, dtype=jnp.uint32)])

    return jnp.stack([one(x) for x in leaves])


def state_checksums(tree: Any) -> dict[str, str]:
    """``{array path: checksum}`` of every array of ``tree`` (computed on its devices)."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    if not flat:
        return {}
    paths, leaves = zip(*flat)
    sums = np.asarray(jax.device_get(_array_checksums(list(leaves))))
    return {
        jax.tree_util.keystr(path, simple=True, separator="/"): f"{int(a):08x}{int(b):08x}"
        for path, (a, b) in zip(paths, sums)
    }


def iterator_checksum(data_iterator: grain.DatasetIterator) -> str:
    return hashlib.sha256(json.dumps(data_iterator.get_state(), sort_keys=True, default=str).encode()).hexdigest()


def _frames(traceback) -> list:
    out = []
    while traceback is not None:
        out.append(traceback.tb_frame.f_code)
        traceback = traceback.tb_next
    return out


def _late_read(unraisable) -> bool:
    """A TensorStore read that finished after Orbax closed the restore's event loop: its
    callback found the loop closed."""
    return (
        unraisable.exc_type is RuntimeError
        and str(unraisable.exc_value) == "Event loop is closed"
        and any(
            c.co_name == "call_soon_threadsafe" and "asyncio" in c.co_filename
            for c in _frames(unraisable.exc_traceback)
        )
    )


def _quiet_orbax_readers(hook):
    """``sys.unraisablehook`` that drops the reports of Orbax coroutines and of late TensorStore
    reads, and passes the rest on."""

    def quiet(unraisable):
        code = getattr(unraisable.object, "cr_code", None)
        orbax = code is not None and "orbax" in code.co_filename
        if not (orbax or _late_read(unraisable)):
            hook(unraisable)

    quiet.orbax_readers_quiet = True
    return quiet


class _UnretrievedReads(logging.Filter):
    """Drops asyncio's "exception was never retrieved" for the reads of a failed restore (an
    Orbax reader task, or a TensorStore read future): the CheckpointError reported the failure."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if error is None or "exception was never retrieved" not in record.getMessage():
            return True
        orbax = any("orbax" in c.co_filename for c in _frames(error.__traceback__))
        return not (orbax or "Error reading" in str(error))


def _quiet_failed_reads():
    """Before a restore: a read that fails makes Orbax close its event loop with the other reads
    in flight, which then report the failure again, each its own way (an unraisable exception,
    asyncio's log, a closed loop), now or at exit. The CheckpointError says what failed, so
    those reports are dropped; anything else is still reported."""
    if not getattr(sys.unraisablehook, "orbax_readers_quiet", False):
        sys.unraisablehook = _quiet_orbax_readers(sys.unraisablehook)
    asyncio_log = logging.getLogger("asyncio")
    if not any(isinstance(f, _UnretrievedReads) for f in asyncio_log.filters):
        asyncio_log.addFilter(_UnretrievedReads())


def _drop_failed_reads(error: BaseException):
    """Let go of a failed restore: the readers its error's traceback holds are collected now."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        error.__traceback__ = None
        error = error.__cause__ or error.__context__
    # The reads the failure cancelled before they started: closed, they are not reported as
    # never awaited when they are collected (now or at exit).
    for obj in gc.get_objects():
        if inspect.iscoroutine(obj) and "orbax" in obj.cr_code.co_filename:
            if inspect.getcoroutinestate(obj) == inspect.CORO_CREATED:
                obj.close()
    gc.collect()


class Checkpointer:
    """Saves and restores (state, data iterator, meta) under ``directory``."""

    def __init__(
        self, directory: str | pathlib.Path, *, keep_last: int, keep_every: int | None, read_only: bool = False
    ):
        """``read_only``: for readers beside a running trainer (evaluation); touches nothing on disk."""
        self.directory = pathlib.Path(directory).absolute()
        policies = [ocp.checkpoint_managers.LatestN(keep_last)]
        if keep_every is not None:
            policies.append(ocp.checkpoint_managers.EveryNSteps(keep_every))
        options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=True,
            create=not read_only,
            read_only=read_only,
            # An interrupted save leaves a temporary folder; the trainer drops it (a reader must
            # not: it may be a save in progress).
            cleanup_tmp_directories=not read_only,
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
            save_interval_steps=0 if read_only else 1,  # a reader saves nothing
        )
        # Orbax warns through absl that a read-only manager's directory is read only: that is the point.
        absl = logging.getLogger("absl")
        level = absl.level
        if read_only:
            absl.setLevel(logging.ERROR)
        try:
            self.manager = ocp.CheckpointManager(self.directory, options=options)
        finally:
            absl.setLevel(level)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Any, data_iterator: grain.DatasetIterator | None, meta: dict):
        meta = {**meta, "checksums": state_checksums(state)}
        if data_iterator is not None:
            meta["iterator_checksum"] = iterator_checksum(data_iterator)
        items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def _folder(self, step: int) -> pathlib.Path:
        return self.directory / str(step)

    def _hint(self, step: int) -> str:
        others = [s for s in self.all_steps() if s < step]
        if others:
            return f"; to resume from step {others[-1]}, pass --resume-step {others[-1]} (nothing is deleted)"
        return "; move it aside to start afresh"

    def _unreadable(self, step: int, what: str, error: Exception) -> CheckpointError:
        """The CheckpointError for a reader's ``error``, which is dropped with what it holds."""
        _drop_failed_reads(error)
        hint = self._hint(step)
        # The first line of the reader's message; TensorStore appends its whole spec after it.
        detail = (str(error).splitlines() or [""])[0].split(". See full")[0][:300]
        return CheckpointError(
            f"checkpoint {self._folder(step)} cannot be read ({what}: {type(error).__name__}: {detail}){hint}"
        )

    def _read(self, step: int, what: str, **items):
        """``manager.restore`` of ``items`` at ``step``; a CheckpointError naming ``what`` if it fails."""
        _quiet_failed_reads()
        try:
            return self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # orbax/tensorstore raise many types for a damaged folder
            error = self._unreadable(step, what, e)
        raise error

    def read_meta(self, step: int) -> dict:
        meta = self._read(step, "meta", meta=ocp.args.JsonRestore()).meta
        if not isinstance(meta, dict) or "config" not in meta or "step" not in meta:
            raise CheckpointError(
                f"checkpoint {self._folder(step)}: meta holds no config and step; it was not written by this trainer"
            )
        return meta

    def restore(
        self, step: int, abstract_state: Any, data_iterator: grain.DatasetIterator | None, meta: dict | None = None
    ) -> Any:
        """The state at ``step`` (shaped and sharded like ``abstract_state``); moves ``data_iterator``
        there. ``meta``: the step's, when the caller has read it already."""
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self._read(step, "state" if data_iterator is None else "state or data iterator", **items)
        meta = self.read_meta(step) if meta is None else meta
        self._verify(step, meta, restored.state)
        if data_iterator is not None and "iterator_checksum" in meta:
            if iterator_checksum(data_iterator) != meta["iterator_checksum"]:
                raise self._damaged(step, "the data iterator's state")
        return restored.state

    def _damaged(self, step: int, what: str) -> CheckpointError:
        return CheckpointError(
            f"checkpoint {self._folder(step)} is damaged: {what} does not match the checksum saved with it"
            + self._hint(step)
        )

    def _verify(self, step: int, meta: dict, tree: Any, prefix: str = ""):
        """Refuse ``tree`` (restored from ``step``; its paths under ``prefix``) unless every array
        matches the checksum saved with it."""
        saved = meta.get("checksums")
        if saved is None:
            return  # written before checksums existed
        for path, checksum in state_checksums(tree).items():
            if saved.get(prefix + path) != checksum:
                raise self._damaged(step, f"array {prefix + path}")

    def restore_params(self, step: int, abstract_params: Any) -> Any:
        """Only the parameters of checkpoint ``step``, shaped and sharded like ``abstract_params``."""
        item = {"params": abstract_params}
        # partial_restore: the saved state also holds "opt_state" and "step", which are skipped.
        restore_args = ocp.checkpoint_utils.construct_restore_args(item)
        args = ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True)
        restored = self._read(step, "state", state=args)
        self._verify(step, self.read_meta(step), restored.state["params"], prefix="params/")
        return restored.state["params"]

    def reload(self):
        """Read the steps on disk again (after folders were moved)."""
        self.manager.reload()

    def wait(self):
        """Block until every started save is on disk."""
        self.manager.wait_until_finished()

    def close(self):
        self.manager.close()


class Restored(NamedTuple):
    """A workdir's config and the parameters of one of its checkpoints."""

    cfg: Config
    graphdef: nnx.GraphDef
    params: nnx.State  # float32, on the default device
    step: int


def restore_workdir(workdir: str | pathlib.Path, step: int | None = None) -> Restored:
    """The config and the parameters of ``workdir``'s checkpoint ``step`` (default: the latest).

    The config is the workdir's config.yaml (old key names upgraded); the model's abstract
    parameters, built from it without allocating, shape the restore of the saved ones.
    """
    workdir = pathlib.Path(workdir)
    cfg_path = workdir / "config.yaml"
    if not cfg_path.is_file():
        raise CheckpointError(f"{workdir} holds no config.yaml; is it a training workdir?")
    cfg = load_saved_config(cfg_path)
    if not (workdir / "checkpoints").is_dir():
        raise CheckpointError(f"{workdir} holds no checkpoints")
    tcfg = cfg.train
    ckpt = Checkpointer(workdir / "checkpoints", keep_last=tcfg.keep_last, keep_every=tcfg.keep_every, read_only=True)
    try:
        steps = ckpt.all_steps()
        if not steps:
            raise CheckpointError(f"{workdir / 'checkpoints'} holds no finished checkpoint")
        step = steps[-1] if step is None else step
        if step not in steps:
            raise CheckpointError(f"no checkpoint step {step} in {workdir / 'checkpoints'} (it has {steps})")
        graphdef, abstract = nnx.split(nnx.eval_shape(lambda: LanguageModel(cfg.model, rngs=nnx.Rngs(params=cfg.seed))))
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract)
        params = ckpt.restore_params(step, abstract)
    finally:
        ckpt.close()
    return Restored(cfg, graphdef, params, step)
