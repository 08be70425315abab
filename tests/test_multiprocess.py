"""Multi-process training for real: two processes on this machine (4 CPU devices each) joined by
``jax.distributed`` train on a data x context mesh, are killed after a checkpoint, resume, and end
with the losses of one process on 8 devices."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np

from attamba_jax.config import load_config
from attamba_jax.trainer import Trainer
from tests.helpers import subprocess_xla_flags
from tests.test_trainer import MODEL, TINY, _corpus

REPO = pathlib.Path(__file__).resolve().parents[1]

# Each process: join the others, train, and SIGKILL itself once checkpoint KILL_AFTER is on disk.
_KILLED_AFTER_A_CHECKPOINT = """
import os, pathlib, signal, sys, time
import jax
from train import distributed_args
jax.distributed.initialize(**distributed_args(False, os.environ))
from attamba_jax.config import load_config
from attamba_jax.trainer import Trainer
config, workdir, kill_after, *overrides = sys.argv[1:]
def callback(step):
    if step == int(kill_after) + 1:
        folder = pathlib.Path(workdir) / "checkpoints" / kill_after
        while not folder.is_dir():
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGKILL)
Trainer(load_config(config, overrides), workdir, progress=False).run(callback)
"""


def _two_processes(command: list[str], cache: pathlib.Path) -> list[subprocess.CompletedProcess]:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(2):
        env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", JAX_COMPILATION_CACHE_DIR=str(cache))
        env |= {
            "XLA_FLAGS": subprocess_xla_flags(4),
            "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo",  # collectives between CPU processes
            "JAX_COORDINATOR_ADDRESS": f"localhost:{port}",
            "JAX_NUM_PROCESSES": "2",
            "JAX_PROCESS_ID": str(rank),
        }
        procs.append(subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    results = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        results.append(subprocess.CompletedProcess(p.args, p.returncode, out.decode(), err.decode()))
    return results


def _losses(workdir: pathlib.Path) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records if r["kind"] == "train"]


def test_two_processes_train_on_a_data_by_context_mesh_resume_and_match_one_process(tmp_path):
    # Given a run of 6 steps on one process of 8 devices, mesh data 2 x context 4
    corpus = _corpus(tmp_path / "corpus")
    overrides = MODEL + [
        f"data.train=[{corpus}]", "data.heldout_fraction=0.2", "data.seq_len=96", "data.batch_size=8",
        "data.threads=1", "optim.warmup_steps=2", "train.steps=6", "train.log_every=1", "train.eval_every=100",
        "train.eval_batches=2", "train.checkpoint_every=3", "mesh.data=2", "mesh.context=4",
    ]  # fmt: skip
    Trainer(load_config(TINY, overrides), tmp_path / "one", progress=False).run()

    # When two processes of 4 devices each run it, are killed after checkpoint 3, and are started again
    two, cache = tmp_path / "two", tmp_path / "jax_cache"
    killed = _two_processes([sys.executable, "-c", _KILLED_AFTER_A_CHECKPOINT, TINY, str(two), "3", *overrides], cache)
    assert [k.returncode for k in killed] == [-9, -9], [k.stderr[-2000:] for k in killed]
    train = [sys.executable, "train.py", "--no-progress", "--config", TINY, "--workdir", str(two), *overrides]
    resumed = _two_processes(train, cache)
    assert [r.returncode for r in resumed] == [0, 0], [r.stderr[-2000:] for r in resumed]
    assert "resumed from checkpoint step 3" in resumed[0].stdout  # process 0 reports the run; process 1 does not
    assert "resumed from" not in resumed[1].stdout and "done:" not in resumed[1].stdout

    # Then every step is logged once (by process 0) with the loss of the one-process run
    one, both = _losses(tmp_path / "one"), _losses(two)
    assert [s for s, _ in both] == [s for s, _ in one] == list(range(1, 7))
    np.testing.assert_allclose([loss for _, loss in both], [loss for _, loss in one], rtol=1e-5)
