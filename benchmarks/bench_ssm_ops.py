"""The SSMs' ops around the SSD core: their GPU kernels against the XLA paths, and the kernels'
launch settings swept.

``ssm_conv`` (the in-projection's split, chunk-causal conv + SiLU, softplus) and ``gated_norm``
(RMSNorm_groups(y·silu(z))·w) at the model's stacked K/V shape (2 streams of H = 8 heads of
P = 32, state N = 32, G = 1, conv width 4; K = 8 with offset 3), bf16. For each B×L and
implementation it times the forward and forward+backward and reports wall-clock ms, the kernels'
own ms (profiler) and the bandwidth of the bytes the op must move (each input read once, each
output written once; weights and per-program partial sums not counted) over the kernels' time.
Timing as in ``bench_ssd.py`` (``benchmarks.timing``): calls rotate over input sets of >= 256 MB
together so that no call is served from the L2 left by the one before.

Every kernel row is held to the XLA path's outputs and gradients on the same inputs
(``max_rel_err_vs_xla``). ``--sweep BxL`` times each op's launch settings in ``SWEEPS`` there.

    python -m benchmarks.bench_ssm_ops --sizes 16x1024,4x4096,1x32768 --sweep 16x1024 --out ops.json   # GPU
    python -m benchmarks.bench_ssm_ops --sizes 2x64 --reps 2 --trials 1 --interpret --out /tmp/o.json # CPU smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import platform

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.timing import bandwidth_row, copy_bandwidth, device_seconds, nbytes, rel_err, save, stamp, time_calls
from pallas_kernels.chunk_grid import ChunkGrid
from pallas_kernels.gated_norm import gated_norm
from pallas_kernels.gated_norm import pallas_gpu as gated_norm_gpu
from pallas_kernels.ssm_conv import pallas_gpu as ssm_conv_gpu
from pallas_kernels.ssm_conv import ssm_conv
from pallas_kernels.ssm_sizes import SsmSizes

SIZES = SsmSizes(streams=2, heads=8, head_dim=32, state=32, groups=1, eps=1e-5)
CONV_WIDTH, GRID = 4, ChunkGrid(8, 3)
SWEEPS = {  # launch settings timed by --sweep; the first is each kernel's default
    "ssm_conv": [
        ssm_conv_gpu.Launch(),
        ssm_conv_gpu.Launch(slab=64),  # the first default
        ssm_conv_gpu.Launch(slab=64, num_warps=8),
        ssm_conv_gpu.Launch(num_warps=2),
        ssm_conv_gpu.Launch(num_warps=8),
        ssm_conv_gpu.Launch(rows=32, num_warps=8),
        ssm_conv_gpu.Launch(rows=8, num_warps=2),
    ],
    "gated_norm": [
        gated_norm_gpu.Launch(),
        gated_norm_gpu.Launch(tile=4096, steps=1),  # the first default: the 16 rows at once
        gated_norm_gpu.Launch(tile=2048, steps=1),
        gated_norm_gpu.Launch(tile=1024, steps=1),
        gated_norm_gpu.Launch(tile=4096, steps=1, num_warps=8),
        gated_norm_gpu.Launch(tile=1024, steps=16),
        gated_norm_gpu.Launch(tile=2048, steps=8, num_warps=8),
        gated_norm_gpu.Launch(tile=512, steps=8),
    ],
}


def _conv_inputs(key, b, t, dtype):
    """(in-projection, conv weight, dt bias, positions), the differentiated arguments' indices."""
    k = jax.random.split(key, 3)
    u = jax.random.normal(k[0], (b, t, SIZES.streams * SIZES.projection)).astype(dtype)
    w = 0.5 * jax.random.normal(k[1], (SIZES.streams * SIZES.conv_channels, CONV_WIDTH))
    bias = jax.random.normal(k[2], (SIZES.streams * SIZES.heads,))
    position = jnp.asarray(GRID.position_in_chunk(np.arange(t)))
    return (u, w, bias, position), (0, 1, 2)


def _norm_inputs(key, b, t, dtype):
    k = jax.random.split(key, 3)
    c = SIZES.streams * SIZES.inner
    y = jax.random.normal(k[0], (b, t, c)).astype(dtype)
    z = jax.random.normal(k[1], (b, t, c)).astype(dtype)
    return (y, z, 1.0 + 0.1 * jax.random.normal(k[2], (c,))), (0, 1, 2)


OPS = {  # name -> (inputs, fn(implementation or Launch, interpret) -> the op on those inputs)
    "ssm_conv": (
        _conv_inputs,
        lambda impl, interpret: (
            (lambda *a: ssm_conv(*a, sizes=SIZES, implementation=impl))
            if isinstance(impl, str)
            else (lambda *a: ssm_conv_gpu.ssm_conv_pallas_gpu(*a, sizes=SIZES, interpret=interpret, launch=impl))
        ),
    ),
    "gated_norm": (
        _norm_inputs,
        lambda impl, interpret: (
            (lambda *a: gated_norm(*a, groups=SIZES.streams * SIZES.groups, eps=SIZES.eps, implementation=impl))
            if isinstance(impl, str)
            else (
                lambda *a: gated_norm_gpu.gated_norm_pallas_gpu(
                    *a, groups=SIZES.streams * SIZES.groups, eps=SIZES.eps, interpret=interpret, launch=impl
                )
            )
        ),
    ),
}


def fwd_bwd(fn, diff):
    """fn's outputs and its vjp for cotangents ``cots`` (the arguments in ``diff`` differentiated)."""

    def run(args, cots):
        fixed = lambda *d: fn(*[d[diff.index(i)] if i in diff else a for i, a in enumerate(args)])
        out, vjp = jax.vjp(fixed, *[args[i] for i in diff])
        return out, vjp(cots)

    return run


def ones_like(outs):
    """Cotangents of ones for outputs (or their shapes) ``outs``."""
    return jax.tree.map(lambda o: jnp.ones(o.shape, o.dtype), outs)


def _case(op: str, b: int, t: int, dtype):
    """-> (input sets (>= 256 MB together, at most 32), cotangents, diff indices, {mode: bytes moved})."""
    inputs, _ = OPS[op]
    args, diff = inputs(jax.random.key(b * t), b, t, dtype)
    outs = jax.eval_shape(OPS[op][1]("xla", False), *args)
    cots = ones_like(outs)
    read, written = nbytes([args[i] for i in diff if args[i].ndim == 3]), nbytes(outs)
    moved = {"fwd": read + written, "fwd+bwd": (read + written) + (read + written + read)}
    sets = min(32, max(1, math.ceil((256 << 20) / (read + written))))
    arg_sets = [args] + [inputs(jax.random.key(b * t + i), b, t, dtype)[0] for i in range(1, sets)]
    return arg_sets, cots, diff, moved


def _label(impl) -> str:
    if isinstance(impl, str):
        return impl
    return "pallas_gpu " + ",".join(f"{k}={v}" for k, v in dataclasses.asdict(impl).items())


def time_op(record, key, op, b, t, impls, dtype, reps, trials, interpret, bandwidth) -> None:
    arg_sets, cots, diff, moved = _case(op, b, t, dtype)
    want = {}
    for impl in ["xla", *impls]:
        fn = OPS[op][1](impl, interpret)
        for mode, run in (
            ("fwd", jax.jit(lambda args, _, fn=fn: fn(*args))),
            ("fwd+bwd", jax.jit(fwd_bwd(fn, diff))),
        ):
            call_sets = [(a, cots) for a in arg_sets]
            try:
                sec, out = time_calls(run, call_sets, reps, trials)
                dev = device_seconds(run, call_sets, reps)
            except Exception as e:  # a launch that does not compile is no result
                print(f"  {op} {_label(impl)} {mode} failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
                continue
            leaves = jax.tree.leaves(out)
            want.setdefault(mode, leaves)
            err = max(rel_err(a, r) for a, r in zip(leaves, want[mode]))
            row = {"op": op, **bandwidth_row(b, t, _label(impl), mode, sec, dev, moved[mode], bandwidth)}
            row["max_rel_err_vs_xla"] = err
            gbps = row["GB/s"]
            record(key, row)
            print(
                f"{stamp()} {op:10s} {b:3d}x{t:<6d} {row['implementation']:42s} {mode:8s} {sec * 1e3:8.3f} ms wall "
                f"{dev * 1e3:8.3f} ms kernels {gbps:7.1f} GB/s  (vs xla: {err:.1e})",
                flush=True,
            )


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="16x1024,8x2048,4x4096,1x32768", help="BxL,BxL,...")
    ap.add_argument("--ops", default="ssm_conv,gated_norm")
    ap.add_argument("--sweep", default="", help="BxL at which to time every launch setting in SWEEPS")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument(
        "--interpret", action="store_true", help="run the kernels in the Pallas interpreter (CPU smoke run)"
    )
    ap.add_argument("--out", default="ssm_ops.json")
    a = ap.parse_args()
    dtype, ops = jnp.dtype(a.dtype), a.ops.split(",")
    device = jax.devices()[0].device_kind
    print(f"device {device}, jax {jax.__version__}, python {platform.python_version()}", flush=True)
    bandwidth = copy_bandwidth()
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s (bytes read + written per second of kernel time)", flush=True)
    result = {"device": device, "jax": jax.__version__, "copy_bandwidth_Bps": bandwidth, "sweep": [], "rows": []}
    result["config"] = {**dataclasses.asdict(SIZES), "conv_width": CONV_WIDTH, "K": GRID.token_chunk}
    result["config"].update(offset=GRID.offset, dtype=a.dtype, reps=a.reps, trials=a.trials)

    def record(key, item):
        result[key].append(item)
        save(result, a.out)

    # The kernel as the model calls it (through the op's dispatch); in the interpreter, its default launch.
    kernel = lambda op: SWEEPS[op][0] if a.interpret else "pallas_gpu"
    if a.sweep:
        b, t = (int(v) for v in a.sweep.split("x"))
        for op in ops:
            time_op(record, "sweep", op, b, t, SWEEPS[op], dtype, a.reps, a.trials, a.interpret, bandwidth)
    for b, t in (tuple(int(v) for v in s.split("x")) for s in a.sizes.split(",")):
        for op in ops:
            time_op(record, "rows", op, b, t, [kernel(op)], dtype, a.reps, a.trials, a.interpret, bandwidth)
    print(f"wrote {a.out}")
    print("\n  op          B x L     implementation                              mode     kernel ms  GB/s  % copy")
    for key in ("sweep", "rows"):
        for r in result[key]:
            print(
                f"  {r['op']:10s} {r['B']:3d}x{r['L']:<6d} {r['implementation']:42s} {r['mode']:8s} "
                f"{r['device_ms']:8.3f} {r['GB/s']:7.1f} {100 * r['fraction_of_copy_bw']:5.1f}"
            )
    print("\n  kernel / xla, kernel time (same run)")
    base = {
        (r["op"], r["B"], r["L"], r["mode"]): r["device_ms"] for r in result["rows"] if r["implementation"] == "xla"
    }
    for r in result["rows"]:
        if r["implementation"] != "xla":
            ratio = r["device_ms"] / base[(r["op"], r["B"], r["L"], r["mode"])]
            print(f"  {r['op']:10s} {r['B']:3d}x{r['L']:<6d} {r['mode']:8s} {ratio:.3f}")


if __name__ == "__main__":
    main()
