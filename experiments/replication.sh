#!/usr/bin/env bash
# Small-scale replication: Attamba vs the iso-KV and full transformers on the Gutenberg books,
# one model per GPU, the same token budget for all, then held-out and WikiText-2 evaluation.
#
#   1. unpack the books; tokenize them once with the carried 32k SentencePiece model (prepare),
#      holding out whole books (HELDOUT, by a hash of the file name);
#   2. train every model of MODELS at once, model i on GPU i mod #GPUs (CUDA_VISIBLE_DEVICES), up
#      to PER_GPU models sharing one GPU, each for STEPS steps of the paper's batch (16 x 1024)
#      and recipe with warmup scaled to STEPS/12;
#   3. evaluate every model on the held-out books and on WikiText-2 raw test (token / word
#      perplexity, bits per byte), and Attamba K=8 also at K=4 and K=16 (test-time chunk sweep);
#   4. with PASSKEY=1, passkey retrieval on every model (`attamba_jax.tasks.passkey`, filler from
#      the held-out books, docs/recall.md), the models at once;
#   5. pack metrics, evaluations, passkey results and configs into $OUT/replication.tar.gz for
#      `python experiments/summarize.py` (docs/results.md).
#
# EXTRA: overrides for every model; EXTRA_<model>: for that model only (e.g.
# EXTRA_transformer_isoparam="optim.lr=1e-3"). CHUNK_SWEEP: the test-time chunk sizes Attamba K8 is
# also evaluated at (default "4 16"; empty: none).
#
# Run from the repository root with .whl, .data/gutenberg.tar.xz, .data/gutenberg-32k.model and
# .data/wiki.test.raw in place (carried). A CPU dry run: STEPS=4 EXTRA="model.dim=64 ..." .
set -uo pipefail
OUT=${OUT:-/tmp/replication_out}
WORK=${WORK:-/tmp/replication}
TOKENIZER=${TOKENIZER:-.data/gutenberg-32k.model}
WIKI=${WIKI:-.data/wiki.test.raw}
MODELS=${MODELS:-"attamba_k8_w8 transformer_isokv8 transformer_isoparam attamba_k4_w32 transformer_isokv4"}
STEPS=${STEPS:-5500}                # docs/results.md: 5500 steps, 90M tokens per model
PER_GPU=${PER_GPU:-1}              # models trained at once on one GPU (they share it)
HELDOUT=${HELDOUT:-0.02}
TRAIN_LIMIT=${TRAIN_LIMIT:-420}   # seconds a training run may take before it is stopped (SIGTERM saves)
EXTRA=${EXTRA:-}
CHUNK_SWEEP=${CHUNK_SWEEP-4 16}
PASSKEY=${PASSKEY:-0}
PASSKEY_ARGS=${PASSKEY_ARGS:-}   # e.g. "--lengths 256 --trials 2" for a dry run
mkdir -p "$OUT" "$WORK/runs"
export PYTHONUNBUFFERED=1
log() { echo "[+${SECONDS}s] $*"; }

log "versions"
python3 -c "import jax; print('jax', jax.__version__, jax.devices())"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null
NGPU=$(nvidia-smi -L 2>/dev/null | wc -l)

log "unpack and tokenize"
[ -d "$WORK/gutenberg" ] || tar -xJf .data/gutenberg.tar.xz -C "$WORK" || exit 1
[ -f "$WORK/gut.train.bin" ] || python3 -m attamba_jax.prepare "$WORK/gutenberg/books/*.txt" --out "$WORK/gut" \
  --tokenizer "$TOKENIZER" --heldout-fraction "$HELDOUT" --workers "$(nproc)" 2>&1 | tr '\r' '\n' | grep -v '^ *[0-9]*%' || exit 1
# the held-out books as text files, chosen by the same rule prepare used
python3 - "$WORK" "$HELDOUT" > "$WORK/heldout_books.txt" <<'EOF'
import glob, os, sys
from attamba_jax.data import is_heldout
work, fraction = sys.argv[1], float(sys.argv[2])
for path in sorted(glob.glob(os.path.join(work, "gutenberg/books/*.txt"))):
    if is_heldout(os.path.basename(path), fraction):  # the key prepare used: the file's name
        print(path)
EOF
log "held-out books: $(wc -l < "$WORK/heldout_books.txt")"

log "train ${MODELS} for ${STEPS} steps each, ${PER_GPU} per GPU at once"
WARMUP=$(( STEPS / 12 > 1 ? STEPS / 12 : 1 ))
SLOTS=$(( NGPU > 0 ? NGPU * PER_GPU : 1 ))
MEM_FRACTION=$(python3 -c "print(round(0.9 / $PER_GPU, 2))")
i=0
pids=()
for m in $MODELS; do
  gpu=$(( NGPU > 0 ? i % NGPU : 0 ))
  own="EXTRA_$m"
  ( export CUDA_VISIBLE_DEVICES=$gpu XLA_PYTHON_CLIENT_MEM_FRACTION=$MEM_FRACTION
    start=$SECONDS
    timeout -s TERM "$TRAIN_LIMIT" python3 train.py --no-progress --config "configs/paper/$m.yaml" --workdir "$WORK/runs/$m" \
      "data.train=[$WORK/gut.train.bin]" "data.eval=[$WORK/gut.heldout.bin]" "data.tokenizer=$TOKENIZER" \
      "train.steps=$STEPS" "optim.warmup_steps=$WARMUP" "train.log_every=$(( STEPS / 60 > 1 ? STEPS / 60 : 1 ))" \
      "train.eval_every=$(( STEPS / 6 > 1 ? STEPS / 6 : 1 ))" "train.checkpoint_every=$STEPS" $EXTRA ${!own:-} > "$WORK/runs/$m.train.log" 2>&1
    echo "{\"model\": \"$m\", \"exit\": $?, \"wall_s\": $(( SECONDS - start )), \"gpus\": $NGPU, \"per_gpu\": $PER_GPU}" > "$WORK/runs/$m.wall.json" ) &
  pids+=($!)
  i=$((i + 1))
  # more models than slots: one wave per SLOTS models
  if [ $(( i % SLOTS )) -eq 0 ]; then wait "${pids[@]}"; pids=(); fi
done
wait "${pids[@]}" 2>/dev/null
for m in $MODELS; do log "$m: $(cat "$WORK/runs/$m.wall.json")"; tail -2 "$WORK/runs/$m.train.log"; done

log "evaluate (every evaluation at once, several processes per GPU)"
mapfile -t BOOKS < "$WORK/heldout_books.txt"
i=0
pids=()
evaluate() {  # model gpu name args...
  local m=$1 gpu=$2 name=$3; shift 3
  CUDA_VISIBLE_DEVICES=$gpu XLA_PYTHON_CLIENT_MEM_FRACTION=0.1 python3 -m attamba_jax.evaluate --workdir "$WORK/runs/$m" \
    --batch-size 32 --json "$WORK/runs/$m.eval.$name.json" "$@" > "$WORK/runs/$m.eval.$name.log" 2>&1 &
  pids+=($!)
}
for m in $MODELS; do
  evaluate "$m" $(( NGPU > 0 ? i % NGPU : 0 )) heldout --text "${BOOKS[@]}"; i=$((i + 1))
  evaluate "$m" $(( NGPU > 0 ? i % NGPU : 0 )) wiki --text "$WIKI"; i=$((i + 1))
  if [ "$m" = attamba_k8_w8 ]; then
    for k in $CHUNK_SWEEP; do
      evaluate "$m" $(( NGPU > 0 ? i % NGPU : 0 )) heldout.k$k --text "${BOOKS[@]}" --token-chunk $k; i=$((i + 1))
      evaluate "$m" $(( NGPU > 0 ? i % NGPU : 0 )) wiki.k$k --text "$WIKI" --token-chunk $k; i=$((i + 1))
    done
  fi
  if [ "$NGPU" -eq 0 ]; then wait "${pids[@]}"; pids=(); fi
done
wait "${pids[@]}"
for f in "$WORK"/runs/*.eval.*.log; do echo "== $(basename "$f")"; grep -v Warning "$f" | tail -2; done

if [ "$PASSKEY" = 1 ]; then
  log "passkey retrieval (every model at once)"
  i=0
  pids=()
  for m in $MODELS; do
    CUDA_VISIBLE_DEVICES=$(( NGPU > 0 ? i % NGPU : 0 )) XLA_PYTHON_CLIENT_MEM_FRACTION=$MEM_FRACTION \
      python3 -m attamba_jax.tasks.passkey --workdir "$WORK/runs/$m" --books "${BOOKS[@]}" \
      --out "$WORK/runs/$m.passkey.json" $PASSKEY_ARGS > "$WORK/runs/$m.passkey.log" 2>&1 &
    pids+=($!)
    i=$((i + 1))
  done
  wait "${pids[@]}"
  for m in $MODELS; do echo "== $m passkey"; grep '^|' "$WORK/runs/$m.passkey.log" | head -3; done
fi

log "pack"
(cd "$WORK/runs" && tar -czf "$OUT/replication.tar.gz" ./*.json ./*.log ./*/metrics.jsonl ./*/config.yaml ./*/loss.png 2>/dev/null)
ls -la "$OUT"
log "done"
