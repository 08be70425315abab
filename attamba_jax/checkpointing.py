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
"""

from __future__ import annotations

import pathlib
from typing import Any

import grain
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the folder and the problem."""


# Keys that may change between a checkpoint and the run that resumes from it: they change
# neither the shapes of the state nor the order of the data.
RESUMABLE_CHANGES = frozenset({"data.prefetch", "data.threads"})
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


class Checkpointer:
    """Saves and restores (state, data iterator, meta) under ``directory``."""

    def __init__(self, directory: str | pathlib.Path, *, keep_last: int, keep_every: int | None, read_only: bool = False):
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
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Any, data_iterator: grain.DatasetIterator | None, meta: dict):
        items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def _folder(self, step: int) -> pathlib.Path:
        return self.directory / str(step)

    def _unreadable(self, step: int, what: str, error: Exception) -> CheckpointError:
        others = [s for s in self.all_steps() if s != step]
        hint = (
            f"; move {self._folder(step)} aside to resume from step {others[-1]}" if others else "; move it aside to start afresh"
        )
        # The first line of the reader's message; TensorStore appends its whole spec after it.
        detail = (str(error).splitlines() or [""])[0].split(". See full")[0][:300]
        return CheckpointError(f"checkpoint {self._folder(step)} cannot be read ({what}: {type(error).__name__}: {detail}){hint}")

    def read_meta(self, step: int) -> dict:
        try:
            meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        except Exception as e:  # orbax/tensorstore raise many types for a damaged folder
            raise self._unreadable(step, "meta", e) from e
        if not isinstance(meta, dict) or "config" not in meta or "step" not in meta:
            raise CheckpointError(f"checkpoint {self._folder(step)}: meta holds no config and step; it was not written by this trainer")
        return meta

    def restore(self, step: int, abstract_state: Any, data_iterator: grain.DatasetIterator | None) -> Any:
        """The state at ``step`` (shaped and sharded like ``abstract_state``); moves ``data_iterator`` there."""
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:
            raise self._unreadable(step, "state" if data_iterator is None else "state or data iterator", e) from e
        return restored.state

    def wait(self):
        """Block until every started save is on disk."""
        self.manager.wait_until_finished()

    def close(self):
        self.manager.close()
