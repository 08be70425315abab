"""Memory savers on one device: the longest sequence a training step holds, and what remat and the
sliced loss cost in step time.

    python -m benchmarks.bench_memory --out memory.json [--lengths 16384,...] [--time-at 16384,131072]

For each model (paper configs, bfloat16 compute, batch 1) and each variant (``plain``: no remat,
whole loss; ``remat``: ``train.remat=block``; ``slice``: ``train.loss_slice=2048``; ``saver``:
both), the trainer's own step
(``train_step.make_train_step``, donated state) is compiled at doubling lengths; XLA's buffer
assignment (``memory_analysis``: arguments + outputs - aliased + temporaries) says whether it
fits the device (``bytes_limit`` of its memory stats). A length that fits also runs one step, so
that "fits" means "trained a step"; at the ``--time-at`` lengths the step is timed (median of
``reps`` steps, each waited on). The longest length that trained is each row's result. Ratios are
within this run: ``saver`` against ``plain``, Attamba against the transformer.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

from attamba_jax.config import load_config
from attamba_jax.model import init_model
from attamba_jax.optimizer import make_optimizer
from attamba_jax.train_step import make_train_step
from benchmarks.timing import time_steps

ROOT = pathlib.Path(__file__).resolve().parent.parent
MODELS = {
    "attamba": "configs/paper/attamba_k8_w8.yaml",
    "transformer": "configs/paper/transformer_isoparam.yaml",
    "attamba-350m": "configs/scale/attamba_350m.yaml",
}
VARIANTS = {
    "plain": {},
    "remat": {"remat": "block"},
    "slice": {"loss_slice": 2048},
    "saver": {"remat": "block", "loss_slice": 2048},
}


def compiled_bytes(compiled) -> int:
    """The bytes XLA's buffer assignment gives a compiled program on each device: arguments +
    outputs - aliased (donated) + temporaries."""
    mem = compiled.memory_analysis()
    return mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes + mem.temp_size_in_bytes


def one_case(model: str, variant: str, length: int, time_it: bool, reps: int) -> dict:
    path = ROOT / MODELS[model]
    full = load_config(path, ["model.dtype=bfloat16"])
    graphdef, params = init_model(full.model, seed=0)
    tx, schedule = make_optimizer(full.optim, 100_000)
    state = {"params": params, "opt_state": tx.init(params), "step": jnp.int32(0)}
    step = jax.jit(make_train_step(graphdef, tx, schedule, **VARIANTS[variant]), donate_argnums=0)
    tokens = jax.random.randint(jax.random.key(1), (1, 1, length + 1), 0, full.model.vocab_size)
    batch = {"inputs": tokens[..., :-1], "targets": tokens[..., 1:], "weights": jnp.ones((1, 1, length), jnp.float32)}
    case = {"model": model, "variant": variant, "length": length}
    t0 = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    case["compile_s"] = time.perf_counter() - t0
    need = compiled_bytes(compiled)
    limit = (jax.devices()[0].memory_stats() or {}).get("bytes_limit")  # None on a CPU
    case.update(need_gib=need / 2**30, limit_gib=None if limit is None else limit / 2**30)
    if limit is not None and need > limit:
        case["fits"] = False
        return case
    try:
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        case["fits"] = bool(np.isfinite(float(metrics["loss"])))
        if time_it:
            seconds, state, metrics = time_steps(compiled, state, batch, reps)
            case["step_ms"] = 1e3 * seconds
            case["tokens_per_s"] = length / (case["step_ms"] / 1e3)
    except Exception as e:  # out of memory at run time although the analysis said it fits
        case.update(fits=False, error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
    return case


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="memory.json")
    parser.add_argument("--models", default="attamba,transformer")
    parser.add_argument("--variants", default="plain,saver")
    parser.add_argument("--lengths", default=",".join(str(2**i) for i in range(14, 21)))
    parser.add_argument("--time-at", default="16384,131072")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--deadline", type=float, default=1e9, help="start no case after this many seconds")
    args = parser.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    time_at = {int(x) for x in args.time_at.split(",") if x}
    start = time.perf_counter()
    out = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "cases": []}
    for model in args.models.split(","):
        for variant in args.variants.split(","):
            for length in lengths:
                if time.perf_counter() - start > args.deadline:
                    break
                case = one_case(model, variant, length, length in time_at, args.reps)
                out["cases"].append(case)
                pathlib.Path(args.out).write_text(json.dumps(out, indent=1))
                print(json.dumps(case), flush=True)
                if not case["fits"]:
                    break
    print(f"\n{'model':14} {'variant':8} {'longest trained':>16}  " + "  ".join(f"ms@{n}" for n in sorted(time_at)))
    for model in args.models.split(","):
        for variant in args.variants.split(","):
            rows = [c for c in out["cases"] if c["model"] == model and c["variant"] == variant]
            longest = max([c["length"] for c in rows if c["fits"]], default=0)
            ms = {c["length"]: c.get("step_ms") for c in rows}
            timing = "  ".join(f"{ms.get(n) or float('nan'):9.1f}" for n in sorted(time_at))
            print(f"{model:14} {variant:8} {longest:>16}  {timing}")
    out["longest"] = {
        f"{m}/{v}": max(
            [c["length"] for c in out["cases"] if c["model"] == m and c["variant"] == v and c["fits"]], default=0
        )
        for m in args.models.split(",")
        for v in args.variants.split(",")
    }
    pathlib.Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
