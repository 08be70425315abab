"""Where a jitted step's device time goes: per-kernel totals from a JAX profiler trace.

    with jax.profiler.trace(tmpdir, create_perfetto_trace=True):
        ... run `steps` steps ...
    rows = kernel_table(tmpdir, steps)

Reads the Perfetto (Chrome trace-event) JSON that ``jax.profiler.trace`` writes and sums the
duration of every complete event on the device's processes (``/device:GPU:0`` ...; on a CPU,
where no device process exists, the kernels on the XLA threads of ``/host:CPU``), grouped by
kernel name. Durations are the profiler's own kernel timestamps (CUPTI on a GPU).
"""

from __future__ import annotations

import collections
import gzip
import json
import pathlib
import re

# Kernel families, first match wins (names: Pallas ``name=``, cuBLAS/cuDNN, XLA fusions).
CATEGORIES = (
    ("SSD (Pallas)", r"ssd_"),
    ("Attamba attention (Pallas)", r"boundary_window_attention|chunked_attention"),  # (the name before 2026-12)
    ("cuDNN attention", r"cudnn|flash|fmha"),
    ("collectives (NCCL)", r"nccl"),  # the mesh's communication: all-gathers, permutes, reductions
    ("matmul", r"gemm|nvjet|cutlass|xmma|matmul|dot|sm90_"),
    ("reduction fusions", r"reduce|reduction"),
    ("copies / transposes", r"copy|transpose|memcpy|memset|dynamic.update|slice"),
)
# The families of the project's Pallas kernels (their share of a step).
PALLAS_FAMILIES = ("SSD (Pallas)", "Attamba attention (Pallas)")


def load_events(trace_dir: str | pathlib.Path) -> list[dict]:
    paths = sorted(pathlib.Path(trace_dir).rglob("perfetto_trace.json.gz"))
    if not paths:
        raise FileNotFoundError(
            f"no perfetto_trace.json.gz under {trace_dir} (profile with create_perfetto_trace=True)"
        )
    with gzip.open(paths[-1]) as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


def device_events(events: list[dict]) -> list[dict]:
    """Complete ('X') events of the device processes, or of the host's XLA threads without one."""
    names = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    devices = {pid for pid, name in names.items() if name.startswith("/device:")}
    if devices:
        return [e for e in events if e.get("ph") == "X" and e["pid"] in devices]
    threads = {
        (e["pid"], e["tid"])
        for e in events
        if e.get("ph") == "M" and e.get("name") == "thread_name" and "XLA" in e["args"]["name"]
    }
    runtime = lambda name: "::" in name or name.startswith(("$", "end:"))  # executor bookkeeping, not kernels
    return [e for e in events if e.get("ph") == "X" and (e["pid"], e.get("tid")) in threads and not runtime(e["name"])]


def kernel_table(trace_dir: str | pathlib.Path, steps: int, top: int = 25) -> dict:
    """{'device_ms_per_step', 'kernels': [{name, ms_per_step, calls_per_step, share}] (largest
    first; ``top`` = 0: all), 'families': the same summed by kernel family}. ``attribute`` adds
    what each XLA kernel computes."""
    totals, counts = collections.Counter(), collections.Counter()
    for e in device_events(load_events(trace_dir)):
        totals[e["name"]] += float(e.get("dur", 0.0))
        counts[e["name"]] += 1
    all_us = sum(totals.values())
    row = lambda name, us, calls: {
        "name": name,
        "ms_per_step": us / 1e3 / steps,
        "calls_per_step": calls / steps,
        "share": us / all_us if all_us else 0.0,
    }
    families, family_calls = collections.Counter(), collections.Counter()
    for name, us in totals.items():
        family = next(
            (label for label, pattern in CATEGORIES if re.search(pattern, name, re.IGNORECASE)), "other fusions"
        )
        families[family] += us
        family_calls[family] += counts[name]
    return {
        "device_ms_per_step": all_us / 1e3 / steps,
        "families": [row(f, us, family_calls[f]) for f, us in families.most_common()],
        "kernels": [row(name, us, counts[name]) for name, us in totals.most_common(top or None)],
    }


_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (.*?) (?:fusion|custom-call)\(.*?op_name=\"([^\"]*)\"")


def attribute(table: dict, hlo_text: str) -> dict:
    """Adds to each kernel row the ``shape`` and ``op`` (JAX's ``op_name`` metadata: which
    primitive of which transform, e.g. ``transpose(jvp(...))/reduce_sum``) of the HLO fusion or
    custom call it ran, from the compiled module's text (``jitted.lower(...).compile().as_text()``).

    A kernel is matched by its own name (XLA names a fusion's kernel after the instruction, with
    ``.`` as ``_``); one shared by several identical fusions reports the first. cuBLAS and cuDNN
    kernels, named by their libraries, stay unmatched.
    """
    found = {}
    for line in hlo_text.splitlines():
        m = _INSTRUCTION.match(line)
        if m:
            found.setdefault(m.group(1).replace(".", "_"), (m.group(2)[:80], m.group(3)))
    for row in table["kernels"]:
        shape, op = found.get(row["name"].replace(".", "_"), ("", ""))
        row["shape"], row["op"] = shape, re.sub(r"^jit\([^)]*\)/(while/body/)?(eval_jaxpr/)?", "", op)
    return table


def format_table(table: dict, title: str) -> str:
    lines = [
        f"{title}: {table['device_ms_per_step']:.3f} ms of kernels per step",
        f"  {'ms/step':>8} {'share':>6} {'calls':>6}  kernel family / kernel",
    ]
    for r in table["families"] + [None] + table["kernels"]:
        if r is None:
            lines.append("  " + "-" * 40)
            continue
        op = f"  [{r['shape']} {r['op'][-70:]}]" if r.get("op") else ""
        lines.append(
            f"  {r['ms_per_step']:>8.3f} {100 * r['share']:>5.1f}% {r['calls_per_step']:>6.1f}  {r['name'][:90]}{op}"
        )
    return "\n".join(lines)
