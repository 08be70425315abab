"""Decode speed and cache size: Attamba's compressed KV cache against a transformer's full cache.

For each model, context length L and batch B, the cache is built for L + steps tokens
and filled by a synthetic prefill: every cached K/V entry and SSM state is drawn from
N(0, 1) and each row's position is set to L, as if an L-token prompt had been
prefilled. The work of a decode step (what it reads, writes and computes) does not
depend on those values, and a synthetic fill avoids running 128k-token parallel
forwards. Then ``steps`` greedy decode steps run inside one jitted ``fori_loop`` (the
loop ``generate`` runs) and are timed after a warm-up run; tokens/s = B * steps / time.

    python -m benchmarks.bench_decode --out decode.json
    python -m benchmarks.bench_decode --contexts 512 2048 --batches 1 4 --steps 4   # CPU smoke run

Weights are random (speed does not depend on them); matrices are cast once to the
compute dtype, as an inference server would store them.
"""

from __future__ import annotations

import argparse
import gzip
import json
import pathlib
import platform
import tempfile
import time

import jax
import jax.numpy as jnp

from attamba_jax.cache import Cache, cache_bytes, formula_bytes, init_cache
from attamba_jax.config import load_config
from attamba_jax.generate import decode_step
from attamba_jax.model import count_params, init_model
from benchmarks import trace_summary


def synthetic_cache(cfg, batch: int, context: int, max_len: int, seed: int = 0) -> Cache:
    """A cache as if ``context`` tokens had been prefilled, filled with N(0,1) values, leaf by leaf."""
    shapes = jax.eval_shape(lambda: init_cache(cfg, batch, max_len))
    leaves, treedef = jax.tree.flatten(shapes.layers)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    draw = jax.jit(lambda key, shape, dtype: jax.random.normal(key, shape, dtype), static_argnums=(1, 2))
    layers = jax.tree.unflatten(treedef, [draw(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])
    return Cache(
        layers=layers, positions=jnp.full((batch,), context, jnp.int32), token_chunk=shapes.token_chunk, max_len=max_len
    )


def make_decode_loop(graphdef, steps: int):
    """A jitted (params, cache, tokens) -> (cache, tokens): ``steps`` greedy decode steps."""

    def run(params, cache, tokens):
        def body(_, carry):
            cache, tokens = carry
            logits, cache = decode_step(graphdef, params, tokens, cache)
            return cache, jnp.argmax(logits, axis=-1).astype(jnp.int32)

        return jax.lax.fori_loop(0, steps, body, (cache, tokens))

    return jax.jit(run, donate_argnums=(1,))


def bench_one(
    cfg,
    graphdef,
    params,
    batch: int,
    context: int,
    steps: int,
    repeats: int,
    profile: bool = False,
    *,
    top: int = 15,
    hlo_path: str = "",
) -> dict:
    """Times ``steps`` decode steps; ``profile``: also the kernels of one run (the ``top`` costliest,
    0: all), and ``hlo_path``: the compiled program's HLO text written there (gzip)."""
    max_len = context + steps
    cache = synthetic_cache(cfg, batch, context, max_len)
    nbytes = cache_bytes(cache)
    assert nbytes == formula_bytes(cfg, batch, max_len)
    loop = make_decode_loop(graphdef, steps)
    tokens = jnp.zeros((batch,), jnp.int32)
    t0 = time.perf_counter()
    cache, tokens = jax.block_until_ready(loop(params, cache, tokens))  # compile + warm-up
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        cache = cache.replace(positions=jnp.full((batch,), context, jnp.int32))  # the same positions again
        t0 = time.perf_counter()
        cache, tokens = jax.block_until_ready(loop(params, cache, tokens))
        times.append(time.perf_counter() - t0)
    best = min(times)
    kernels = None
    if profile:  # one more run under the profiler: the kernels a step launches and their own time
        cache = cache.replace(positions=jnp.full((batch,), context, jnp.int32))
        with tempfile.TemporaryDirectory() as trace_dir:
            with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
                cache, tokens = jax.block_until_ready(loop(params, cache, tokens))
            kernels = trace_summary.kernel_table(trace_dir, steps, top=top)
        hlo = loop.lower(params, cache, tokens).compile().as_text()
        if hlo_path:
            pathlib.Path(hlo_path).parent.mkdir(parents=True, exist_ok=True)
            with gzip.open(hlo_path, "wt") as f:
                f.write(hlo)
        kernels = trace_summary.attribute(kernels, hlo)
        kernels["calls_per_step"] = sum(r["calls_per_step"] for r in kernels["families"])
    del cache
    return {
        "batch": batch,
        "context": context,
        "steps": steps,
        "cache_bytes": nbytes,
        "seconds_per_step": best / steps,
        "tokens_per_s": batch * steps / best,
        "compile_and_warmup_s": compile_s,
        "all_times_s": times,
        **({"kernels": kernels} if kernels is not None else {}),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--attamba", default="configs/paper/attamba_k8_w8.yaml")
    parser.add_argument("--transformer", default="configs/paper/transformer_isoparam.yaml")
    parser.add_argument(
        "--attamba-set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="overrides of the Attamba config, e.g. model.ssm_implementation=chunked (the XLA decode step)",
    )
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 32768, 131072])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--steps", type=int, default=32, help="decode steps per timed run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument(
        "--profile", action="store_true", help="also profile one run per row: the kernels a step launches, their time"
    )
    parser.add_argument(
        "--profile-top", type=int, default=15, help="how many of the costliest kernels a profile lists (0: all)"
    )
    parser.add_argument(
        "--hlo-dir", default="", help="with --profile: also write each row's compiled HLO text here (gzip)"
    )
    args = parser.parse_args()
    if args.hlo_dir and not args.profile:
        parser.error("--hlo-dir writes the programs of profiled rows: add --profile")
    if args.profile_top < 0:
        parser.error(f"--profile-top must be 0 (all) or more, got {args.profile_top}")

    device = jax.devices()[0]
    header = {
        "device": getattr(device, "device_kind", str(device)),
        "backend": jax.default_backend(),
        "jax": jax.__version__,
        "python": platform.python_version(),
        "dtype": args.dtype,
        "attamba_overrides": args.attamba_set,
        "steps": args.steps,
        "prefill": "synthetic: cache entries ~ N(0,1), positions set to the context length",
    }
    print(json.dumps(header))
    models = {}
    compute = jnp.dtype(args.dtype)
    for name, path, overrides in (
        ("attamba", args.attamba, args.attamba_set),
        ("transformer", args.transformer, []),
    ):
        cfg = load_config(path, [f"model.dtype={args.dtype}", *overrides]).model
        graphdef, params = init_model(cfg, seed=0)
        params = jax.tree.map(lambda x: x.astype(compute) if x.ndim >= 2 else x, params)
        models[name] = (cfg, graphdef, params)
        print(f"{name}: {path}, {count_params(params):,} parameters", flush=True)

    rows = []
    for context in args.contexts:
        for batch in args.batches:
            for name, (cfg, graphdef, params) in models.items():
                try:
                    hlo_path = f"{args.hlo_dir}/{name}_{batch}x{context}.hlo.txt.gz" if args.hlo_dir else ""
                    result = bench_one(
                        cfg,
                        graphdef,
                        params,
                        batch,
                        context,
                        args.steps,
                        args.repeats,
                        args.profile,
                        top=args.profile_top,
                        hlo_path=hlo_path,
                    )
                except Exception as e:  # e.g. out of device memory at the largest sizes
                    result = {"batch": batch, "context": context, "error": f"{type(e).__name__}: {str(e)[:200]}"}
                result["model"] = name
                rows.append(result)
                if "error" in result:
                    print(f"{name:<12} L={context:<7} B={batch:<3} {result['error']}", flush=True)
                else:
                    print(
                        f"{name:<12} L={context:<7} B={batch:<3} {result['cache_bytes'] / 2**20:10.1f} MiB "
                        f"{result['seconds_per_step'] * 1e3:8.3f} ms/step {result['tokens_per_s']:10.1f} tok/s "
                        f"(compile+warm-up {result['compile_and_warmup_s']:.1f} s)",
                        flush=True,
                    )
                    if "kernels" in result:
                        k = result["kernels"]
                        title = f"{name} L={context} B={batch}: {k['calls_per_step']:.0f} kernels per step"
                        print(trace_summary.format_table(k, title), flush=True)

    # The comparison table: ratios are Attamba / transformer, measured in this one run.
    print(
        "\n| context | batch | Attamba cache | transformer cache | cache ratio | Attamba tok/s | transformer tok/s | speed-up |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    table = []
    for context in args.contexts:
        for batch in args.batches:
            a, t = (
                {r["model"]: r for r in rows if r["context"] == context and r["batch"] == batch}[m]
                for m in ("attamba", "transformer")
            )
            ratio = a["cache_bytes"] / t["cache_bytes"] if "error" not in a and "error" not in t else None
            speed = a["tokens_per_s"] / t["tokens_per_s"] if "error" not in a and "error" not in t else None
            fmt_bytes = lambda r: f"{r['cache_bytes'] / 2**20:.1f} MiB" if "error" not in r else "error"
            fmt_tps = lambda r: f"{r['tokens_per_s']:.1f}" if "error" not in r else "error"
            print(
                f"| {context} | {batch} | {fmt_bytes(a)} | {fmt_bytes(t)} | {'' if ratio is None else f'{ratio:.3f}'} | "
                f"{fmt_tps(a)} | {fmt_tps(t)} | {'' if speed is None else f'{speed:.2f}x'} |"
            )
            table.append({"context": context, "batch": batch, "cache_ratio": ratio, "speedup": speed})
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"header": header, "rows": rows, "table": table}, f, indent=1)


if __name__ == "__main__":
    main()
