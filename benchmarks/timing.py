"""What every benchmark script shares: progress stamps, incremental JSON, timing, relative error."""

from __future__ import annotations

import json
import statistics
import tempfile
import time

import jax
import numpy as np

from benchmarks.trace_summary import kernel_table

_T0 = time.perf_counter()


def stamp() -> str:
    """Seconds since start, on every progress line (compile time shows in the gaps)."""
    return f"[{time.perf_counter() - _T0:6.1f}s]"


def save(result: dict, path: str) -> None:
    """Rewritten after every measurement, so a run cut short keeps what it measured."""
    with open(path, "w") as f:
        json.dump(result, f, indent=1)


def time_calls(fn, arg_sets, reps: int, trials: int):
    """(median over ``trials`` of the seconds per call of jitted ``fn``, its first output).

    Each trial issues ``reps`` calls back to back, rotating over ``arg_sets`` (several input
    sets keep a call's inputs out of the L2 cache left by the previous one), and waits once.
    The first call compiles and a round over every input set warms up; neither is timed.
    """
    first = jax.block_until_ready(fn(*arg_sets[0]))
    jax.block_until_ready([fn(*a) for a in arg_sets])
    means = []
    for _ in range(trials):
        t0 = time.perf_counter()
        outs = [fn(*arg_sets[i % len(arg_sets)]) for i in range(reps)]
        jax.block_until_ready(outs)
        means.append((time.perf_counter() - t0) / reps)
        del outs
    return statistics.median(means), first


def device_seconds(fn, arg_sets, reps: int) -> float:
    """Seconds of device kernels per call of jitted, already compiled ``fn``: ``reps`` calls
    back to back (rotating over ``arg_sets``) under the JAX profiler, the kernels' own durations
    summed (CUPTI timestamps on a GPU) and divided by ``reps``.

    Wall-clock time per call cannot go below the host's dispatch of one call (~0.05 ms here);
    a kernel shorter than that is measured only this way.
    """
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            jax.block_until_ready([fn(*arg_sets[i % len(arg_sets)]) for i in range(reps)])
        return kernel_table(trace_dir, reps)["device_ms_per_step"] / 1e3


def nbytes(*arrays) -> int:
    """Bytes of every array leaf of ``arrays``."""
    return sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(arrays))


def copy_bandwidth(reps: int = 20) -> float:
    """Device-to-device bandwidth (bytes read + written per second of kernel time) of a 2 GiB
    elementwise copy (8 MiB on a CPU): what the kernel benchmarks quote their bandwidth against."""
    x = jax.numpy.ones((1 << 30 if jax.default_backend() != "cpu" else 1 << 22,), jax.numpy.bfloat16)
    f = jax.jit(lambda a: a + 1)
    jax.block_until_ready(f(x))  # compile and warm up
    return 2 * nbytes(x) / device_seconds(f, [(x,)], reps)


def bandwidth_row(b: int, t: int, implementation: str, mode: str, sec: float, dev: float, moved: int, copy_bw: float):
    """A kernel benchmark's result row: wall and kernel ms of one call, the bytes the op must move
    and their bandwidth over the kernel time, also as a fraction of the copy bandwidth."""
    gbps = moved / dev / 1e9 if dev > 0 else float("nan")
    return {
        "B": b,
        "L": t,
        "implementation": implementation,
        "mode": mode,
        "ms": sec * 1e3,
        "device_ms": dev * 1e3,
        "bytes": moved,
        "GB/s": gbps,
        "fraction_of_copy_bw": gbps * 1e9 / copy_bw,
    }


def rel_err(a, b) -> float:
    """max |a - b| / max |b|, in float32."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


DOCS = "+docs"  # an implementation name with this suffix runs on packed documents (``--doc-length``)


def packed_starts(batch: int, length: int, align: int, mean: int, seed: int = 0) -> np.ndarray:
    """[B, T] int32 document starts as the packer lays them out: documents of random lengths
    (exponential, mean ``mean`` tokens) each starting at a multiple of ``align``, the padding
    after a document belonging to it, each row's last document cut by the row's end."""
    rng = np.random.default_rng(seed)
    starts = np.zeros((batch, length), np.int32)
    for row in range(batch):
        pos = 0
        while pos < length:
            n = max(1, int(rng.exponential(mean)))
            stop = min(length, -(-(pos + n) // align) * align)
            starts[row, pos:stop] = pos
            pos = stop
    return starts


def document_ratios(rows: list[dict], keys: tuple[str, ...], time_key: str) -> list[dict]:
    """For every row of an implementation ``NAME+docs``, its ``time_key`` over that of ``NAME``'s
    row with the same ``keys`` (the cost of packed documents, measured in the same run)."""
    plain = {tuple(r[k] for k in keys) + (r["implementation"],): r for r in rows}
    out = []
    for r in rows:
        if r["implementation"].endswith(DOCS):
            base = plain.get(tuple(r[k] for k in keys) + (r["implementation"][: -len(DOCS)],))
            if base:
                out.append(
                    {
                        **{k: r[k] for k in keys},
                        "implementation": base["implementation"],
                        "ratio": r[time_key] / base[time_key],
                    }
                )
    return out


def add_kernel_bench_args(ap, *, out: str, sweep_help: str) -> None:
    """The options every kernel benchmark shares: device checks, tile sweep, interpreter, output, plot."""
    ap.add_argument("--check", action="store_true", help="first compare the kernel with the reference on the device")
    ap.add_argument("--check-dtypes", default="float32,bfloat16")
    ap.add_argument("--check-cases", default="", help="indices of the check cases to run (default: all)")
    ap.add_argument("--sweep", default="", help=sweep_help)
    ap.add_argument("--interpret", action="store_true", help="run the Pallas kernel in the interpreter (CPU smoke run)")
    ap.add_argument("--out", default=out)
    ap.add_argument("--png", default="")
    ap.add_argument("--plot", default="", help="only redraw the PNG from this JSON")


def time_steps(step, state, batch, reps: int):
    """(median seconds of ``reps`` calls of ``step(state, batch) -> (state, metrics)``, each waited
    on, the last state, its metrics): for steps that donate and return their state."""
    times = []
    metrics = None
    for _ in range(reps):
        t0 = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), state, metrics
