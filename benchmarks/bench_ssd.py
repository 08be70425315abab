"""SSD core speed: the Pallas kernel against the XLA ``chunked`` and ``associative`` paths.

Paper sizes (H = 8 heads of P = 32, state N = 32, G = 1 group), bf16 x/B/C, f32 dt,
one fixed chunk grid. For each B×L it times the forward and forward+backward of every
implementation and reports milliseconds and the achieved HBM bandwidth: the bytes the
op must move (each input read once, each output written once) over the kernels' time,
against the device-to-device copy bandwidth measured the same way in the same run.

Timing, two figures per row: ``ms`` is wall-clock (jit, one compile run, a warm-up pass,
then ``reps`` calls queued back to back and one block_until_ready; the per-call mean,
median of ``trials`` such rounds); ``device_ms`` is the kernels' own time per call, from
a profiler trace of another ``reps`` calls back to back. A call shorter than the host's
dispatch of one call (~0.05 ms) reads as that dispatch on the wall clock, so bandwidth
is computed from ``device_ms``. Calls rotate over several input sets (>= 256 MB
together) so that small sizes are not served from the 60 MB L2.

An implementation named ``NAME+docs`` runs NAME on packed rows (documents of mean length
``--doc-length`` at multiples of K), and a last table gives its kernel time over NAME's.

    python -m benchmarks.bench_ssd --check --out ssd.json          # on the GPU
    python -m benchmarks.bench_ssd --plot ssd.json                               # redraw the PNG
    python -m benchmarks.bench_ssd --sizes 2x256 --reps 2 --interpret --out /tmp/s.json   # CPU smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.timing import (
    DOCS,
    add_kernel_bench_args,
    bandwidth_row,
    copy_bandwidth,
    device_seconds,
    document_ratios,
    nbytes,
    packed_starts,
    rel_err,
    save,
    stamp,
    time_calls,
)
from pallas_kernels.chunk_grid import ChunkGrid
from pallas_kernels.ssd import pallas_gpu, reference, ssd
from pallas_kernels.ssd.block_sizes import GpuBlocks, GpuPass, default_gpu_blocks

HEADS, HEAD_DIM, STATE, GROUPS = 8, 32, 32, 1


def _inputs(key, b, t, dtype, h=HEADS, p=HEAD_DIM, g=GROUPS, n=STATE):
    args, dy = reference.random_inputs(key, b, t, h, p, g, n, dtype)
    return args, dy.astype(dtype)


def _input_sets(seed: int, b, t, dtype, shape: dict):
    """-> (input sets from keys ``seed``, ``seed + 1``, ... (>= 256 MB together, at most 32),
    the first set's dy, {mode: bytes the op must move}).

    fwd reads x, dt, B, C and writes y; bwd reads them and dy, and writes dx, ddt, dB, dC.
    """
    args, dy = _inputs(jax.random.key(seed), b, t, dtype, **shape)
    x, dt, _, B, C, _ = args
    fwd_bytes = nbytes(x, dt, B, C, x)
    moved = {"fwd": fwd_bytes, "fwd+bwd": fwd_bytes + 2 * nbytes(x, dt, B, C) + nbytes(dy)}
    num_sets = min(32, max(1, math.ceil((256 << 20) / fwd_bytes)))
    return [args] + [_inputs(jax.random.key(seed + i), b, t, dtype, **shape)[0] for i in range(1, num_sets)], dy, moved


def _fwd_bwd(impl):
    def run(x, dt, A, B, C, D, dy):
        y, vjp = jax.vjp(impl, x, dt, A, B, C, D)
        return y, vjp(dy)

    return run


# --- correctness on the device ---------------------------------------------------------


def check(record, dtypes=("float32", "bfloat16"), case_ids=None, seed: int = 0, interpret: bool = False) -> None:
    """The kernel against the sequential reference on the device: fresh inputs, forward and every
    gradient, f32 and bf16, then again with every kernel output poisoned with NaN."""
    cases = [(4, 0, 2, 1000, 8, 1), (8, 3, 2, 777, 8, 1), (16, 10, 1, 1500, 8, 1), (8, 7, 2, 600, 4, 2)]
    tolerances = {"float32": 1e-5, "bfloat16": 1e-2}
    for dtype_name in dtypes:
        dtype, tol = jnp.dtype(dtype_name), tolerances[dtype_name]
        for case_id, (k, o, b, t, h, g) in enumerate(cases):
            seed += 1
            if case_ids is not None and case_id not in case_ids:
                continue
            try:
                record("check", _check_one(seed, k, o, b, t, h, g, dtype, tol, interpret))
            except Exception as e:  # a compile or runtime failure is a failed check, not a crash
                record(
                    "check",
                    {
                        "K": k,
                        "offset": o,
                        "T": t,
                        "dtype": jnp.dtype(dtype).name,
                        "ok": False,
                        "error": f"{type(e).__name__}: {e}"[:2000],
                    },
                )
                print(
                    f"check ssd K={k} o={o} T={t} {jnp.dtype(dtype).name}: FAIL {type(e).__name__}: {str(e)[:500]}",
                    flush=True,
                )


def _check_one(seed, k, o, b, t, h, g, dtype, tol, interpret=False) -> dict:
    """One case: the kernels' forward and gradients, as they run and with every output poisoned, against the reference."""
    grid = ChunkGrid(k, o)
    args, dy = _inputs(jax.random.key(seed), b, t, dtype, h=h, g=g)
    reset = jnp.broadcast_to(jnp.asarray(grid.is_chunk_start(np.arange(t))), (b, t))
    with jax.default_matmul_precision("highest"):
        y_ref, g_ref = jax.jit(_fwd_bwd(lambda *a: reference.ssd_sequential(*a, reset)[0]))(*args, dy)
    y, grads = jax.jit(_fwd_bwd(lambda *a: pallas_gpu.ssd_pallas_gpu(*a, grid=grid, interpret=interpret)))(*args, dy)
    py, pgrads = jax.jit(
        _fwd_bwd(lambda *a: pallas_gpu.ssd_pallas_gpu(*a, grid=grid, interpret=interpret, poison=True))
    )(*args, dy)
    names = ("x", "dt", "A", "B", "C", "D")
    errs = {"y": rel_err(y, y_ref), "poisoned_y": rel_err(py, y_ref)}
    errs.update({f"d{n}": rel_err(a, r) for n, a, r in zip(names, grads, g_ref)})
    errs.update({f"poisoned_d{n}": rel_err(a, r) for n, a, r in zip(names, pgrads, g_ref)})
    finite = all(bool(jnp.isfinite(a).all()) for a in (y, py, *grads, *pgrads))
    ok = finite and max(errs.values()) <= tol
    print(
        f"{stamp()} check ssd {jnp.dtype(dtype).name:8s} K={k:2d} o={o:2d} B={b} T={t:5d} H={h} G={g}: "
        f"max rel err {max(errs.values()):.2e} (tol {tol:.0e}) finite={finite} {'OK' if ok else 'FAIL'}",
        flush=True,
    )
    return {
        "K": k,
        "offset": o,
        "B": b,
        "T": t,
        "H": h,
        "G": g,
        "dtype": jnp.dtype(dtype).name,
        "tolerance": tol,
        "max_rel_err": max(errs.values()),
        "errors": errs,
        "finite": finite,
        "ok": ok,
    }


# --- timing -----------------------------------------------------------------------------


def _impl(name: str, grid: ChunkGrid, interpret: bool, blocks: GpuBlocks | None = None, document_start=None):
    if name == "pallas_gpu":
        return lambda *a: pallas_gpu.ssd_pallas_gpu(
            *a, grid=grid, interpret=interpret, blocks=blocks, document_start=document_start
        )
    return lambda *a: ssd(*a, grid=grid, implementation=name, document_start=document_start)


def bench(
    record,
    sizes,
    implementations,
    grid,
    dtype,
    reps,
    trials,
    interpret,
    bandwidth,
    heads=HEADS,
    groups=GROUPS,
    doc_length=1024,
) -> None:
    shape = {"h": heads, "g": groups}
    for b, t in sizes:
        sets, dy, moved = _input_sets(b * t, b, t, dtype, shape)
        starts = jnp.asarray(packed_starts(b, t, grid.token_chunk, doc_length))
        kernel_out = {}  # (mode, documents) -> the Pallas kernel's output, to hold the other paths against
        for name in implementations:
            base, docs = name.removesuffix(DOCS), name.endswith(DOCS)
            impl = _impl(base, grid, interpret, document_start=starts if docs else None)
            for mode, fn in (("fwd", jax.jit(impl)), ("fwd+bwd", jax.jit(_fwd_bwd(impl)))):
                call_sets = sets if mode == "fwd" else [(*s, dy) for s in sets]
                try:
                    sec, out = time_calls(fn, call_sets, reps, trials)
                    dev = device_seconds(fn, call_sets, reps)
                except Exception as e:  # e.g. out of memory for the associative scan's state
                    print(f"skip {name} {mode} {b}x{t}: {type(e).__name__}: {str(e)[:200]}", flush=True)
                    continue
                if base == "pallas_gpu":
                    kernel_out[(mode, docs)] = out
                elif (mode, docs) in kernel_out:  # same function at full size: the kernel must agree
                    ref = kernel_out[(mode, docs)]
                    err = max(rel_err(a, r) for a, r in zip(jax.tree.leaves(ref), jax.tree.leaves(out)))
                    record("agreement", {"B": b, "L": t, "mode": mode, "against": name, "max_rel_err": err})
                    print(
                        f"{stamp()} {b}x{t} {mode}: pallas_gpu{DOCS * docs} vs {name} max rel err {err:.2e}", flush=True
                    )
                del out
                row = bandwidth_row(b, t, name, mode, sec, dev, moved[mode], bandwidth)
                gbps = row["GB/s"]
                record("rows", row)
                print(
                    f"{stamp()} {b:3d}x{t:<6d} {name:12s} {mode:8s} {sec * 1e3:9.3f} ms wall {dev * 1e3:9.3f} ms kernels "
                    f"{gbps:8.1f} GB/s {100 * row['fraction_of_copy_bw']:5.1f}% of copy",
                    flush=True,
                )


def sweep_variants(token_chunk: int) -> tuple[GpuBlocks, ...]:
    """The GPU kernel's tile and launch settings ``--sweep`` times, the default first."""
    return (  # GpuBlocks(tokens per tile, forward GpuPass, backward GpuPass); GpuPass(warps, tiles, heads ahead, stages)
        default_gpu_blocks(token_chunk),  # the default
        GpuBlocks(16, GpuPass(2, 2, 2, 2), GpuPass(1, 1, 1, 2)),  # the backward's loop over heads pipelined
        GpuBlocks(16, GpuPass(2, 2, 2, 2), GpuPass(1, 1, 1, 3)),
        GpuBlocks(16, GpuPass(2, 2, 2, 2), GpuPass(2, 1, 1, 2)),
        GpuBlocks(16, GpuPass(2, 2, 2, 2), GpuPass(1, 1, 2, 2)),  # pipelined over pairs of heads
        GpuBlocks(16, GpuPass(2, 1, 2, 1), GpuPass(1, 1, 1)),  # one tile per program
        GpuBlocks(16, GpuPass(2, 4, 2, 2), GpuPass(1, 1, 1)),  # the default before 16x1024 was swept
        GpuBlocks(16, GpuPass(2, 2, 2, 2), GpuPass(1, 2, 1, 2)),  # the backward in a pipelined loop over tiles
        GpuBlocks(16, GpuPass(2, 2, 2, 2), GpuPass(1, 1, 2)),  # the backward's loop over pairs of heads
        GpuBlocks(32, GpuPass(2, 1, 2, 1), GpuPass(2, 1, 1)),
    )


def sweep(record, b, t, grid, dtype, reps, trials, bandwidth, heads=HEADS, groups=GROUPS, interpret=False) -> None:
    """Tile sizes of the GPU kernel at one size; every tile's outputs (forward, and every
    gradient) are held to the first tile's, which ``check`` holds to the reference."""
    shape = {"h": heads, "g": groups}
    sets, dy, moved = _input_sets(1, b, t, dtype, shape)
    first = {}  # mode -> the first tile's output
    variants = sweep_variants(grid.token_chunk)
    for blocks in variants:
        if blocks.block_len < grid.token_chunk:
            continue
        impl = _impl("pallas_gpu", grid, interpret, blocks)
        for mode, fn in (("fwd", jax.jit(impl)), ("fwd+bwd", jax.jit(_fwd_bwd(impl)))):
            call_sets = sets if mode == "fwd" else [(*s, dy) for s in sets]
            err = float("nan")
            try:
                sec, out = time_calls(fn, call_sets, reps, trials)
                dev = device_seconds(fn, call_sets, reps)
                out = jax.tree.leaves(out)
                first.setdefault(mode, out)
                err = max(rel_err(a, r) for a, r in zip(out, first[mode]))
            except Exception as e:  # a tile that does not compile is no result
                print(f"  failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
                sec = dev = float("nan")
            record(
                "sweep",
                {
                    **dataclasses.asdict(blocks),
                    "mode": mode,
                    "ms": sec * 1e3,
                    "device_ms": dev * 1e3,
                    "GB/s": moved[mode] / dev / 1e9 if mode == "fwd" else None,
                    "max_rel_err_vs_first": err,
                },
            )
            f, w = blocks.fwd, blocks.bwd
            print(
                f"{stamp()} sweep ssd {b}x{t} L={blocks.block_len:3d} fwd warps/tiles/ahead/stages="
                f"{f.num_warps}/{f.tiles}/{f.heads_ahead}/{f.num_stages} bwd {w.num_warps}/{w.tiles}/{w.heads_ahead}/"
                f"{w.num_stages} {mode:8s} {sec * 1e3:8.3f} ms wall {dev * 1e3:8.3f} ms kernels  (vs first: max rel err {err:.1e})",
                flush=True,
            )


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, mode in zip(axes, ("fwd", "fwd+bwd")):
        for name in dict.fromkeys(r["implementation"] for r in result["rows"]):
            pts = sorted(
                (r["L"], r.get("device_ms", r["ms"]), r["B"])
                for r in result["rows"]
                if r["implementation"] == name and r["mode"] == mode
            )
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=name)
                for L, ms, b in pts:
                    ax.annotate(f"B={b}", (L, ms), fontsize=6, textcoords="offset points", xytext=(3, 3))
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("L (tokens per row; B rows as marked)")
        c = result["config"]
        ax.set_title(f"SSD {mode}, H={c['H']} G={c['G']} P={c['P']} N={c['N']}, K={c['K']}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("ms of kernels per call" if "device_ms" in result["rows"][0] else "ms per call (wall)")
    axes[0].legend()
    fig.suptitle(f"{result['device']}, jax {result['jax']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="16x1024,16x2048,8x4096,8x8192,4x16384,4x32768", help="BxL,BxL,...")
    ap.add_argument("--implementations", default="pallas_gpu,chunked,associative")
    ap.add_argument("--token-chunk", type=int, default=8)
    ap.add_argument("--offset", type=int, default=3)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--heads", type=int, default=HEADS, help="H (the model's stacked K/V SSMs: 16)")
    ap.add_argument("--groups", type=int, default=GROUPS, help="G (the model's stacked K/V SSMs: 2)")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument(
        "--doc-length", type=int, default=1024, help=f"mean document length of implementations named NAME{DOCS}"
    )
    add_kernel_bench_args(ap, out="ssd.json", sweep_help="BxL at which to sweep the kernel's tile sizes")
    a = ap.parse_args()
    if a.plot:
        plot(json.load(open(a.plot)), a.png or a.plot.replace(".json", ".png"))
        return
    grid = ChunkGrid(a.token_chunk, a.offset)
    dtype = jnp.dtype(a.dtype)
    sizes = [tuple(int(v) for v in s.split("x")) for s in a.sizes.split(",")]
    device = jax.devices()[0].device_kind
    print(f"device {device}, jax {jax.__version__}, python {platform.python_version()}", flush=True)
    bandwidth = copy_bandwidth()
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s (bytes read + written per second of kernel time)", flush=True)
    result = {
        "device": device,
        "jax": jax.__version__,
        "copy_bandwidth_Bps": bandwidth,
        "config": {
            "H": a.heads,
            "P": HEAD_DIM,
            "N": STATE,
            "G": a.groups,
            "K": a.token_chunk,
            "offset": a.offset,
            "dtype": a.dtype,
            "reps": a.reps,
            "trials": a.trials,
            "doc_length": a.doc_length,
        },
    }
    for key in ("check", "sweep", "rows", "agreement"):
        result[key] = []

    def record(key, item):
        result[key].append(item)
        save(result, a.out)

    if a.check:
        case_ids = {int(c) for c in a.check_cases.split(",")} if a.check_cases else None
        check(record, a.check_dtypes.split(","), case_ids, interpret=a.interpret)
    if a.sweep:
        b, t = (int(v) for v in a.sweep.split("x"))
        sweep(record, b, t, grid, dtype, a.reps, a.trials, bandwidth, a.heads, a.groups, a.interpret)
    bench(
        record,
        sizes,
        a.implementations.split(","),
        grid,
        dtype,
        a.reps,
        a.trials,
        a.interpret,
        bandwidth,
        a.heads,
        a.groups,
        a.doc_length,
    )
    result["document_ratios"] = document_ratios(result["rows"], ("B", "L", "mode"), "device_ms")
    save(result, a.out)
    print(f"wrote {a.out}")
    plot(result, a.png or a.out.replace(".json", ".png"))
    print("\n  B x L       implementation  mode      wall ms  kernel ms    GB/s   % copy BW")
    for r in result["rows"]:
        print(
            f"{r['B']:3d} x {r['L']:<6d}  {r['implementation']:14s}  {r['mode']:8s} {r['ms']:8.3f}  {r['device_ms']:8.3f}  "
            f"{r['GB/s']:8.1f}  {100 * r['fraction_of_copy_bw']:5.1f}"
        )
    if result["document_ratios"]:
        print(f"\n  packed documents (mean {a.doc_length} tokens) over plain rows, kernel time")
        for r in result["document_ratios"]:
            print(f"{r['B']:3d} x {r['L']:<6d}  {r['implementation']:14s}  {r['mode']:8s} {r['ratio']:.3f}")


if __name__ == "__main__":
    main()
