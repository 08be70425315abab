"""The LM head and loss, forward and backward: ``loss.cross_entropy`` (its own backward, one
fused pass back to the logits' dtype) against automatic differentiation of the same formula
(optax's integer-label softmax cross-entropy on float32 logits), in one run.

Per B×L: hidden [B, L, dim] @ W_head [dim, V] -> bf16 logits -> weighted mean NLL; the
timed call returns the loss and the gradients of hidden and W_head. Median of ``trials``
rounds of ``reps`` back-to-back calls (benchmarks/timing.py).

    python -m benchmarks.bench_loss --out loss.json                    # on the GPU
    python -m benchmarks.bench_loss --sizes 2x64 --vocab 512 --out /tmp/l.json   # CPU smoke run
"""

from __future__ import annotations

import argparse
import platform

import jax
import jax.numpy as jnp
import optax

from attamba_jax.loss import cross_entropy
from benchmarks.timing import rel_err, save, stamp, time_calls


def _autodiff_loss(logits, targets, weights):
    nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    return jnp.sum(nll * weights) / jnp.maximum(jnp.sum(weights), 1.0)


LOSSES = {
    "fused backward (cross_entropy)": lambda logits, t, w: cross_entropy(logits, t, w)[0],
    "autodiff (optax)": _autodiff_loss,
}


def _step(loss):
    def run(hidden, head, targets, weights):
        def f(h, w):
            logits = jnp.einsum("btd,dv->btv", h, w.astype(h.dtype))
            return loss(logits, targets, weights)

        return jax.value_and_grad(f, argnums=(0, 1))(hidden, head)

    return jax.jit(run)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="16x1024,1x16384", help="BxL,BxL,...")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--out", default="loss.json")
    a = ap.parse_args()
    device = jax.devices()[0].device_kind
    print(f"device {device}, jax {jax.__version__}, python {platform.python_version()}", flush=True)
    result = {"device": device, "jax": jax.__version__, "config": vars(a), "rows": []}
    for size in a.sizes.split(","):
        b, t = (int(v) for v in size.split("x"))
        ks = jax.random.split(jax.random.key(b * t), 4)
        hidden = jax.random.normal(ks[0], (b, t, a.dim), jnp.bfloat16)
        head = jax.random.normal(ks[1], (a.dim, a.vocab), jnp.float32) * a.dim**-0.5
        targets = jax.random.randint(ks[2], (b, t), 0, a.vocab)
        weights = (jax.random.uniform(ks[3], (b, t)) > 0.1).astype(jnp.float32)
        args = [(hidden, head, targets, weights)]
        outs = {}
        for name, loss in LOSSES.items():
            sec, out = time_calls(_step(loss), args, a.reps, a.trials)
            outs[name] = jax.tree.leaves(out)
            row = {"B": b, "L": t, "loss": name, "ms": sec * 1e3}
            result["rows"].append(row)
            save(result, a.out)
            print(f"{stamp()} {b}x{t} {name:32s} {sec * 1e3:8.3f} ms", flush=True)
        fused, plain = outs.values()
        err = max(rel_err(x, r) for x, r in zip(fused, plain))
        ratio = result["rows"][-2]["ms"] / result["rows"][-1]["ms"]
        result["rows"][-2].update(max_rel_err_vs_autodiff=err, time_vs_autodiff=ratio)
        save(result, a.out)
        print(
            f"{stamp()} {b}x{t} fused / autodiff time {ratio:.3f}, max rel err of loss and gradients {err:.1e}",
            flush=True,
        )
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
