"""One writer per workdir: the lock a training run holds while it may write checkpoints and logs.

    lock = WorkdirLock.acquire(workdir)     # WorkdirLockError naming the holder if one is running
    ...
    lock.release()

The lock is the file ``WORKDIR/lock.json``, created atomically (``O_CREAT | O_EXCL``), holding
the holder's host, process id, start time and command line. While held, a daemon thread
refreshes the file's modification time every ``HEARTBEAT_S`` seconds.

A lock whose holder is gone is stale and is taken over, with a printed line naming it:
  * same host: the holder's process id no longer runs (or is this process, its lock released
    by nothing: a run that ended without closing);
  * another host (a filesystem shared by several machines, where process ids cannot be
    checked): the heartbeat is older than ``STALE_AFTER_S`` seconds. A run that stops its
    heartbeat for that long (a frozen machine) loses its claim.

Readers (``evaluate``, ``generate``, ``restore_workdir``) take no lock. In a multi-process
run, process 0 holds it for all.
"""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import socket
import sys
import threading
import time

LOCK_NAME = "lock.json"
HEARTBEAT_S = 60.0
STALE_AFTER_S = 600.0

_held: set[pathlib.Path] = set()  # lock files this process holds now


class WorkdirLockError(RuntimeError):
    """Another run holds the workdir; the message names it."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


class WorkdirLock:
    def __init__(self, path: pathlib.Path, record: dict):
        self.path = path
        self.record = record
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._heartbeat, name="workdir-lock-heartbeat", daemon=True)
        self._thread.start()

    @classmethod
    def acquire(cls, workdir: str | pathlib.Path, *, say=print) -> WorkdirLock:
        """Hold ``workdir``'s lock (creating the workdir), or raise WorkdirLockError naming the holder."""
        workdir = pathlib.Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        path = (workdir / LOCK_NAME).resolve()
        record = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "command": " ".join(sys.argv),
        }
        for _ in range(3):  # a stale lock removed between two runs' attempts: try again
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder, why_stale = cls._stale(path)
                if why_stale is None:
                    raise WorkdirLockError(
                        f"{workdir} is in use by another run: host {holder.get('host')}, pid {holder.get('pid')}, "
                        f"started {holder.get('started')} ({holder.get('command', '')!r}). Wait for it to end or use "
                        f"another --workdir; if that run is gone and this is wrong, delete {path}."
                    ) from None
                path.unlink(missing_ok=True)
                if holder:
                    say(
                        f"took over the stale lock of {workdir} (host {holder.get('host')}, pid {holder.get('pid')}, "
                        f"started {holder.get('started')}): {why_stale}"
                    )
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(record, f)
            _held.add(path)
            return cls(path, record)
        raise WorkdirLockError(f"could not take the lock {path}: other runs keep creating it")

    @staticmethod
    def _stale(path: pathlib.Path) -> tuple[dict, str | None]:
        """(the holder's record, why its lock is stale or None while it holds it)."""
        try:
            holder = json.loads(path.read_text())
            age = time.time() - path.stat().st_mtime
        except FileNotFoundError:
            return {}, "released meanwhile"
        except (OSError, ValueError):
            holder, age = {}, time.time() - path.stat().st_mtime
            if age > STALE_AFTER_S:
                return holder, f"an unreadable lock file {age:.0f} s old"
            return {"host": "?", "pid": "?", "started": "?", "command": "unreadable lock file"}, None
        if holder.get("host") == socket.gethostname():
            pid = holder.get("pid")
            if pid == os.getpid():
                return holder, None if path in _held else "left by this process"
            if not isinstance(pid, int) or not _alive(pid):
                return holder, f"process {pid} is not running"
            return holder, None
        if age > STALE_AFTER_S:
            return holder, f"its heartbeat is {age:.0f} s old (stale after {STALE_AFTER_S:.0f} s)"
        return holder, None

    def _heartbeat(self):
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                return

    def release(self):
        """Remove the lock file if it is still this run's; idempotent."""
        self._stop.set()
        if self.path not in _held:
            return
        _held.discard(self.path)
        try:
            if json.loads(self.path.read_text()).get("pid") == self.record["pid"]:
                self.path.unlink()
        except (OSError, ValueError):
            pass
