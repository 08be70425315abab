"""The Mamba-2 block core (conv, SSD, gate, norm): the fused GPU kernel against the separate ops.

The model's stacked shape: S = 2 streams (Attamba's K and V SSMs) of I = 256, Hs = 8 heads of
P = 32, G = 1, N = 32, a 4-tap conv, K = 8, bf16 activations. For each B×L it times the forward
and forward+backward of

- ``pallas_gpu_fused``: the one fused kernel (``pallas_kernels/ssm_block/pallas_gpu.py``);
- ``pallas_gpu``: XLA's conv, softplus, gate and norm around the SSD Pallas kernel;
- ``chunked``: the same around XLA's chunked SSD;

and the bytes the fused op must move (read zxbcdt, write the output; backward: read zxbcdt and
d(out), write d(zxbcdt)) over its time, against the copy bandwidth measured in the same run.
``--check`` first holds the fused kernel to the composition with the sequential SSD on the device,
float32 and bfloat16, forward and every gradient, with its output buffers poisoned with NaN.

    PYTHONPATH=. python benchmarks/bench_ssm_block.py --check --out ssm_block.json      # on the GPU
    PYTHONPATH=. python benchmarks/bench_ssm_block.py --sizes 1x64 --reps 1 --interpret --out /tmp/b.json  # CPU smoke
"""

from __future__ import annotations

import argparse
import functools
import math
import platform

import jax
import jax.numpy as jnp
from bench_ssd import copy_bandwidth  # benchmarks/bench_ssd.py
from timing import rel_err, save, stamp, time_calls  # benchmarks/timing.py

from attamba_jax.chunking import ChunkGrid
from pallas_kernels.ssm_block import SsmDims, pallas_gpu, ssm_block
from pallas_kernels.ssm_block.reference import ssm_block_composed

DIMS, STREAMS, TAPS, EPS = SsmDims(inner=256, heads=8, groups=1, state=32), 2, 4, 1e-5


def _inputs(key, b, t, dtype, dims=DIMS, s=STREAMS, bias=False):
    ks = jax.random.split(key, 7)
    heads = s * dims.heads
    zx = jax.random.normal(ks[0], (b, t, s, dims.width)).astype(dtype)
    conv = 0.5 * jax.random.normal(ks[1], (s * dims.conv_channels, TAPS))
    dt_bias = 0.3 * jax.random.normal(ks[2], (heads,)) if bias else None
    A = -jnp.exp(jax.random.uniform(ks[3], (heads,), minval=0.0, maxval=math.log(16.0)))
    D = jax.random.normal(ks[4], (heads,))
    norm = 1.0 + 0.2 * jax.random.normal(ks[5], (s * dims.inner,))
    dout = jax.random.normal(ks[6], (b, t, s, dims.inner)).astype(dtype)
    return (zx, conv, dt_bias, A, D, norm), dout


def _fwd_bwd(impl):
    def run(zx, conv, dt_bias, A, D, norm, dout):
        y, vjp = jax.vjp(impl, zx, conv, dt_bias, A, D, norm)
        return y, vjp(dout)

    return run


def _impl(name, grid, interpret, dims=DIMS, warps=None):
    if name == "pallas_gpu_fused":
        kw = {"num_warps": warps} if warps else {}
        return functools.partial(pallas_gpu.ssm_block_pallas_gpu, dims=dims, grid=grid, eps=EPS, interpret=interpret, **kw)
    if name == "sequential-f32":
        return functools.partial(ssm_block_composed, dims=dims, grid=grid, eps=EPS, ssd_implementation="sequential")
    return functools.partial(ssm_block, dims=dims, grid=grid, eps=EPS, implementation=name)


def check(record, interpret=False, case_ids=None) -> None:
    """Fused kernel vs the composition (sequential SSD, float32 math) on the device."""
    tolerances = {"float32": 1e-5, "bfloat16": 1e-2}
    cases = [(8, 0, 2, 1000, DIMS, True), (8, 5, 1, 777, DIMS, False), (4, 2, 2, 300, SsmDims(64, 2, 2, 16), True)]
    for dtype_name, tol in tolerances.items():
        for seed, (k, o, b, t, dims, bias) in enumerate(cases):
            if case_ids is not None and seed not in case_ids:
                continue
            grid = ChunkGrid(k, o)
            args, dout = _inputs(jax.random.key(seed), b, t, jnp.dtype(dtype_name), dims=dims, bias=bias)
            exact_args = (args[0].astype(jnp.float32), args[1].astype(jnp.dtype(dtype_name)).astype(jnp.float32), *args[2:])
            try:
                with jax.default_matmul_precision("highest"):
                    y_ref, g_ref = jax.jit(_fwd_bwd(_impl("sequential-f32", grid, interpret, dims)))(*exact_args, dout.astype(jnp.float32))
                y, grads = jax.jit(_fwd_bwd(_impl("pallas_gpu_fused", grid, interpret, dims)))(*args, dout)
                block = max(16, 1 << (k - 1).bit_length())
                poisoned, y_saved, rstd = jax.jit(lambda *a: pallas_gpu._forward(
                    *a, dims, grid, EPS, block, 4, interpret, save=True, poison=True))(*args)
                dzx = jax.jit(lambda *a: pallas_gpu._backward(*a, dims, grid, block, 4, interpret, poison=True)[0])(
                    *args, y_saved, rstd, dout)
            except Exception as e:  # a compile or runtime failure is a failed check, not a crash
                record("check", {"K": k, "T": t, "dtype": dtype_name, "ok": False, "error": f"{type(e).__name__}: {e}"[:2000]})
                print(f"check ssm_block K={k} T={t} {dtype_name}: FAIL {type(e).__name__}: {str(e)[:800]}", flush=True)
                continue
            names = ("zxbcdt", "conv", "dt_bias", "A", "D", "norm")
            errs = {"y": rel_err(y, y_ref), "poisoned_y": rel_err(poisoned, y_ref), "poisoned_dzx": rel_err(dzx, g_ref[0])}
            errs.update({f"d{n}": rel_err(a, r) for n, a, r in zip(names, grads, g_ref) if a is not None})
            finite = all(bool(jnp.isfinite(a).all()) for a in (y, poisoned, dzx, *[g for g in grads if g is not None]))
            ok = finite and max(errs.values()) <= tol
            record("check", {"K": k, "offset": o, "B": b, "T": t, "dims": list(dims), "dtype": dtype_name, "tolerance": tol,
                             "max_rel_err": max(errs.values()), "errors": errs, "finite": finite, "ok": ok})
            print(f"{stamp()} check ssm_block {dtype_name:8s} K={k} o={o} B={b} T={t:5d} {tuple(dims)}: max rel err "
                  f"{max(errs.values()):.2e} (tol {tol:.0e}) finite={finite} {'OK' if ok else 'FAIL'}", flush=True)


def bench(record, sizes, implementations, grid, dtype, reps, trials, interpret, bandwidth, warps_sweep=()) -> None:
    nbytes = lambda *a: sum(x.size * x.dtype.itemsize for x in a)
    for b, t in sizes:
        args, dout = _inputs(jax.random.key(b * t), b, t, dtype)
        zx = args[0]
        moved = {"fwd": nbytes(zx, dout), "fwd+bwd": nbytes(zx, dout) + 2 * nbytes(zx) + nbytes(dout)}
        num_sets = min(16, max(1, math.ceil((256 << 20) / moved["fwd"])))
        sets = [args] + [_inputs(jax.random.key(b * t + i), b, t, dtype)[0] for i in range(1, num_sets)]
        variants = [(name, None) for name in implementations] + [("pallas_gpu_fused", w) for w in warps_sweep]
        first = {}
        for name, warps in variants:
            impl = _impl(name, grid, interpret, warps=warps)
            label = name if warps is None else f"{name} warps={warps[0]}/{warps[1]}"
            for mode, fn in (("fwd", jax.jit(impl)), ("fwd+bwd", jax.jit(_fwd_bwd(impl)))):
                call_sets = sets if mode == "fwd" else [(*s, dout) for s in sets]
                try:
                    sec, out = time_calls(fn, call_sets, reps, trials)
                except Exception as e:
                    print(f"skip {label} {mode} {b}x{t}: {type(e).__name__}: {str(e)[:300]}", flush=True)
                    continue
                leaves = [a for a in jax.tree.leaves(out)]
                first.setdefault(mode, leaves)
                err = max(rel_err(a, r) for a, r in zip(leaves, first[mode]))
                gbps = moved[mode] / sec / 1e9
                row = {"B": b, "L": t, "implementation": label, "mode": mode, "ms": sec * 1e3, "bytes": moved[mode],
                       "GB/s": gbps, "fraction_of_copy_bw": gbps * 1e9 / bandwidth, "max_rel_err_vs_first": err}
                record("rows", row)
                print(f"{stamp()} {b:3d}x{t:<6d} {label:32s} {mode:8s} {sec * 1e3:9.3f} ms {gbps:8.1f} GB/s "
                      f"{100 * row['fraction_of_copy_bw']:5.1f}% of copy  (vs first: {err:.1e})", flush=True)
                del out, leaves


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="16x1024,4x4096,1x16384,4x32768", help="BxL,...")
    ap.add_argument("--implementations", default="pallas_gpu_fused,pallas_gpu,chunked")
    ap.add_argument("--warps", default="", help="extra fused-kernel runs, 'fwd/bwd,...' warps per program")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--check-cases", default="", help="indices of the check cases to run (default: all)")
    ap.add_argument("--interpret", action="store_true", help="run the kernel in the Pallas interpreter (CPU smoke run)")
    ap.add_argument("--out", default="ssm_block.json")
    args = ap.parse_args()
    result = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "python": platform.python_version(),
              "config": {"dims": DIMS._asdict(), "streams": STREAMS, "taps": TAPS, "K": 8, "dtype": args.dtype}}

    def record(key, row):
        result.setdefault(key, []).append(row)
        save(result, args.out)

    if args.check:
        check(record, args.interpret, [int(c) for c in args.check_cases.split(",")] if args.check_cases else None)
    bandwidth = copy_bandwidth()
    result["copy_GBps"] = bandwidth / 1e9
    print(f"{stamp()} copy bandwidth {bandwidth / 1e9:.0f} GB/s", flush=True)
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",") if s]
    warps = [tuple(int(v) for v in w.split("/")) for w in args.warps.split(",") if w]
    bench(record, sizes, args.implementations.split(","), ChunkGrid(8, 0), jnp.dtype(args.dtype), args.reps, args.trials,
          args.interpret, bandwidth, warps)
    save(result, args.out)


if __name__ == "__main__":
    main()
