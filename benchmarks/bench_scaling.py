"""Training-step throughput of one config on 1, 2 and 4 devices, data and fsdp meshes.

    python -m benchmarks.bench_scaling --out scaling.json [--deadline 200]

Every case is its own process that sees only its devices (``CUDA_VISIBLE_DEVICES``; on CPU,
``--platform cpu`` gives it n virtual devices). All cases compile at once, from abstract
shapes, without allocating the state; then they take turns (an exclusive file lock) to
allocate, warm up and time, so no two timed runs share a device. Each case runs the
trainer's own pieces: ``mesh_from_config``, ``init_train_state`` (state placed by the
logical-axis rules) and ``jit_train_step`` (in/out shardings, donated state), on synthetic
token batches of a fixed per-device batch. Scaling efficiency = tokens/s on n devices /
(n x tokens/s on one), all within this run.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
# name -> (devices, mesh data, mesh fsdp)
CASES = {
    "1": (1, 1, 1),
    "2-data": (2, 2, 1),
    "2-fsdp": (2, 1, 2),
    "4-data": (4, 4, 1),
    "4-fsdp": (4, 1, 4),
}


def run_case(args) -> dict:
    import jax
    import numpy as np
    from flax import nnx

    from attamba_jax.config import load_config
    from attamba_jax.model import LanguageModel
    from attamba_jax.optimizer import make_optimizer
    from attamba_jax.sharding import tree_shardings, use_mesh
    from attamba_jax.train_step import init_train_state, jit_train_step, mesh_from_config, train_batch_sharding

    n, data, fsdp = CASES[args.case]
    batch = args.per_device_batch * n
    overrides = [
        f"data.seq_len={args.length}",
        f"data.batch_size={batch}",
        f"mesh.data={data}",
        f"mesh.fsdp={fsdp}",
        "mesh.tensor=1",
        f"model.ssm_implementation={args.ssm}",
        f"model.attention_implementation={args.attention}",
    ]
    cfg = load_config(ROOT / args.config, overrides)
    mesh = mesh_from_config(cfg.mesh)
    assert mesh.devices.size == n, (mesh.devices.size, n)
    tx, schedule = make_optimizer(cfg.optim, cfg.train.steps)

    # Compile from shapes alone: nothing is allocated while other cases are timed.
    graphdef, abstract_params = nnx.split(
        nnx.eval_shape(lambda: LanguageModel(cfg.model, rngs=nnx.Rngs(params=cfg.seed)))
    )
    with use_mesh(mesh):
        shardings = {"params": tree_shardings(abstract_params, mesh)}
        shardings["opt_state"] = tree_shardings(jax.eval_shape(tx.init, abstract_params), mesh)
    shardings["step"] = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    abstract = {
        "params": abstract_params,
        "opt_state": jax.eval_shape(tx.init, abstract_params),
        "step": jax.ShapeDtypeStruct((), np.int32),
    }
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    batch_sharding = train_batch_sharding(mesh, batch)
    shape = (1, batch, args.length)
    abstract_batch = {
        "inputs": jax.ShapeDtypeStruct(shape, np.int32, sharding=batch_sharding),
        "targets": jax.ShapeDtypeStruct(shape, np.int32, sharding=batch_sharding),
        "weights": jax.ShapeDtypeStruct(shape, np.float32, sharding=batch_sharding),
    }
    t0 = time.perf_counter()
    with use_mesh(mesh):
        compiled = (
            jit_train_step(graphdef, tx, schedule, shardings, batch_sharding).lower(abstract, abstract_batch).compile()
        )
    compile_s = time.perf_counter() - t0

    with open(args.lock, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when this process exits
        waited_s = time.perf_counter() - t0 - compile_s
        _, state, _ = init_train_state(cfg, mesh, tx)
        rng = np.random.default_rng(0)
        tokens = rng.integers(0, cfg.model.vocab_size, size=(1, batch, args.length + 1), dtype=np.int32)
        host = {"inputs": tokens[..., :-1], "targets": tokens[..., 1:], "weights": np.ones(shape, np.float32)}
        device_batch = {k: jax.make_array_from_process_local_data(batch_sharding, v) for k, v in host.items()}
        for _ in range(args.warmup):
            state, metrics = compiled(state, device_batch)
        jax.block_until_ready(metrics)
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            for _ in range(args.steps):
                state, metrics = compiled(state, device_batch)
            jax.block_until_ready(metrics)
            times.append((time.perf_counter() - t) / args.steps)
        step_s = float(np.median(times))
        n_params = sum(int(x.size) for x in jax.tree.leaves(state["params"]))
        return {
            "case": args.case,
            "devices": n,
            "mesh": dict(mesh.shape),
            "device_kind": jax.devices()[0].device_kind,
            "jax": jax.__version__,
            "params": n_params,
            "global_batch": batch,
            "length": args.length,
            "step_ms": 1e3 * step_s,
            "step_ms_runs": [1e3 * t for t in times],
            "tokens_per_s": batch * args.length / step_s,
            "compile_s": compile_s,
            "waited_s": waited_s,
            "loss": float(metrics["loss"]),
        }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/scale/attamba_350m.yaml")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--per-device-batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--ssm", default="chunked", help="model.ssm_implementation (default: the XLA path)")
    parser.add_argument(
        "--attention", default="compressed", help="model.attention_implementation (default: the XLA path)"
    )
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5, help="steps per timed run")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs; the median counts")
    parser.add_argument(
        "--deadline", type=float, default=240, help="seconds; unfinished cases are stopped and reported"
    )
    parser.add_argument("--platform", default="gpu", choices=("gpu", "cpu"))
    parser.add_argument("--out", default="scaling.json")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # one case, in a child process
    parser.add_argument("--lock", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print("RESULT " + json.dumps(run_case(args)), flush=True)
        return

    out = pathlib.Path(args.out)
    lock = out.with_suffix(".lock")
    start = time.perf_counter()
    children = {}
    for name in args.cases.split(","):
        n = CASES[name][0]
        env = dict(os.environ, PYTHONUNBUFFERED="1", XLA_PYTHON_CLIENT_PREALLOCATE="false")
        env["PYTHONPATH"] = f"{ROOT}:{env.get('PYTHONPATH', '')}"
        if args.platform == "cpu":
            env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={n}")
        else:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(n))
        child_args = [a for a in sys.argv[1:]]
        cmd = [sys.executable, "-m", "benchmarks.bench_scaling", *child_args, "--case", name, "--lock", str(lock)]
        children[name] = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
    results = {
        "config": args.config,
        "per_device_batch": args.per_device_batch,
        "length": args.length,
        "ssm": args.ssm,
        "attention": args.attention,
        "cases": [],
    }
    for name, proc in children.items():
        try:
            text, _ = proc.communicate(timeout=max(1.0, args.deadline - (time.perf_counter() - start)))
        except subprocess.TimeoutExpired:
            proc.kill()
            text, _ = proc.communicate()
            results["cases"].append({"case": name, "error": f"deadline {args.deadline:.0f}s reached"})
            print(f"{name}: stopped at the deadline", flush=True)
            continue
        found = [line[len("RESULT ") :] for line in text.splitlines() if line.startswith("RESULT ")]
        if found:
            results["cases"].append(json.loads(found[-1]))
        else:
            results["cases"].append({"case": name, "error": text[-2000:]})
            print(f"{name}: failed\n{text[-2000:]}", flush=True)
    done = {c["case"]: c for c in results["cases"] if "error" not in c}
    base = done.get("1")
    print(f"{'case':<8} {'devices':>7} {'step ms':>9} {'tokens/s':>11} {'per device':>11} {'efficiency':>10}")
    for name in args.cases.split(","):
        c = done.get(name)
        if c is None:
            continue
        c["efficiency"] = c["tokens_per_s"] / (c["devices"] * base["tokens_per_s"]) if base else None
        eff = "-" if c["efficiency"] is None else f"{100 * c['efficiency']:.1f}%"
        print(
            f"{name:<8} {c['devices']:>7} {c['step_ms']:>9.1f} {c['tokens_per_s']:>11,.0f} {c['tokens_per_s'] / c['devices']:>11,.0f} {eff:>10}"
        )
    results["wall_s"] = time.perf_counter() - start
    out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
