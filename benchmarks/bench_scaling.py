"""Training-step throughput of configs on 1, 2 and 4 devices, data, fsdp, context and tensor meshes.

    python -m benchmarks.bench_scaling --out scaling.json [--deadline 200]
    python -m benchmarks.bench_scaling --paths chunked:compressed,pallas_gpu:pallas_gpu --profile --out scaling.json
    python -m benchmarks.bench_scaling --config configs/paper/attamba_k8_w8.yaml,configs/paper/transformer_isoparam.yaml \
        --cases 1,2-context,4-context --length 131072 --per-device-batch 1 --out context.json

Every case is its own process that sees only its devices (``CUDA_VISIBLE_DEVICES``; on CPU,
``--platform cpu`` gives it n virtual devices). All cases compile at once, from abstract
shapes, without allocating the state; then they take turns (an exclusive file lock) to
allocate, warm up and time, so no two timed runs share a device. Each case runs the
trainer's own pieces: ``mesh_from_config``, ``init_train_state`` (state placed by the
logical-axis rules) and ``jit_train_step`` (in/out shardings, donated state), on synthetic
token batches of a fixed per-device batch (``--per-device-batch`` rows; the devices of a context
group share their rows, each holding 1/context of every row's length, so a context case runs the
one-device case's rows over more devices). Scaling efficiency = tokens/s on n devices /
(n x tokens/s on one), all within this run, for each implementation path.

``--paths`` times each case of an Attamba config once per ``ssm:attention`` pair of
``model.ssm_implementation`` and ``model.attention_implementation`` (e.g. the XLA paths
``chunked:compressed`` against the Pallas kernels ``pallas_gpu:pallas_gpu``, which run per device
under ``shard_map``); a transformer config runs its own settings (path ``config``). Several
``--config`` files (comma-separated) run side by side, each case's tokens/s also given as a ratio to
the first config's (its first path), so both sides of a comparison come from one run.
``--profile`` also traces a few steps of each case and reports where the device time goes by
kernel family (``trace_summary``; the mesh's communication is the ``collectives (NCCL)`` family),
and the Pallas kernels' share of it. Every case also records the bytes its compiled step's
collectives deliver to each device, by kind (``hlo_collectives``; "moved MB" in the table), and
the memory XLA assigns its step on each device ("GiB/device"). ``--set key=value ...`` overrides
every config in every case (``train.remat=block train.loss_slice=2048`` for lengths that need the
memory savers); the keys a case sets itself (length, batch, mesh, paths) are refused there.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import math
import os
import pathlib
import subprocess
import sys
import tempfile
import time

from benchmarks import hlo_collectives, trace_summary

ROOT = pathlib.Path(__file__).resolve().parent.parent
# name -> (mesh data, mesh fsdp, mesh context, mesh tensor); the case's devices are their product
CASES = {
    "1": (1, 1, 1, 1),
    "2-data": (2, 1, 1, 1),
    "2-fsdp": (1, 2, 1, 1),
    "2-context": (1, 1, 2, 1),
    "2-tensor": (1, 1, 1, 2),
    "4-data": (4, 1, 1, 1),
    "4-fsdp": (1, 4, 1, 1),
    "4-context": (1, 1, 4, 1),
    "4-data-tensor": (2, 1, 1, 2),
}


CONFIG_PATH = "config"  # the path of a config that takes no --paths (a transformer): its own settings
# The config keys each case sets itself (``run_case``), which ``--set`` may not name.
CASE_KEYS = ("data.seq_len", "data.batch_size", "mesh.", "model.ssm_implementation", "model.attention_implementation")


def check_overrides(overrides: list[str]) -> None:
    """Refuses a ``--set`` item that is no key=value or names a key the cases set themselves."""
    for item in overrides:
        key, sep, _ = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set: {item!r} is not key=value")
        if any(key == k or (k.endswith(".") and key.startswith(k)) for k in CASE_KEYS):
            raise ValueError(f"--set: {key} is set by each case (--length, --per-device-batch, --cases, --paths)")


def config_paths(config: str, paths: list[tuple[str, str]], overrides: list[str] = ()) -> list[str]:
    """The paths one config runs: each ``ssm:attention`` pair for Attamba, its own settings for a
    transformer. Loads the config with ``overrides`` (a bad key or value raises ValueError)."""
    from attamba_jax.config import load_config

    if load_config(ROOT / config, list(overrides)).model.arch != "attamba":
        return [CONFIG_PATH]
    return [f"{ssm}:{attention}" for ssm, attention in paths]


def parse_paths(text: str) -> list[tuple[str, str]]:
    """``--paths`` text "ssm:attention,..." -> [(ssm, attention), ...]: auto or an implementation of each op."""
    from pallas_kernels.boundary_window_attention import IMPLEMENTATIONS as ATTENTION
    from pallas_kernels.ssd import IMPLEMENTATIONS as SSD

    paths = []
    for item in text.split(","):
        ssm, sep, attention = item.partition(":")
        if not sep or ssm not in ("auto", *SSD) or attention not in ("auto", *ATTENTION):
            raise ValueError(
                f"--paths: {item!r} is not ssm:attention, ssm auto or one of {sorted(SSD)}, attention auto or one of {sorted(ATTENTION)}"
            )
        paths.append((ssm, attention))
    if len(set(paths)) != len(paths):
        raise ValueError(f"--paths names a pair twice: {text!r}")
    return paths


def run_case(args) -> dict:
    import jax
    import numpy as np
    from flax import nnx

    from attamba_jax.config import load_config
    from attamba_jax.model import LanguageModel
    from attamba_jax.optimizer import make_optimizer
    from attamba_jax.sharding import tree_shardings, use_mesh
    from attamba_jax.train_step import init_train_state, jit_train_step, mesh_from_config, train_batch_sharding
    from benchmarks.bench_memory import compiled_bytes

    data, fsdp, context, tensor = CASES[args.case]
    n = math.prod(CASES[args.case])
    batch = args.per_device_batch * n // context  # a context group shares its rows
    overrides = [
        *args.set,
        f"data.seq_len={args.length}",
        f"data.batch_size={batch}",
        f"mesh.data={data}",
        f"mesh.fsdp={fsdp}",
        f"mesh.context={context}",
        f"mesh.tensor={tensor}",
    ]
    if args.path != CONFIG_PATH:
        ssm, attention = parse_paths(args.path)[0]
        overrides += [f"model.ssm_implementation={ssm}", f"model.attention_implementation={attention}"]
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
    moved = hlo_collectives.collective_bytes(compiled.as_text())  # per device and step, by kind
    memory = compiled_bytes(compiled)  # per device

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
        profile = None
        if args.profile:
            with tempfile.TemporaryDirectory() as trace_dir:
                with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
                    for _ in range(args.profile_steps):
                        state, metrics = compiled(state, device_batch)
                    jax.block_until_ready(metrics)
                profile = trace_summary.kernel_table(trace_dir, args.profile_steps, top=args.profile_top)
            # Summed over the devices: ms per step of all of them together; the share is a ratio.
            profile["pallas_share"] = sum(
                r["share"] for r in profile["families"] if r["name"] in trace_summary.PALLAS_FAMILIES
            )
        n_params = sum(int(x.size) for x in jax.tree.leaves(state["params"]))
        return {
            "config": args.config,
            "case": args.case,
            "path": args.path,
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
            "collective_bytes": moved,
            "memory_gib_per_device": memory / 2**30,
            "overrides": overrides,
            "waited_s": waited_s,
            "loss": float(metrics["loss"]),
            **({"profile": profile} if profile is not None else {}),
        }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--config", default="configs/scale/attamba_350m.yaml", help="config,... each run on every case, side by side"
    )
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--per-device-batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument(
        "--paths",
        default="chunked:compressed",
        help="ssm:attention,... implementation pairs, each case timed with each (default: the XLA paths)",
    )
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5, help="steps per timed run")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs; the median counts")
    parser.add_argument(
        "--deadline", type=float, default=240, help="seconds; unfinished cases are stopped and reported"
    )
    parser.add_argument(
        "--set",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="config overrides for every config and case, e.g. train.remat=block train.loss_slice=2048",
    )
    parser.add_argument("--platform", default="gpu", choices=("gpu", "cpu"))
    parser.add_argument("--profile", action="store_true", help="also trace each case: kernel families, Pallas share")
    parser.add_argument("--profile-steps", type=int, default=3)
    parser.add_argument("--profile-top", type=int, default=10, help="costliest kernels listed per profiled case")
    parser.add_argument("--out", default="scaling.json")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # one case, in a child process
    parser.add_argument("--path", help=argparse.SUPPRESS)  # its ssm:attention pair
    parser.add_argument("--lock", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print("RESULT " + json.dumps(run_case(args)), flush=True)
        return
    try:
        paths = parse_paths(args.paths)
        configs = args.config.split(",")
        if len(set(configs)) != len(configs):
            raise ValueError(f"--config names a file twice: {args.config!r}")
        check_overrides(args.set)
        config_runs = {config: config_paths(config, paths, args.set) for config in configs}
    except (ValueError, OSError) as e:  # a bad path, a missing or invalid config file
        parser.error(str(e))
    unknown = [c for c in args.cases.split(",") if c not in CASES]
    if unknown:
        parser.error(f"--cases: unknown {unknown}; known: {', '.join(CASES)}")
    if args.profile_steps < 1:
        parser.error(f"--profile-steps must be >= 1, got {args.profile_steps}")

    out = pathlib.Path(args.out)
    lock = out.with_suffix(".lock")
    start = time.perf_counter()
    children = {}
    runs = [
        (config, name, path) for config in configs for name in args.cases.split(",") for path in config_runs[config]
    ]
    for config, name, path in runs:
        n = math.prod(CASES[name])
        env = dict(os.environ, PYTHONUNBUFFERED="1", XLA_PYTHON_CLIENT_PREALLOCATE="false")
        env["PYTHONPATH"] = f"{ROOT}:{env.get('PYTHONPATH', '')}"
        if args.platform == "cpu":
            env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={n}")
        else:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(n))
        child_args = [a for a in sys.argv[1:]]
        cmd = [sys.executable, "-m", "benchmarks.bench_scaling", *child_args]
        cmd += ["--config", config, "--case", name, "--path", path, "--lock", str(lock)]
        children[config, name, path] = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
    results = {
        "configs": configs,
        "per_device_batch": args.per_device_batch,
        "length": args.length,
        "paths": [f"{ssm}:{attention}" for ssm, attention in paths],
        "set": args.set,
        "cases": [],
    }
    for (config, name, path), proc in children.items():
        try:
            text, _ = proc.communicate(timeout=max(1.0, args.deadline - (time.perf_counter() - start)))
        except subprocess.TimeoutExpired:
            proc.kill()
            text, _ = proc.communicate()
            error = {"config": config, "case": name, "path": path, "error": f"deadline {args.deadline:.0f}s reached"}
            results["cases"].append(error)
            print(f"{config} {name} {path}: stopped at the deadline", flush=True)
            continue
        found = [line[len("RESULT ") :] for line in text.splitlines() if line.startswith("RESULT ")]
        if found:
            results["cases"].append(json.loads(found[-1]))
        else:
            results["cases"].append({"config": config, "case": name, "path": path, "error": text[-2000:]})
            print(f"{config} {name} {path}: failed\n{text[-2000:]}", flush=True)
    done = {(c["config"], c["case"], c["path"]): c for c in results["cases"] if "error" not in c}
    width = max(len(p) for p in [CONFIG_PATH, *results["paths"]])
    cwidth = max(len("config"), *(len(pathlib.Path(c).stem) for c in configs))
    print(
        f"{'config':<{cwidth}} {'case':<14} {'path':<{width}} {'devices':>7} {'step ms':>9} {'tokens/s':>11} "
        f"{'per device':>11} {'efficiency':>10} {'vs first path':>13} {'vs first config':>15} {'Pallas share':>12} "
        f"{'moved MB':>9} {'GiB/device':>10}"
    )
    for config, name, path in runs:
        c = done.get((config, name, path))
        if c is None:
            continue
        base = done.get((config, "1", path))
        c["efficiency"] = c["tokens_per_s"] / (c["devices"] * base["tokens_per_s"]) if base else None
        ref = done.get((config, name, config_runs[config][0]))
        c["speedup_vs_first_path"] = c["tokens_per_s"] / ref["tokens_per_s"] if ref else None
        other = done.get((configs[0], name, config_runs[configs[0]][0]))
        c["speedup_vs_first_config"] = c["tokens_per_s"] / other["tokens_per_s"] if other else None
        ratio = lambda x: "-" if x is None else f"{x:.2f}x"
        eff = "-" if c["efficiency"] is None else f"{100 * c['efficiency']:.1f}%"
        share = f"{100 * c['profile']['pallas_share']:.1f}%" if "profile" in c else "-"
        print(
            f"{pathlib.Path(config).stem:<{cwidth}} {name:<14} {path:<{width}} {c['devices']:>7} {c['step_ms']:>9.1f} "
            f"{c['tokens_per_s']:>11,.0f} {c['tokens_per_s'] / c['devices']:>11,.0f} {eff:>10} "
            f"{ratio(c['speedup_vs_first_path']):>13} {ratio(c['speedup_vs_first_config']):>15} {share:>12} "
            f"{sum(c['collective_bytes'].values()) / 1e6:>9.1f} {c['memory_gib_per_device']:>10.2f}"
        )
    results["wall_s"] = time.perf_counter() - start
    out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
