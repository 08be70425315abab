"""Attamba attention speed: the Pallas kernel against the XLA ``compressed`` and ``dense`` paths
and against cuDNN's full causal flash attention (what a same-size transformer runs).

Paper sizes: H = Hkv = 8 heads of D = 64, bf16, W = 8, layer 0's grid (offset 0),
K in {4, 8, 16}, L = 1k ... 64k with B = max(1, tokens // L) rows (32k tokens by default).
Forward and forward+backward (gradients of q, k and v). ``dense`` is skipped where its
[B, H, L, L] float32 scores would pass ``--dense-max-gb``, ``compressed`` where its
[B, H, L, L/K] scores would pass ``--compressed-max-gb``.

Timing: jit, one compile run, a warm-up call, then ``reps`` calls queued back to back
and one block_until_ready; the per-call mean, median of ``trials`` rounds. Ratios are
between numbers of this one run. TFLOP/s counts the useful work only: 4·D FLOPs per
(query, visible key) pair and head forward, 3.5× that forward+backward.

An implementation named ``NAME+docs`` runs NAME on packed rows (documents of mean length
``--doc-length`` at multiples of K; ``cudnn+docs`` the transformer's masked path), and a last
table gives its time over NAME's.

    python -m benchmarks.bench_attention --check --out attention.json     # on the GPU
    python -m benchmarks.bench_attention --plot attention.json                          # redraw the PNG
    python -m benchmarks.bench_attention --lengths 256 --chunks 4 --tokens 256 \\
        --implementations pallas_gpu,compressed --interpret --reps 1 --out /tmp/a.json  # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import platform

import jax
import jax.numpy as jnp

from benchmarks.timing import (
    DOCS,
    add_kernel_bench_args,
    document_ratios,
    packed_starts,
    rel_err,
    save,
    stamp,
    time_calls,
)
from pallas_kernels.boundary_window_attention import boundary_window_attention, pallas_gpu, reference
from pallas_kernels.boundary_window_attention.block_sizes import GpuBlocks
from pallas_kernels.causal_attention import causal_attention
from pallas_kernels.chunk_grid import ChunkGrid
from pallas_kernels.visibility import Visibility

HEADS, KV_HEADS, HEAD_DIM = 8, 8, 64


def _inputs(key, b, t, dtype, h=HEADS, hkv=KV_HEADS, d=HEAD_DIM):
    ks = jax.random.split(key, 4)
    q = jax.random.normal(ks[0], (b, t, h, d), jnp.float32).astype(dtype)
    k = jax.random.normal(ks[1], (b, t, hkv, d), jnp.float32).astype(dtype)
    v = jax.random.normal(ks[2], (b, t, hkv, d), jnp.float32).astype(dtype)
    do = jax.random.normal(ks[3], (b, t, h, d), jnp.float32).astype(dtype)
    return q, k, v, do


def _fwd_bwd(impl):
    def run(q, k, v, do):
        o, vjp = jax.vjp(impl, q, k, v)
        return o, vjp(do)

    return run


def _impl(name, grid, window, interpret=False, blocks=None, document_start=None):
    if name == "cudnn":
        return lambda q, k, v: causal_attention(q, k, v, implementation="cudnn", document_start=document_start)
    if name == "pallas_gpu":
        return lambda q, k, v: pallas_gpu.attention_pallas_gpu(
            q, k, v, grid=grid, window=window, interpret=interpret, blocks=blocks, document_start=document_start
        )
    return lambda q, k, v: boundary_window_attention(
        q, k, v, grid=grid, window=window, implementation=name, document_start=document_start
    )


# --- correctness on the device ---------------------------------------------------------


def check(record, dtypes=("float32", "bfloat16"), case_ids=None, seed: int = 0, interpret: bool = False) -> None:
    """The kernel against the dense reference on the device: fresh inputs, forward and the q, k, v
    gradients, f32 and bf16, GQA, offsets, ragged lengths, then again with every kernel output poisoned with NaN."""
    cases = [(4, 0, 8, 2, 1000, 8, 8), (8, 5, 8, 2, 777, 8, 2), (16, 3, 32, 1, 1500, 4, 1), (8, 7, 0, 1, 300, 6, 3)]
    tolerances = {"float32": 1e-5, "bfloat16": 1e-2}
    for dtype_name in dtypes:
        dtype, tol = jnp.dtype(dtype_name), tolerances[dtype_name]
        for case_id, (k, o, w, b, t, h, hkv) in enumerate(cases):
            seed += 1
            if case_ids is not None and case_id not in case_ids:
                continue
            try:
                record("check", _check_one(seed, k, o, w, b, t, h, hkv, dtype, tol, interpret))
            except Exception as e:  # a compile or runtime failure is a failed check, not a crash
                record(
                    "check",
                    {
                        "K": k,
                        "offset": o,
                        "W": w,
                        "T": t,
                        "dtype": jnp.dtype(dtype).name,
                        "ok": False,
                        "error": f"{type(e).__name__}: {e}"[:2000],
                    },
                )
                print(
                    f"check attention K={k} o={o} T={t} {jnp.dtype(dtype).name}: FAIL {type(e).__name__}: {str(e)[:500]}",
                    flush=True,
                )


def _check_one(seed, k, o, w, b, t, h, hkv, dtype, tol, interpret=False) -> dict:
    """One case: the kernels' forward and gradients, as they run and with every output poisoned, against the dense reference."""
    grid = ChunkGrid(k, o)
    q, kk, v, do = _inputs(jax.random.key(seed), b, t, dtype, h=h, hkv=hkv)
    with jax.default_matmul_precision("highest"):
        o_ref, g_ref = jax.jit(_fwd_bwd(lambda *a: reference.attention_dense(*a, grid=grid, window=w)))(q, kk, v, do)
    out, grads = jax.jit(_fwd_bwd(_impl("pallas_gpu", grid, w, interpret)))(q, kk, v, do)
    poisoned = lambda q, k, v: pallas_gpu.attention_pallas_gpu(
        q, k, v, grid=grid, window=w, interpret=interpret, poison=True
    )
    pout, pgrads = jax.jit(_fwd_bwd(poisoned))(q, kk, v, do)
    errs = {"o": rel_err(out, o_ref), "poisoned_o": rel_err(pout, o_ref)}
    errs.update({f"d{n}": rel_err(a, r) for n, a, r in zip("qkv", grads, g_ref)})
    errs.update({f"poisoned_d{n}": rel_err(a, r) for n, a, r in zip("qkv", pgrads, g_ref)})
    finite = all(bool(jnp.isfinite(a).all()) for a in (out, pout, *grads, *pgrads))
    ok = finite and max(errs.values()) <= tol
    print(
        f"{stamp()} check attention {jnp.dtype(dtype).name:8s} K={k:2d} o={o:2d} W={w:2d} B={b} T={t:5d} H={h} Hkv={hkv}: "
        f"max rel err {max(errs.values()):.2e} (tol {tol:.0e}) finite={finite} {'OK' if ok else 'FAIL'}",
        flush=True,
    )
    return {
        "K": k,
        "offset": o,
        "W": w,
        "B": b,
        "T": t,
        "H": h,
        "Hkv": hkv,
        "dtype": jnp.dtype(dtype).name,
        "tolerance": tol,
        "max_rel_err": max(errs.values()),
        "errors": errs,
        "finite": finite,
        "ok": ok,
    }


# --- timing -----------------------------------------------------------------------------


def _pairs(t: int, grid: ChunkGrid | None, window: int | None) -> int:
    """(query, visible key) pairs per row and head."""
    return int(Visibility(grid, window).keys_per_query(t).sum())


def bench(
    record,
    lengths,
    chunks,
    window,
    tokens,
    implementations,
    reps,
    trials,
    dense_max_gb,
    compressed_max_gb,
    interpret,
    doc_length=1024,
):
    for t in lengths:
        b = max(1, tokens // t)
        q, k, v, do = _inputs(jax.random.key(t), b, t, jnp.bfloat16)
        kernel_out = {}  # (K, mode, documents) -> the Pallas kernel's output, to hold the other paths against
        for name in implementations:
            base, docs = name.removesuffix(DOCS), name.endswith(DOCS)
            for kc in [None] if base == "cudnn" else chunks:
                grid = ChunkGrid(kc) if kc else None
                if base == "dense" and b * HEADS * t * t * 4 > dense_max_gb * 2**30:
                    continue
                if base == "compressed" and b * HEADS * t * (t // kc + 1) * 4 > compressed_max_gb * 2**30:
                    continue
                starts = jnp.asarray(packed_starts(b, t, kc or 1, doc_length)) if docs else None
                impl = _impl(base, grid, window, interpret, document_start=starts)
                pairs = _pairs(t, grid, window if kc else None)
                for mode, fn, args, flop_factor in (
                    ("fwd", jax.jit(impl), (q, k, v), 1.0),
                    ("fwd+bwd", jax.jit(_fwd_bwd(impl)), (q, k, v, do), 3.5),
                ):
                    try:
                        sec, out = time_calls(fn, [args], reps, trials)
                    except Exception as e:  # out of memory, or cuDNN not applicable
                        print(f"skip {name} K={kc} {mode} L={t}: {type(e).__name__}: {str(e)[:200]}", flush=True)
                        continue
                    tflops = flop_factor * 4 * HEAD_DIM * pairs * b * HEADS / sec / 1e12
                    if base == "pallas_gpu":
                        kernel_out[(kc, mode, docs)] = out
                    elif (kc, mode, docs) in kernel_out:  # same function at full size: the kernel must agree
                        ref = kernel_out[(kc, mode, docs)]
                        err = max(rel_err(a, r) for a, r in zip(jax.tree.leaves(ref), jax.tree.leaves(out)))
                        record(
                            "agreement", {"L": t, "B": b, "K": kc, "mode": mode, "against": name, "max_rel_err": err}
                        )
                        print(
                            f"{stamp()} L={t} K={kc} {mode}: pallas_gpu{DOCS * docs} vs {name} max rel err {err:.2e}",
                            flush=True,
                        )
                    del out
                    record(
                        "rows",
                        {
                            "L": t,
                            "B": b,
                            "K": kc,
                            "implementation": name,
                            "mode": mode,
                            "ms": sec * 1e3,
                            "useful_TFLOP/s": tflops,
                        },
                    )
                    print(
                        f"{stamp()} L={t:6d} B={b:2d} {name:11s} K={kc!s:4s} {mode:8s} {sec * 1e3:10.3f} ms {tflops:7.1f} TFLOP/s",
                        flush=True,
                    )


def _try_time(fn, args, reps, trials) -> float:
    try:
        return time_calls(fn, [args], reps, trials)[0]
    except Exception as e:  # a tile that does not compile (e.g. out of shared memory) is no result
        print(f"  failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
        return float("nan")


def sweep(record, t, kc, window, tokens, reps, trials) -> None:
    """Tile sizes of the GPU kernels at one size."""
    b = max(1, tokens // t)
    q, k, v, do = _inputs(jax.random.key(7), b, t, jnp.bfloat16)
    grid = ChunkGrid(kc)
    fwd_configs = [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 64, 4, 2), (64, 32, 4, 4)]
    for bq, bk, warps, stages in fwd_configs:
        blocks = GpuBlocks(block_q=bq, block_kb=bk, block_kw=bk, num_warps=warps, num_stages=stages)
        sec = _try_time(jax.jit(_impl("pallas_gpu", grid, window, blocks=blocks)), (q, k, v), reps, trials)
        record(
            "sweep",
            {"mode": "fwd", "block_q": bq, "block_k": bk, "num_warps": warps, "num_stages": stages, "ms": sec * 1e3},
        )
        print(
            f"{stamp()} sweep attention fwd L={t} K={kc} bq={bq} bk={bk} warps={warps} stages={stages}: {sec * 1e3:.3f} ms",
            flush=True,
        )
    bwd_configs = [(64, 64, 4, 2), (32, 64, 4, 2), (64, 128, 8, 2), (128, 64, 8, 2), (64, 64, 4, 3)]
    for bqb, bkb, warps, stages in bwd_configs:
        blocks = GpuBlocks(block_q_bwd=bqb, block_kb_bwd=bkb, block_kw_bwd=bkb, num_warps_bwd=warps, num_stages=stages)
        sec = _try_time(
            jax.jit(_fwd_bwd(_impl("pallas_gpu", grid, window, blocks=blocks))), (q, k, v, do), reps, trials
        )
        record(
            "sweep",
            {
                "mode": "fwd+bwd",
                "block_q_bwd": bqb,
                "block_k_bwd": bkb,
                "num_warps_bwd": warps,
                "num_stages": stages,
                "ms": sec * 1e3,
            },
        )
        print(
            f"{stamp()} sweep attention fwd+bwd L={t} K={kc} bq_bwd={bqb} bk_bwd={bkb} warps={warps} stages={stages}: "
            f"{sec * 1e3:.3f} ms",
            flush=True,
        )


def ratios(rows) -> list[dict]:
    """Pallas time over the other paths' time, per (L, K, mode), within this run."""
    by = {(r["L"], r["K"], r["implementation"], r["mode"]): r["ms"] for r in rows}
    out = []
    for (t, kc, name, mode), ms in by.items():
        if name != "pallas_gpu":
            continue
        entry = {"L": t, "K": kc, "mode": mode, "pallas_ms": ms}
        for other in ("compressed", "dense"):
            if (t, kc, other, mode) in by:
                entry[f"vs_{other}"] = ms / by[(t, kc, other, mode)]
        if (t, None, "cudnn", mode) in by:
            entry["vs_cudnn_causal"] = ms / by[(t, None, "cudnn", mode)]
        out.append(entry)
    return out


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6), sharey=True)
    styles = {"pallas_gpu": "-", "compressed": "--", "dense": ":"}
    colors = {4: "tab:blue", 8: "tab:orange", 16: "tab:green"}
    for ax, mode in zip(axes, ("fwd", "fwd+bwd")):
        for name, kc in dict.fromkeys((r["implementation"], r["K"]) for r in rows):
            pts = sorted(
                (r["L"], r["ms"]) for r in rows if r["implementation"] == name and r["K"] == kc and r["mode"] == mode
            )
            if not pts:
                continue
            label = "cuDNN full causal" if name == "cudnn" else f"{name} K={kc}"
            style = (
                dict(color="black", linestyle="-", marker="s")
                if name == "cudnn"
                else dict(color=colors.get(kc), linestyle=styles.get(name, "-"), marker="o")
            )
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=label, markersize=3, **style)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(f"L (B = max(1, {result['config']['tokens']} // L))")
        ax.set_title(f"attention {mode}, H={HEADS} D={HEAD_DIM} W={result['config']['W']} bf16")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("ms")
    axes[1].legend(fontsize=7, ncol=2)
    fig.suptitle(f"{result['device']}, jax {result['jax']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="1024,2048,4096,8192,16384,32768,65536")
    ap.add_argument("--chunks", default="4,8,16")
    ap.add_argument("--window", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=32768, help="B = max(1, tokens // L)")
    ap.add_argument("--implementations", default="pallas_gpu,compressed,dense,cudnn")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--dense-max-gb", type=float, default=12.0)
    ap.add_argument("--compressed-max-gb", type=float, default=24.0)
    ap.add_argument(
        "--doc-length", type=int, default=1024, help=f"mean document length of implementations named NAME{DOCS}"
    )
    add_kernel_bench_args(ap, out="attention.json", sweep_help="L,K at which to sweep the kernels' tile sizes")
    a = ap.parse_args()
    if a.plot:
        plot(json.load(open(a.plot)), a.png or a.plot.replace(".json", ".png"))
        return
    device = jax.devices()[0].device_kind
    print(f"device {device}, jax {jax.__version__}, python {platform.python_version()}", flush=True)
    result = {
        "device": device,
        "jax": jax.__version__,
        "config": {
            "H": HEADS,
            "Hkv": KV_HEADS,
            "D": HEAD_DIM,
            "W": a.window,
            "tokens": a.tokens,
            "dtype": "bfloat16",
            "offset": 0,
            "reps": a.reps,
            "trials": a.trials,
            "doc_length": a.doc_length,
        },
    }
    for key in ("check", "sweep", "rows", "ratios", "agreement"):
        result[key] = []

    def record(key, item):
        result[key].append(item)
        if key == "rows":
            result["ratios"] = ratios(result["rows"])
        save(result, a.out)

    if a.check:
        case_ids = {int(c) for c in a.check_cases.split(",")} if a.check_cases else None
        check(record, a.check_dtypes.split(","), case_ids, interpret=a.interpret)
    if a.sweep:
        t, kc = (int(v) for v in a.sweep.split(","))
        sweep(record, t, kc, a.window, a.tokens, a.reps, a.trials)
    lengths = [int(v) for v in a.lengths.split(",")]
    chunks = [int(v) for v in a.chunks.split(",")]
    bench(
        record,
        lengths,
        chunks,
        a.window,
        a.tokens,
        a.implementations.split(","),
        a.reps,
        a.trials,
        a.dense_max_gb,
        a.compressed_max_gb,
        a.interpret,
        a.doc_length,
    )
    result["document_ratios"] = document_ratios(result["rows"], ("L", "B", "K", "mode"), "ms")
    save(result, a.out)
    print(f"wrote {a.out}")
    plot(result, a.png or a.out.replace(".json", ".png"))
    print("\n     L   K  mode       pallas ms  vs compressed  vs dense  vs cuDNN causal")
    fmt = lambda x: f"{x:8.3f}" if x is not None else "       -"
    for r in result["ratios"]:
        print(
            f"{r['L']:6d} {r['K']:3d}  {r['mode']:8s} {r['pallas_ms']:10.3f}  {fmt(r.get('vs_compressed'))}      "
            f"{fmt(r.get('vs_dense'))}  {fmt(r.get('vs_cudnn_causal'))}"
        )
    if result["document_ratios"]:
        print(f"\n  packed documents (mean {a.doc_length} tokens) over plain rows, wall time")
        for r in result["document_ratios"]:
            print(f"{r['L']:6d} K={r['K']!s:4s} {r['implementation']:12s} {r['mode']:8s} {r['ratio']:.3f}")


if __name__ == "__main__":
    main()
