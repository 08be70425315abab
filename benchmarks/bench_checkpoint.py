"""What checkpoint checksums cost: save and restore of a config's whole train state, against the
checksums alone, in one process.

A save (``Checkpointer.save`` then ``wait``: the arrays copied off the device, written, committed)
includes computing a checksum of every array; a restore includes recomputing them. The checksum
rows time exactly that work (``state_checksums`` on the state the save and the restore see), so
``save - checksum`` is a save without them.

    python -m benchmarks.bench_checkpoint --config configs/paper/attamba_k8_w8.yaml --out checkpoint.json
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import jax

from attamba_jax.checkpointing import Checkpointer, state_checksums
from attamba_jax.config import load_config
from attamba_jax.model import count_params
from attamba_jax.optimizer import make_optimizer
from attamba_jax.train_step import init_train_state, mesh_from_config
from benchmarks.timing import save, stamp


def _seconds(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/paper/attamba_k8_w8.yaml")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where to write the checkpoints (default: a temporary folder)")
    ap.add_argument("--out", default="checkpoint.json")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    cfg = load_config(a.config, a.overrides)
    tx, _ = make_optimizer(cfg.optim, cfg.train.steps)
    _, state, _ = init_train_state(cfg, mesh_from_config(cfg.mesh), tx)
    n_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
    print(
        f"device {jax.devices()[0].device_kind}, jax {jax.__version__}; {count_params(state['params']):,} "
        f"parameters, train state {n_bytes / 2**20:,.1f} MiB",
        flush=True,
    )
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    with tempfile.TemporaryDirectory(dir=a.dir) as root:
        ckpt = Checkpointer(root, keep_last=a.reps + 2, keep_every=None)
        steps = iter(range(1, 1000))

        def save_once():
            ckpt.save(next(steps), state, None, {"step": 0, "config": {}})
            ckpt.wait()

        save_once()  # compiles the checksums, warms the writer
        state_checksums(state)
        result = {
            "device": jax.devices()[0].device_kind,
            "jax": jax.__version__,
            "config": a.config,
            "state_MiB": n_bytes / 2**20,
            "save_s": _seconds(save_once, a.reps),
            "checksums_s": _seconds(lambda: state_checksums(state), a.reps),
        }
        last = ckpt.latest_step()
        result["restore_s"] = _seconds(lambda: jax.block_until_ready(ckpt.restore(last, abstract, None)), a.reps)
        restored = ckpt.restore(last, abstract, None)
        result["verify_s"] = _seconds(lambda: state_checksums(restored), a.reps)
        ckpt.close()
    result["save_share"] = result["checksums_s"] / result["save_s"]
    result["restore_share"] = result["verify_s"] / result["restore_s"]
    save(result, a.out)
    print(f"{stamp()} median of {a.reps}:")
    print(
        f"  save (with checksums)     {1e3 * result['save_s']:9.1f} ms; the checksums {1e3 * result['checksums_s']:7.1f} ms "
        f"= {100 * result['save_share']:.1f}%"
    )
    print(
        f"  restore (with checksums)  {1e3 * result['restore_s']:9.1f} ms; the checksums {1e3 * result['verify_s']:7.1f} ms "
        f"= {100 * result['restore_share']:.1f}%"
    )
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
