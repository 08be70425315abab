#!/usr/bin/env bash
# Packed documents on the GPU (data.document_masking), in stages named on the command line:
#   checks     what jax.nn.dot_product_attention takes here; the GPU tests of packed documents
#              (both Pallas kernels, cuDNN with the document mask) on the real device
#   ops        bench_ssd / bench_attention: each op with and without a packed layout, same run
#   step       bench_train_step: the paper configs' training step with masking against without,
#              same run, 16x1024 and 1x16384 (documents of mean DOC_LENGTH tokens)
#   gutenberg  two short runs of the paper's Attamba on Gutenberg, masking on and off, same
#              steps and data; held-out loss of each (needs .data/gutenberg.tar.xz and the tokenizer)
# Everything worth keeping goes to $OUT. Run from the repository root:
#   OUT=/tmp/docs bash benchmarks/documents_run.sh checks ops step gutenberg
set -uo pipefail
OUT=${OUT:-/tmp/documents_out}
WORK=${WORK:-/tmp/documents_run}
DOC_LENGTH=${DOC_LENGTH:-1024}
TOKENIZER=${TOKENIZER:-.data/gutenberg-32k.model}
STEPS=${STEPS:-240}
WARMUP=${WARMUP:-40}
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1 JAX_COMPILATION_CACHE_DIR=$WORK/jax_cache
log() { echo "[+${SECONDS}s] $*"; }

checks() {
  log "versions; what dot_product_attention takes"
  python3 - <<'EOF'
import inspect, jax
print("jax", jax.__version__, jax.devices())
print("jax.nn.dot_product_attention", inspect.signature(jax.nn.dot_product_attention))
EOF
  log "GPU tests of packed documents"
  JAX_PLATFORMS=cuda,cpu python3 -m pytest -m gpu -q -rs -p no:cacheprovider tests/test_documents.py tests/test_pallas_ssd.py \
    tests/test_pallas_boundary_window_attention.py -k "document or packed" 2>&1 | tail -15 | tee "$OUT/pytest_documents.log"
}

ops() {
  log "SSD: the model's stacked K/V shape (H=16, G=2), K=8"
  python3 -m benchmarks.bench_ssd --sizes 16x1024,4x32768 --heads 16 --groups 2 --implementations \
    pallas_gpu,pallas_gpu+docs,chunked,chunked+docs --doc-length "$DOC_LENGTH" --out "$OUT/ssd_documents.json" 2>&1 |
    grep -v Warning | tail -12
  log "attention: the paper's heads, K=8, W=8; cuDNN causal for the transformer"
  python3 -m benchmarks.bench_attention --lengths 1024,16384 --chunks 8 --tokens 16384 --implementations \
    pallas_gpu,pallas_gpu+docs,compressed,compressed+docs,cudnn,cudnn+docs --doc-length "$DOC_LENGTH" \
    --out "$OUT/attention_documents.json" 2>&1 | grep -v Warning | tail -14
}

step() {
  log "training step, masking on against off"
  python3 -m benchmarks.bench_train_step --models attamba,attamba-docs,transformer,transformer-docs \
    --shapes 16x1024,1x16384 --doc-length "$DOC_LENGTH" --out "$OUT/train_step_documents.json" 2>&1 |
    grep -v Warning | tail -16
}

gutenberg() {
  log "unpack and tokenize"
  tar -xJf .data/gutenberg.tar.xz -C "$WORK" || return 1
  python3 -m attamba_jax.prepare "$WORK/gutenberg/books/*.txt" --out "$WORK/gut" --tokenizer "$TOKENIZER" \
    --heldout-fraction 0.02 --workers "$(nproc)" 2>&1 | tr '\r' '\n' | grep -v '^ *[0-9]*%' | tail -3
  for masking in true false; do
    log "train, data.document_masking=$masking"
    python3 train.py --no-progress --workdir "$WORK/run_$masking" --config configs/paper/attamba_k8_w8.yaml \
      "data.train=[$WORK/gut.train.bin]" "data.eval=[$WORK/gut.heldout.bin]" "data.tokenizer=$TOKENIZER" \
      model.dtype=bfloat16 "data.document_masking=$masking" "optim.warmup_steps=$WARMUP" "train.steps=$STEPS" \
      train.log_every=40 "train.eval_every=$STEPS" train.eval_batches=32 "train.checkpoint_every=$STEPS" \
      > "$OUT/train_$masking.log" 2>&1
    log "exited with $?"
    cp "$WORK/run_$masking/metrics.jsonl" "$OUT/metrics_$masking.jsonl" 2>/dev/null
  done
  python3 - "$OUT" <<'EOF'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
rows = {}
for masking in ("true", "false"):
    records = [json.loads(line) for line in open(out / f"metrics_{masking}.jsonl")]
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    rows[masking] = {"train_loss": train[-1]["loss"], "heldout_loss": evals[-1]["loss"], "step": evals[-1]["step"],
                     "tokens_per_s": train[-1].get("tokens_per_s")}
    print(f"document_masking={masking:5s} step {rows[masking]['step']} train loss {rows[masking]['train_loss']:.4f} "
          f"held-out loss {rows[masking]['heldout_loss']:.4f}")
print(f"held-out loss, masked - unmasked: {rows['true']['heldout_loss'] - rows['false']['heldout_loss']:+.4f}")
json.dump(rows, open(out / "gutenberg_documents.json", "w"), indent=1)
EOF
}

for stage in "$@"; do
  case $stage in
    checks | ops | step | gutenberg) $stage ;;
    *) echo "unknown stage $stage (checks, ops, step, gutenberg)" >&2; exit 2 ;;
  esac
done
log "done"
