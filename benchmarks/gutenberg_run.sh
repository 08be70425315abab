#!/usr/bin/env bash
# One short real run of a paper config on the Gutenberg corpus with a SentencePiece tokenizer:
#   1. unpack the books and tokenize them once into .bin files (prepare, all CPUs);
#   2. input pipeline alone (tokens/s from the memory-mapped .bin), and the train step fed by the
#      real pipeline against the same step on a synthetic batch (benchmarks/input_pipeline.py);
#   3. train.py: SIGTERM once STOP_AT is logged (it saves and exits), then the same command
#      resumes from that checkpoint and finishes STEPS.
# Everything worth keeping goes to $OUT. Run from the repository root, with the books archive
# and the tokenizer in .data/ (see BENCHMARKS.md for the command used on the GPU machine).
set -uo pipefail
OUT=${OUT:-/tmp/gutenberg_out}
CONFIG=${CONFIG:-configs/paper/attamba_k8_w8.yaml}
TOKENIZER=${TOKENIZER:-.data/gutenberg-32k.model}
STEPS=${STEPS:-240}        # the whole run (the cosine schedule ends here)
STOP_AT=${STOP_AT:-120}    # SIGTERM once this step is logged (a multiple of LOG_EVERY)
LOG_EVERY=${LOG_EVERY:-20}
WARMUP=${WARMUP:-40}
WORK=${WORK:-/tmp/gutenberg_run}
BOOKS=${BOOKS:-}
HELDOUT=${HELDOUT:-0.02}
EXTRA=${EXTRA:-}           # more key=value overrides (a CPU dry run shrinks the model here)
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1 JAX_COMPILATION_CACHE_DIR=$WORK/jax_cache
log() { echo "[+${SECONDS}s] $*"; }

log "versions"
python3 -c "import jax, flax, optax, grain, orbax.checkpoint as o; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'orbax', o.__version__, jax.devices())"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
echo "cpus: $(nproc)"

log "unpack"
tar -xJf .data/gutenberg.tar.xz -C "$WORK" || exit 1
BOOKS=${BOOKS:-$WORK/gutenberg/books/*.txt}

log "prepare"
python3 -m attamba_jax.prepare "$BOOKS" --out "$WORK/gut" --tokenizer "$TOKENIZER" --heldout-fraction "$HELDOUT" \
  --workers "$(nproc)" 2>&1 | tr '\r' '\n' | grep -v '^ *[0-9]*%' || exit 1

COMMON=(--config "$CONFIG" "data.train=[$WORK/gut.train.bin]" "data.eval=[$WORK/gut.heldout.bin]" "data.tokenizer=$TOKENIZER"
  model.dtype=bfloat16 model.ssm_implementation=chunked model.attention_implementation=compressed
  "optim.warmup_steps=$WARMUP" "train.steps=$STEPS" $EXTRA)

log "input pipeline and step time (real vs synthetic batches)"
timeout "${STAGE_LIMIT:-150}" python3 -m benchmarks.input_pipeline --workdir "$WORK/bench" --threads 0,4,16 --seconds 3 --steps 40 \
  --json "$OUT/pipeline.json" "${COMMON[@]}" 2>&1 | grep -v Warning

TRAIN=(python3 train.py --no-progress --workdir "$WORK/run" "${COMMON[@]}" "train.log_every=$LOG_EVERY"
  "train.eval_every=$STEPS" train.eval_batches=8 "train.checkpoint_every=$((STOP_AT / 2))")
log "train, SIGTERM after step $STOP_AT"
"${TRAIN[@]}" > "$OUT/train1.log" 2>&1 &
pid=$!
deadline=$((SECONDS + ${STAGE_LIMIT:-150}))
until grep -q "\"step\": $STOP_AT," "$WORK/run/metrics.jsonl" 2>/dev/null; do
  kill -0 $pid 2>/dev/null || break
  [ $SECONDS -lt $deadline ] || { log "step $STOP_AT not reached in time; stopping anyway"; break; }
  sleep 0.5
done
kill -TERM $pid 2>/dev/null
wait $pid
log "first run exited with $? (143 = SIGTERM, saved)"
grep -v Warning "$OUT/train1.log" | tail -5
echo "checkpoints: $(ls "$WORK/run/checkpoints")"

log "same command again: resume"
timeout "${STAGE_LIMIT:-150}" "${TRAIN[@]}" > "$OUT/train2.log" 2>&1
log "second run exited with $?"
grep -v Warning "$OUT/train2.log" | tail -5
echo "checkpoints: $(ls "$WORK/run/checkpoints")"
cp "$WORK/run/metrics.jsonl" "$WORK/run/loss.png" "$OUT/" 2>/dev/null
python3 - "$WORK/run/metrics.jsonl" <<'EOF'
import json, sys
for r in map(json.loads, open(sys.argv[1])):
    extra = "" if r["kind"] == "eval" else f" grad_norm {r['grad_norm']:.3f} lr {r['lr']:.2e} tok/s {r['tokens_per_s'] or 0:,.0f} mfu {r['mfu'] or 0:.3f}"
    print(f"{r['kind']:5} step {r['step']:4} loss {r['loss']:.4f}{extra}")
EOF
log "done"
