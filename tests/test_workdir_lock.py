"""One writer per workdir: the lock, its holder's name in the refusal, and stale locks taken over."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from attamba_jax import workdir_lock
from attamba_jax.workdir_lock import WorkdirLock, WorkdirLockError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid  # exited and reaped: no process has it (pids are not reused this soon)


def test_a_second_holder_is_refused_naming_the_first_and_release_frees_it(tmp_path):
    lock = WorkdirLock.acquire(tmp_path / "w")
    record = json.loads((tmp_path / "w" / "lock.json").read_text())
    assert record["host"] == socket.gethostname() and record["pid"] == os.getpid() and record["started"]
    with pytest.raises(
        WorkdirLockError, match=rf"in use by another run: host {socket.gethostname()}, pid {os.getpid()}"
    ):
        WorkdirLock.acquire(tmp_path / "w")
    lock.release()
    lock.release()  # idempotent
    assert not (tmp_path / "w" / "lock.json").exists()
    WorkdirLock.acquire(tmp_path / "w").release()


def test_a_lock_of_a_dead_process_on_this_host_is_taken_over_and_said(tmp_path):
    (tmp_path / "lock.json").write_text(json.dumps({"host": socket.gethostname(), "pid": _dead_pid(), "started": "x"}))
    said = []
    lock = WorkdirLock.acquire(tmp_path, say=said.append)
    assert len(said) == 1 and "took over the stale lock" in said[0] and "is not running" in said[0]
    assert json.loads((tmp_path / "lock.json").read_text())["pid"] == os.getpid()
    lock.release()


def test_a_lock_of_another_host_is_stale_only_when_its_heartbeat_is_old(tmp_path):
    path = tmp_path / "lock.json"
    path.write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": "x", "command": "train.py"}))
    with pytest.raises(WorkdirLockError, match="host elsewhere, pid 1"):
        WorkdirLock.acquire(tmp_path)
    old = time.time() - workdir_lock.STALE_AFTER_S - 5
    os.utime(path, (old, old))
    said = []
    WorkdirLock.acquire(tmp_path, say=said.append).release()
    assert "heartbeat is" in said[0]


def test_the_heartbeat_refreshes_the_lock(tmp_path, monkeypatch):
    monkeypatch.setattr(workdir_lock, "HEARTBEAT_S", 0.05)
    lock = WorkdirLock.acquire(tmp_path)
    old = time.time() - 1000
    os.utime(lock.path, (old, old))
    time.sleep(0.5)
    assert time.time() - lock.path.stat().st_mtime < 10
    lock.release()


def test_two_runs_on_one_workdir_the_second_stops_at_once_naming_the_first(tmp_path):
    # Given a training run holding its workdir
    run = [
        sys.executable,
        "train.py",
        "--no-progress",
        "--workdir",
        str(tmp_path / "w"),
        "train.steps=100000",
        "train.eval_every=100000",
        "train.checkpoint_every=100000",
        "data.threads=0",
    ]
    first = subprocess.Popen(run, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (tmp_path / "w" / "lock.json").exists():
            assert first.poll() is None and time.time() < deadline, "the first run did not start"
            time.sleep(0.2)
        # When a second run starts on it
        second = subprocess.run(run, cwd=REPO, capture_output=True, text=True, timeout=300)
        # Then it exits with the error alone, naming the first run's process
        assert second.returncode == 2
        assert second.stderr.strip().startswith("error: ") and f"pid {first.pid}" in second.stderr
        assert len(second.stderr.strip().splitlines()) == 1
        assert first.poll() is None  # the first run goes on
    finally:
        first.kill()
        first.wait()
