"""Whole training step: Attamba vs the transformer, tokens/s and MFU, one process, one device.

    python -m benchmarks.bench_train_step --out train_step.json [--deadline 420]

Each case builds the model from its paper config in bfloat16 compute (float32 parameters and
AdamW state), jits the trainer's own step (``train_step.make_train_step``, donated state) and
times it on synthetic token batches as the trainer runs it: ``reps`` steps dispatched back to
back and waited on once (median of 3 such rounds; ``step_ms``). ``synced_step_ms`` is the median
step closed by its own ``block_until_ready``, which adds the host's dispatch of every step.
Attamba runs with ``auto`` kernels (Pallas on a GPU) and, where named,
with the XLA paths (``attamba-xla``: ``chunked`` SSD + ``compressed`` attention) or with every GPU
kernel named (``attamba-kernels``: also the SSMs' conv and gated norm, which ``auto`` leaves to
XLA) for comparison. MFU uses the
trainer's honest FLOP count (``flops.train_flops_per_token``: 6·matmul params + the attention
a query really computes) over the device's data-sheet bf16 peak.

``attamba-docs`` and ``transformer-docs`` run the same models on packed documents: batches cut by
the data pipeline's own packer (``data.AlignedStream``, documents aligned to ``Config.document_align``)
from documents of exponentially distributed lengths (mean ``--doc-length`` tokens), the model
reading their ``segment_ids``; their step time against the plain model's is document masking's cost.

``--profile-shapes 16x1024`` also traces a few steps of those cases with the JAX profiler and
prints (and stores in the JSON) where the device time goes, kernel by kernel, each XLA kernel with
the shape and JAX op it computes (``benchmarks/trace_summary.py``; ``--hlo-dir`` keeps the
compiled module's text to read further).
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import pathlib
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from attamba_jax import data as data_lib
from attamba_jax.config import load_config
from attamba_jax.flops import peak_flops_per_device, train_flops_per_token
from attamba_jax.model import count_params, init_model
from attamba_jax.optimizer import make_optimizer
from attamba_jax.train_step import make_train_step
from benchmarks import trace_summary
from benchmarks.timing import time_steps

ROOT = pathlib.Path(__file__).resolve().parent.parent
MODELS = {
    "attamba": ("configs/paper/attamba_k8_w8.yaml", {}),
    "attamba-xla": (
        "configs/paper/attamba_k8_w8.yaml",
        {"ssm_implementation": "chunked", "attention_implementation": "compressed"},
    ),
    # Every op on its GPU kernel, those auto does not take yet too (the SSMs' conv and gated norm).
    "attamba-kernels": (
        "configs/paper/attamba_k8_w8.yaml",
        {"ssm_implementation": "pallas_gpu", "attention_implementation": "pallas_gpu"},
    ),
    "transformer": ("configs/paper/transformer_isoparam.yaml", {}),
}
# Packed documents, each alone (data.document_masking): the model of the same name without "-docs".
DOCUMENT_MODELS = {"attamba-docs": "attamba", "transformer-docs": "transformer"}


def packed_batch(cfg, batch: int, length: int, mean_doc: int, seed: int = 0) -> dict:
    """[1, B, L] arrays as the trainer feeds them: random documents (BOS = 1, tokens >= 2) packed
    by ``data.AlignedStream`` and cut by ``data.PackedWindows`` / ``data.make_batch``."""
    rng = np.random.default_rng(seed)
    docs, total = [], 0
    while total < batch * length + 1:
        n = max(2, int(rng.exponential(mean_doc)))
        docs.append(np.concatenate([[1], rng.integers(2, cfg.model.vocab_size, n - 1)]).astype(np.int32))
        total += -(-n // cfg.document_align) * cfg.document_align
    stream = data_lib.training_stream(data_lib.TokenStream([np.concatenate(docs)]), 1, cfg.document_align)
    windows = data_lib.PackedWindows(stream, length)
    rows = np.stack([windows[i] for i in range(batch)])
    b = data_lib.make_batch(rows, bos_id=1, vocab_size=cfg.model.vocab_size, align=cfg.document_align)
    return {k: jnp.asarray(v)[None] for k, v in b.items()}


# (batch, length): equal tokens per step (16k) where the length allows it
SHAPES = [(16, 1024), (64, 1024), (8, 2048), (4, 4096), (1, 16384), (1, 32768)]
XLA_SHAPES = {(16, 1024), (1, 16384)}


def build_case(model: str, batch: int, length: int, doc_length: int = 1024):
    """-> (model config, train step (not jitted), its state, one batch) of ``model`` at B×L in bf16."""
    path, overrides = MODELS[DOCUMENT_MODELS.get(model, model)]
    full = load_config(ROOT / path, ["model.dtype=bfloat16"])
    cfg = dataclasses.replace(full.model, **overrides)
    graphdef, params = init_model(cfg, seed=0)
    tx, schedule = make_optimizer(load_config(ROOT / path).optim, 100_000)
    state = {"params": params, "opt_state": tx.init(params), "step": jnp.int32(0)}
    if model in DOCUMENT_MODELS:
        data = packed_batch(full, batch, length, doc_length)
    else:
        tokens = jax.random.randint(jax.random.key(1), (1, batch, length + 1), 0, cfg.vocab_size)
        data = {
            "inputs": tokens[..., :-1],
            "targets": tokens[..., 1:],
            "weights": jnp.ones((1, batch, length), jnp.float32),
        }
    return cfg, make_train_step(graphdef, tx, schedule), state, data


def time_case(
    model: str,
    batch: int,
    length: int,
    warmup: int,
    reps: int,
    profile_steps: int = 0,
    profile_top: int = 25,
    hlo_dir: str = "",
    doc_length: int = 1024,
) -> dict:
    cfg, step, state, data = build_case(model, batch, length, doc_length)
    n_params = count_params(state["params"])
    step = jax.jit(step, donate_argnums=0)
    t0 = time.perf_counter()
    state, metrics = step(state, data)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - t0
    for _ in range(warmup):
        state, metrics = step(state, data)
    jax.block_until_ready(metrics)
    seconds, state, metrics = time_steps(step, state, data, reps)
    synced_ms = 1e3 * seconds
    # As the trainer runs: steps dispatched back to back, waited on once per log interval.
    trials = []
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(reps):
            state, metrics = step(state, data)
        jax.block_until_ready(metrics)
        trials.append((time.perf_counter() - t0) / reps)
    ms = 1e3 * float(np.median(trials))
    profile = None
    if profile_steps:
        with tempfile.TemporaryDirectory() as trace_dir:
            with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
                for _ in range(profile_steps):
                    state, metrics = step(state, data)
                jax.block_until_ready(metrics)
            profile = trace_summary.kernel_table(trace_dir, profile_steps, top=profile_top)
        hlo = step.lower(state, data).compile().as_text()  # compiled again: the same program as the one just run
        trace_summary.attribute(profile, hlo)
        if hlo_dir:
            pathlib.Path(hlo_dir).mkdir(parents=True, exist_ok=True)
            with gzip.open(pathlib.Path(hlo_dir) / f"{model}_{batch}x{length}.hlo.txt.gz", "wt") as f:
                f.write(hlo)
    tokens_per_step = batch * length
    flops = train_flops_per_token(cfg, n_params, length) * tokens_per_step
    peak = peak_flops_per_device(jax.devices()[0].device_kind, "bfloat16", None)
    return {
        "model": model,
        "batch": batch,
        "length": length,
        "params": n_params,
        "step_ms": ms,
        "synced_step_ms": synced_ms,
        "tokens_per_s": tokens_per_step / (ms / 1e3),
        "mfu": (flops / (ms / 1e3) / peak) if peak else None,
        "compile_s": compile_s,
        "loss": float(metrics["loss"]),
        "documents_per_row": float((np.diff(np.asarray(data["segment_ids"]), axis=-1) > 0).sum(-1).mean() + 1)
        if "segment_ids" in data
        else None,
        "profile": profile,
    }


def plot(json_paths: list[str], png: str):
    """Step time against L (log-log) for equal-token runs, from one or more result files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = [c for p in json_paths for c in json.loads(pathlib.Path(p).read_text())["cases"] if "error" not in c]
    fig, ax = plt.subplots(figsize=(6, 4))
    for model, style in (("attamba", "o-"), ("transformer", "s-"), ("attamba-xla", "^--")):
        pts = sorted(
            (c["length"], c["step_ms"] / (c["batch"] * c["length"]) * 16384)
            for c in cases
            if c["model"] == model
            and c["batch"] * c["length"] <= 32768
            and not (c["length"] == 1024 and c["batch"] != 16)
        )
        if pts:
            ax.plot(*zip(*pts), style, label=model)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length L")
    ax.set_ylabel("step time per 16k tokens (ms)")
    ax.set_title("Training step, paper config (62.8M / 60.0M params)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="train_step.json")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--shapes", default=",".join(f"{b}x{l}" for b, l in SHAPES), help="BxL,BxL,...")
    parser.add_argument("--plot", nargs="+", metavar="JSON", help="only draw step time vs L from these result files")
    parser.add_argument("--png", default="train_step.png")
    parser.add_argument("--deadline", type=float, default=1e9, help="stop starting new cases after this many seconds")
    names = [*MODELS, *DOCUMENT_MODELS]
    parser.add_argument("--models", default=",".join(MODELS), help=f"which of {', '.join(names)} to time")
    parser.add_argument("--doc-length", type=int, default=1024, help="mean document length of the -docs models")
    parser.add_argument("--profile-shapes", default="", help="BxL,... whose cases are also traced, kernel by kernel")
    parser.add_argument("--profile-steps", type=int, default=3)
    parser.add_argument(
        "--profile-top", type=int, default=25, help="how many of the costliest kernels the profile lists (0: all)"
    )
    parser.add_argument("--hlo-dir", default="", help="also write each profiled case's compiled HLO text here (gzip)")
    args = parser.parse_args()
    if args.plot:
        plot(args.plot, args.png)
        return
    parse = lambda text: [tuple(int(v) for v in s.split("x")) for s in text.split(",") if s]
    shapes, profiled = parse(args.shapes), set(parse(args.profile_shapes))
    start = time.perf_counter()
    results = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "cases": []}
    print(f"{'model':<15} {'B':>3} {'L':>6} {'step ms':>9} {'tokens/s':>11} {'MFU':>6}", flush=True)
    for batch, length in shapes:
        for model in args.models.split(","):
            if model == "attamba-xla" and (batch, length) not in XLA_SHAPES:
                continue
            if time.perf_counter() - start > args.deadline:
                print(f"deadline reached: skipped {model} B{batch} L{length}", flush=True)
                continue
            try:
                steps = args.profile_steps if (batch, length) in profiled else 0
                r = time_case(
                    model, batch, length, args.warmup, args.reps, steps, args.profile_top, args.hlo_dir, args.doc_length
                )
            except Exception as e:  # a case that does not fit or compile is reported, not fatal
                r = {"model": model, "batch": batch, "length": length, "error": f"{type(e).__name__}: {e}"[:300]}
                print(f"{model:<15} {batch:>3} {length:>6} ERROR {r['error']}", flush=True)
            else:
                mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] else "-"
                print(
                    f"{model:<15} {batch:>3} {length:>6} {r['step_ms']:>9.2f} {r['tokens_per_s']:>11,.0f} {mfu:>6}",
                    flush=True,
                )
                if r["profile"]:
                    print(trace_summary.format_table(r["profile"], f"  {model} B{batch} L{length}"), flush=True)
            results["cases"].append(r)
            pathlib.Path(args.out).write_text(json.dumps(results, indent=1))
    # ratios within this run
    by = {(c["model"], c["batch"], c["length"]): c for c in results["cases"] if "error" not in c}
    for docs, plain in DOCUMENT_MODELS.items():
        for batch, length in shapes:
            a, b = by.get((docs, batch, length)), by.get((plain, batch, length))
            if a and b:
                print(
                    f"  {docs} / {plain} B{batch} L{length}: step-time ratio {a['step_ms'] / b['step_ms']:.3f} "
                    f"({a['documents_per_row']:.1f} documents per row)"
                )
    print("\nAttamba / transformer (same run):")
    for batch, length in shapes:
        for name in ("attamba", "attamba-kernels", "attamba-xla"):
            a, t = by.get((name, batch, length)), by.get(("transformer", batch, length))
            if a and t:
                print(
                    f"  {name} B{batch} L{length}: tokens/s ratio {a['tokens_per_s'] / t['tokens_per_s']:.2f}, "
                    f"step-time ratio {a['step_ms'] / t['step_ms']:.2f}"
                )
    plot([args.out], args.png)


if __name__ == "__main__":
    main()
