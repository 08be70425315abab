"""Does the input pipeline limit training?

1. The host pipeline alone: packed [B, T] batches per second from the config's sources (e.g.
   memory-mapped .bin files), for several reader-thread counts, as tokens/s.
2. The train step fed by the real pipeline (next batch, host->device, step) against the same
   jitted step on one synthetic batch already on the device, in ms/step; equal times mean the
   pipeline hides behind the device step.

    python -m benchmarks.input_pipeline --config configs/paper/attamba_k8_w8.yaml --workdir /tmp/bench \\
        --threads 0,4,16 --json pipeline.json data.train=[.data/gut.train.bin] data.tokenizer=.data/tok.model
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import time

import jax

from attamba_jax import data as data_lib
from attamba_jax.config import load_config
from attamba_jax.tokenizer import load_tokenizer
from attamba_jax.trainer import Trainer


def host_tokens_per_second(cfg, corpus, tokenizer, threads: int, seconds: float) -> float:
    dcfg = dataclasses.replace(cfg.data, threads=threads, prefetch=max(cfg.data.prefetch, threads))
    it = iter(
        data_lib.train_dataset(
            dcfg, corpus.train, seed=cfg.seed, bos_id=tokenizer.bos_id, vocab_size=cfg.model.vocab_size
        )
    )
    for _ in range(5):  # threads started, buffers warm
        next(it)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        batch = next(it)
        n += batch["inputs"].size
    return n / (time.perf_counter() - start)


def step_ms(trainer: Trainer, batches, steps: int) -> float:
    """Mean wall time of ``steps`` steps, each fed by ``batches()`` (a fresh device batch or a fixed one)."""
    metrics = None
    start = time.perf_counter()
    for _ in range(steps):
        metrics = trainer.step(batches())
    jax.block_until_ready(metrics)
    return (time.perf_counter() - start) / steps * 1e3


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--workdir", required=True, help="a scratch workdir (must hold no checkpoint)")
    parser.add_argument("--threads", default="0,4,16", help="reader-thread counts to measure the host pipeline with")
    parser.add_argument("--seconds", type=float, default=4.0, help="per host measurement")
    parser.add_argument("--steps", type=int, default=50, help="timed train steps per measurement")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    corpus = data_lib.load_corpus(cfg.data, tokenizer, cfg.model.vocab_size)
    out = {
        "device": jax.devices()[0].device_kind,
        "jax": jax.__version__,
        "batch": [cfg.data.batch_size, cfg.data.seq_len],
        "host_tokens_per_s": {},
    }
    print(f"{len(corpus.train):,} training tokens; batch {cfg.data.batch_size} x {cfg.data.seq_len}")
    for threads in (int(t) for t in args.threads.split(",")):
        tps = host_tokens_per_second(cfg, corpus, tokenizer, threads, args.seconds)
        out["host_tokens_per_s"][threads] = tps
        print(f"host pipeline, {threads:>2} reader threads: {tps / 1e6:8.2f} M tokens/s")

    trainer = Trainer(cfg, args.workdir, progress=False)
    if trainer.start_step:
        raise SystemExit(f"{args.workdir} holds checkpoints; use an empty scratch workdir")
    real = lambda: trainer.device_batch(next(trainer.train_iter))
    step_ms(trainer, real, 3)  # compile and warm up
    fixed = real()
    synthetic = lambda: fixed
    out["real_ms"] = [step_ms(trainer, real, args.steps)]
    out["synthetic_ms"] = step_ms(trainer, synthetic, args.steps)
    out["real_ms"].append(step_ms(trainer, real, args.steps))
    trainer.close()
    tokens = cfg.data.batch_size * cfg.data.seq_len
    print(f"train step, real pipeline:    {out['real_ms'][0]:7.2f} / {out['real_ms'][1]:7.2f} ms  (before / after)")
    print(f"train step, synthetic batch:  {out['synthetic_ms']:7.2f} ms")
    print(f"device tokens/s (synthetic):  {tokens / out['synthetic_ms'] * 1e3 / 1e6:7.3f} M")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
