"""Attention under context parallelism, one device's share, on one GPU: the per-piece Pallas kernel
(``boundary_window_attention_of_rows``, ``pallas_gpu``) against the XLA path a context piece took
before it (``compressed``), and against the whole-row kernel on the whole row.

A row of L tokens split over c context devices is 2c pieces of L/2c, each with its halo, every
piece also reading the row's gathered boundary keys and its queries' document-first keys
(``attamba_jax.context_parallel``). The load balance gives every device the same attention work,
so all 2c pieces run here in one call (the work of c devices) and the table reports the call's
time over c: one device's time. ``whole/c`` is the whole-row kernel's time over c, the ideal
split; ``rows/whole`` how far the pieces' kernel is from it (halos, the boundary copies each
piece reads, smaller launches), ``xla/rows`` what the kernel gains over the XLA path.
Forward and forward+backward (gradients of every input: q and the piece rows' keys, the
boundary keys, the document-first keys). The ``--check`` run compares the pieces' outputs with
the whole-row kernel's on the device.

Paper sizes: H = Hkv = 8 heads of D = 64, bf16, W = 8, K = 8 (layer 0's grid), one row.

    python -m benchmarks.bench_context_attention --check --out context_attention.json  # on the GPU
    python -m benchmarks.bench_context_attention --lengths 2048 --shards 2 --interpret \\
        --reps 1 --trials 1 --out /tmp/c.json                                            # CPU smoke run
"""

from __future__ import annotations

import argparse
import functools
import platform

import jax
import jax.numpy as jnp

from attamba_jax import context_parallel
from benchmarks.bench_attention import HEADS, _fwd_bwd, _inputs
from benchmarks.timing import packed_starts, rel_err, save, stamp, time_calls
from pallas_kernels.boundary_window_attention import pallas_gpu
from pallas_kernels.chunk_grid import ChunkGrid


def _pieces(q, k, v, do, starts, shards: int, grid: ChunkGrid, window: int):
    """The whole row in context order cut as context parallelism cuts it: ((q rows, k rows, v rows,
    output-gradient rows), the split, the starts in context order)."""
    rows = context_parallel.ContextRows.plan(q.shape[1], shards, grid, window)
    q, k, v, do, starts = (context_parallel.in_context_order(a, rows.order) for a in (q, k, v, do, starts))
    return (rows.split(q), rows.to_rows(k), rows.to_rows(v), rows.split(do)), rows, starts


def bench(record, lengths, shards_list, kc, window, implementations, reps, trials, check, docs, interpret, xla_max_gb):
    grid = ChunkGrid(kc)
    dtype = jnp.bfloat16
    for length in lengths:
        q, k, v, do = _inputs(jax.random.key(length), 1, length, dtype)
        starts = jnp.asarray(packed_starts(1, length, kc, docs)) if docs else jnp.zeros((1, length), jnp.int32)
        whole = functools.partial(
            pallas_gpu.attention_pallas_gpu, grid=grid, window=window, document_start=starts, interpret=interpret
        )
        pieces = {}
        for shards in shards_list:
            try:
                pieces[shards] = _pieces(q, k, v, do, starts, shards, grid, window)
            except ValueError as e:  # pieces shorter than their halo
                print(f"skip L={length} c={shards}: {e}", flush=True)
        times = {}
        # (forward alone: q, k, v; forward and backward: the output's gradient too)
        for mode, wrap, n_args in (("fwd", lambda f: f, 3), ("fwd+bwd", _fwd_bwd, 4)):
            sec, whole_out = time_calls(jax.jit(wrap(whole)), [(q, k, v, do)[:n_args]], reps, trials)
            times["whole", mode] = sec
            print(f"{stamp()} L={length} whole-row kernel {mode}: {sec * 1e3:.3f} ms", flush=True)
            whole_o = jax.device_get(whole_out if mode == "fwd" else whole_out[0])
            del whole_out
            for shards, (arrays, rows, st) in pieces.items():
                for name in implementations:
                    p = rows.piece_length
                    if name == "compressed" and 2 * shards * HEADS * p * (length // kc + 1) * 4 > xla_max_gb * 2**30:
                        continue
                    impl = "pallas_gpu_interpret" if interpret and name == "pallas_gpu" else name
                    fn = lambda qr, kr, vr, rows=rows, st=st, impl=impl: context_parallel.boundary_window_attention(
                        qr, kr, vr, rows, grid=grid, window=window, document_start=st, implementation=impl
                    )
                    try:
                        sec, out = time_calls(jax.jit(wrap(fn)), [arrays[:n_args]], reps, trials)
                    except Exception as e:  # out of memory
                        print(f"skip {name} L={length} c={shards} {mode}: {type(e).__name__}: {str(e)[:200]}")
                        continue
                    entry = {"L": length, "shards": shards, "implementation": name, "mode": mode}
                    entry["device_ms"] = sec / shards * 1e3  # one device's share: 2 of the 2c pieces
                    entry["whole_over_c_ms"] = times["whole", mode] / shards * 1e3
                    if check:
                        o = out if mode == "fwd" else out[0]
                        natural = rows.natural(rows.join(o))[:, :length]
                        entry["max_rel_err_vs_whole"] = rel_err(natural, whole_o)
                    del out
                    times[name, shards, mode] = sec
                    record("rows", entry)
                    print(
                        f"{stamp()} L={length:7d} c={shards} {name:10s} {mode:8s} device {entry['device_ms']:9.3f} ms"
                        f"  whole/c {entry['whole_over_c_ms']:9.3f} ms"
                        + (f"  err {entry['max_rel_err_vs_whole']:.1e}" if check else ""),
                        flush=True,
                    )


def ratios(rows: list[dict]) -> list[dict]:
    out = []
    by = {(r["L"], r["shards"], r["mode"], r["implementation"]): r for r in rows}
    for (length, shards, mode, name), r in sorted(by.items()):
        if name != "pallas_gpu":
            continue
        item = {"L": length, "shards": shards, "mode": mode, "rows/whole": r["device_ms"] / r["whole_over_c_ms"]}
        xla = by.get((length, shards, mode, "compressed"))
        if xla:
            item["xla/rows"] = xla["device_ms"] / r["device_ms"]
        out.append(item)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="16384,65536,131072,524288")
    ap.add_argument("--shards", default="2,4,8", help="context devices c")
    ap.add_argument("--chunk", type=int, default=8, help="K")
    ap.add_argument("--window", type=int, default=8)
    ap.add_argument("--implementations", default="pallas_gpu,compressed")
    ap.add_argument("--doc-length", type=int, default=0, help="packed documents of this mean length (0: one)")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--xla-max-gb", type=float, default=24.0, help="skip compressed where its scores pass this")
    ap.add_argument("--check", action="store_true", help="compare the pieces' outputs with the whole row's")
    ap.add_argument("--interpret", action="store_true", help="the Pallas interpreter (CPU smoke runs)")
    ap.add_argument("--out", default="context_attention.json")
    args = ap.parse_args()
    result = {
        "device": str(jax.devices()[0].device_kind),
        "jax": jax.__version__,
        "python": platform.python_version(),
        "config": vars(args),
        "rows": [],
    }

    def record(key, item):
        result[key].append(item)
        result["ratios"] = ratios(result["rows"])
        save(result, args.out)

    ints = lambda s: [int(x) for x in s.split(",") if x]
    bench(
        record,
        ints(args.lengths),
        ints(args.shards),
        args.chunk,
        args.window,
        args.implementations.split(","),
        args.reps,
        args.trials,
        args.check,
        args.doc_length,
        args.interpret,
        args.xla_max_gb,
    )
    print("\n| L | c | mode | rows/whole | xla/rows |\n|---|---|---|---|---|")
    for r in result["ratios"]:
        print(
            f"| {r['L']} | {r['shards']} | {r['mode']} | {r['rows/whole']:.2f} | {r.get('xla/rows', float('nan')):.2f} |"
        )


if __name__ == "__main__":
    main()
