"""Registers, spills and occupancy of the Pallas GPU kernels, compiled for an H100/H200 (sm_90a)
without a GPU.

A kernel's registers per thread bound how many of its programs an SM holds at once (65,536
registers per SM), and spills go to local memory: the launch settings that matter most for
this project's latency-bound kernels (``BENCHMARKS.md``). Reading them needs no GPU. Two steps:

1. ``capture`` (this project's environment, on any machine): lowers a computation for CUDA,
   intercepting each Pallas kernel's Triton IR as Pallas builds it, and writes one ``.ttir`` file
   per kernel with its launch settings (``index.json``). Its targets: the training step of a
   ``bench_train_step`` model, the SSD kernel in every setting of ``bench_ssd``'s sweep, the SSMs'
   conv and gated-norm kernels in every setting of ``bench_ssm_ops``'s sweep.
2. ``compile`` (any Python with the ``triton`` package, which bundles ptxas and cuobjdump;
   ``pip install triton`` in a separate environment): compiles each file for sm_90a and reads
   the cubin's registers per thread, stack and local (spill) memory and shared memory, then the
   programs and warps an SM holds by registers and shared memory (Hopper: 64 warps, 32 programs,
   228 KiB of shared memory, registers given out per warp in units of 256).

The figures come from the ``triton`` package's compiler, not the one inside XLA that builds the
kernels on a GPU (another Triton version, other passes), so they are an estimate: read
differences between settings, and confirm on the device (``ncu --section LaunchStats``). Checked
against Nsight Compute on an H100 (``BENCHMARKS.md``, "Registers per thread without a GPU").

    python -m benchmarks.triton_registers capture --step attamba-kernels 16x1024 --out /tmp/regs
    python -m benchmarks.triton_registers capture --ssd-sweep 4x32768 --ops-sweep 16x1024 --out /tmp/regs
    /path/to/triton-env/bin/python benchmarks/triton_registers.py compile /tmp/regs --json /tmp/regs.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile

ARCH = 90  # sm_90a: H100 and H200
REGISTERS_PER_SM, WARPS_PER_SM, PROGRAMS_PER_SM, SHARED_PER_SM = 65536, 64, 32, 228 * 1024


# --- capture (this project's environment) ---------------------------------------------------------


@contextlib.contextmanager
def _intercepted(texts: list, settings: list):
    """Appends the Triton IR text of every Pallas kernel lowered inside the block to ``texts``,
    and, where the lowering compiles each kernel itself (jaxlib after 0.10.2, on a machine with a
    GPU), its (num_warps, num_stages) to ``settings``."""
    from jax._src.pallas.triton import pallas_call_registration as registration

    lower, compile_ = registration.lowering.lower_jaxpr_to_triton_module, registration.triton.compile

    def recording_lower(*args, **kwargs):
        result = lower(*args, **kwargs)
        texts.append(result.module.operation.get_asm(enable_debug_info=False))
        return result

    def recording_compile(*args, num_warps, num_stages, **kwargs):
        settings.append((num_warps, num_stages))
        return compile_(*args, num_warps=num_warps, num_stages=num_stages, **kwargs)

    registration.lowering.lower_jaxpr_to_triton_module = recording_lower
    registration.triton.compile = recording_compile
    try:
        yield
    finally:
        registration.lowering.lower_jaxpr_to_triton_module = lower
        registration.triton.compile = compile_


@contextlib.contextmanager
def _as_if_on_a_gpu():
    """The ops' dispatch as on a GPU, so that ``auto`` and named GPU kernels lower on a CPU."""
    from pallas_kernels import dispatch

    here = dispatch.Target.here
    dispatch.Target.here = classmethod(lambda cls, partitioned=False: cls("gpu", partitioned))
    try:
        yield
    finally:
        dispatch.Target.here = here


def lower_kernels(fn, *args) -> list[dict]:
    """Every Pallas GPU kernel of jitted ``fn(*args)`` lowered for CUDA: its Triton IR and launch
    settings (in the order of the lowered module's custom calls)."""
    import jax

    texts: list[str] = []
    settings: list[tuple[int, int]] = []
    gpus = [d for d in jax.devices() if d.platform == "gpu"]
    on_gpu = jax.default_device(gpus[0]) if gpus else contextlib.nullcontext()  # the lowering reads the GPU
    jax.clear_caches()  # a computation traced or lowered before would not run the kernels' lowering again
    with on_gpu, _as_if_on_a_gpu(), _intercepted(texts, settings):
        module = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    if not settings:  # the kernels left to XLA to compile: their settings are in the module's text
        warps = [int(w) for w in re.findall(r"num_warps = (\d+) : i32", module)]
        settings = list(zip(warps, [int(s) for s in re.findall(r"num_stages = (\d+) : i32", module)]))
    if len(texts) != len(settings):
        raise RuntimeError(f"{len(texts)} kernels lowered but {len(settings)} launch settings found")
    names = [re.search(r"tt\.func public @(\w+)", t).group(1) for t in texts]
    return [
        dict(kernel=n, ttir=t, num_warps=w, num_stages=s) for n, t, (w, s) in zip(names, texts, settings, strict=True)
    ]


def _shape(text: str) -> tuple[int, int]:
    b, t = text.split("x")
    return int(b), int(t)


def _step_kernels(model: str, shape: str) -> list[dict]:
    from benchmarks.bench_train_step import build_case

    _, step, state, data = build_case(model, *_shape(shape))
    kernels = lower_kernels(step, state, data)
    return [dict(k, target=f"step {model} {shape}", setting="") for k in kernels]


def _ssd_sweep_kernels(shape: str) -> list[dict]:
    import dataclasses

    import jax
    import jax.numpy as jnp

    from benchmarks.bench_ssd import GROUPS, HEAD_DIM, HEADS, STATE, sweep_variants
    from pallas_kernels.chunk_grid import ChunkGrid
    from pallas_kernels.ssd import pallas_gpu, reference

    b, t = _shape(shape)
    grid = ChunkGrid(8, 3)
    args, _ = reference.random_inputs(jax.random.key(0), b, t, HEADS, HEAD_DIM, GROUPS, STATE, jnp.bfloat16)
    out = []
    for blocks in sweep_variants(grid.token_chunk):
        loss = lambda *a, blocks=blocks: jnp.sum(pallas_gpu.ssd_pallas_gpu(*a, grid=grid, blocks=blocks).astype(float))
        setting = json.dumps(dataclasses.asdict(blocks))
        out += [
            dict(k, target=f"ssd {shape}", setting=setting) for k in lower_kernels(jax.grad(loss, (0, 1, 3)), *args)
        ]
    return out


def _ops_sweep_kernels(shape: str) -> list[dict]:
    import dataclasses

    import jax
    import jax.numpy as jnp

    from benchmarks.bench_ssm_ops import OPS, SWEEPS, fwd_bwd, ones_like

    b, t = _shape(shape)
    out = []
    for op, launches in SWEEPS.items():
        inputs, make = OPS[op]
        args, diff = inputs(jax.random.key(0), b, t, jnp.bfloat16)
        for launch in launches:
            fn = make(launch, False)
            cots = ones_like(jax.eval_shape(fn, *args))
            setting = json.dumps(dataclasses.asdict(launch))
            kernels = lower_kernels(fwd_bwd(fn, diff), args, cots)
            out += [dict(k, target=f"{op} {shape}", setting=setting) for k in kernels]
    return out


def capture(a) -> None:
    kernels = []
    if a.step:
        kernels += _step_kernels(*a.step)
    if a.ssd_sweep:
        kernels += _ssd_sweep_kernels(a.ssd_sweep)
    if a.ops_sweep:
        kernels += _ops_sweep_kernels(a.ops_sweep)
    os.makedirs(a.out, exist_ok=True)
    index = []
    for i, k in enumerate(kernels):
        path = f"{i:03d}_{k['kernel']}.ttir"
        with open(os.path.join(a.out, path), "w") as f:
            f.write(k.pop("ttir"))
        index.append(dict(k, file=path))
    with open(os.path.join(a.out, "index.json"), "w") as f:
        json.dump(index, f, indent=1)
    print(f"wrote {len(index)} kernels to {a.out}")


# --- compile (a Python with the ``triton`` package) --------------------------------------------------


def residency(registers: int, shared: int, warps: int) -> dict:
    """Programs and warps of one kernel an SM holds at once, and what bounds them."""
    per_warp = -(-registers * 32 // 256) * 256
    limits = {
        "registers": REGISTERS_PER_SM // (per_warp * warps),
        "warps": WARPS_PER_SM // warps,
        "programs": PROGRAMS_PER_SM,
        "shared memory": SHARED_PER_SM // (shared + 1024) if shared else PROGRAMS_PER_SM,
    }
    bound = min(limits, key=limits.get)
    programs = limits[bound]
    return {"programs_per_sm": programs, "warps_per_sm": programs * warps, "bound_by": bound}


def _usage(cubin: bytes, cuobjdump: str) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    fields = dict(re.findall(r"(REG|STACK|LOCAL):(\d+)", text))
    return {"registers": int(fields["REG"]), "stack": int(fields["STACK"]), "local": int(fields["LOCAL"])}


def compile_all(a) -> None:
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton's default, said aloud
    import triton
    from triton.backends.compiler import GPUTarget

    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with open(os.path.join(a.dir, "index.json")) as f:
        index = json.load(f)
    rows = []
    for k in index:
        options = {"num_warps": k["num_warps"], "num_stages": k["num_stages"]}
        compiled = triton.compile(os.path.join(a.dir, k["file"]), target=GPUTarget("cuda", ARCH, 32), options=options)
        usage = _usage(compiled.asm["cubin"], cuobjdump)
        shared = compiled.metadata.shared
        rows.append({**k, **usage, "shared": shared, **residency(usage["registers"], shared, k["num_warps"])})
    seen, setting = set(), None
    print(f"triton {triton.__version__}, sm_{ARCH}a")
    print(
        f"{'target':<28} {'kernel':<40} {'warps':>5} {'stages':>6} {'regs':>5} {'spill':>6} {'smem':>7} {'warps/SM':>8}"
    )
    for r in rows:
        key = (r["target"], r["setting"], r["kernel"], r["registers"], r["local"], r["shared"])
        if key in seen:  # a kernel lowered once per layer (the step) prints once
            continue
        seen.add(key)
        if r["setting"] and r["setting"] != setting:
            print(f"  {r['setting']}")
        setting = r["setting"]
        print(
            f"{r['target']:<28} {r['kernel']:<40} {r['num_warps']:>5} {r['num_stages']:>6} {r['registers']:>5} "
            f"{r['local']:>6} {r['shared']:>7} {r['warps_per_sm']:>5} ({r['bound_by']})"
        )
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"triton": triton.__version__, "arch": f"sm_{ARCH}a", "kernels": rows}, f, indent=1)
        print(f"wrote {a.json}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    c = sub.add_parser("capture", help="write the Triton IR of the kernels (this project's environment)")
    c.add_argument("--step", nargs=2, metavar=("MODEL", "BxL"), help="the training step of a bench_train_step model")
    c.add_argument("--ssd-sweep", metavar="BxL", help="the SSD kernel in each setting of bench_ssd's sweep")
    c.add_argument("--ops-sweep", metavar="BxL", help="the conv and gated-norm kernels in bench_ssm_ops's settings")
    c.add_argument("--out", required=True)
    k = sub.add_parser("compile", help="compile for sm_90a and read registers (a Python with triton)")
    k.add_argument("dir")
    k.add_argument("--json", default="")
    a = ap.parse_args(argv)
    if a.command == "capture":
        if not (a.step or a.ssd_sweep or a.ops_sweep):
            ap.error("capture: name at least one of --step, --ssd-sweep, --ops-sweep")
        capture(a)
    else:
        compile_all(a)


if __name__ == "__main__":
    sys.exit(main())
