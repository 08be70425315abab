#!/usr/bin/env bash
# Short-context speed on one GPU, in stages named on the command line (each under ten minutes):
#   checks   the GPU tests of every kernel (SSD, boundary + window attention, the SSMs' conv and
#            gated norm, decode step) on the real device, with a line per failure and the count at
#            the end
#   ssd      the SSD kernel at the paper's single-SSM shape: 4x32768 and 16x1024, forward and
#            forward+backward, kernel time from the profiler (% of the card's bandwidth)
#   sweeps   the launch settings of the SSD kernel (the backward's loop over heads pipelined, among
#            others) at 4x32768 and of the SSMs' conv and gated-norm kernels at 16x1024; then those
#            two ops' kernels against their XLA paths at 16x1024, 4x4096 and 1x32768
#   step     the whole training step, Attamba (auto, and attamba-kernels: every GPU kernel named, the
#            SSMs' conv and gated norm too) against the transformer in one run, at 16x1024,
#            8x2048, 4x4096, 64x1024 and 1x32768 (tokens/s, step-time ratio, MFU), and a profile of
#            16x1024 with every kernel attributed to its op (compiled HLO kept)
#   decode   decoding at 4k and 32k context, batch 1 and 32, Attamba against the transformer; then a
#            profile of 4k/batch 1 and 32k/batch 32, kernel by kernel
# Everything worth keeping goes to $OUT. Run from the repository root:
#   OUT=/tmp/short bash benchmarks/short_context_run.sh checks ssd
set -uo pipefail
OUT=${OUT:-/tmp/short_context_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
log() { echo "[+${SECONDS}s] $*"; }
quiet() { grep -v "^W0\|^I0"; }

checks() {
  log "GPU tests of the kernels"
  JAX_PLATFORMS=cuda,cpu python3 -m pytest -o addopts="" -q -rfE -m gpu -p no:cacheprovider tests/test_pallas_ssd.py \
    tests/test_pallas_boundary_window_attention.py tests/test_ssm_conv.py tests/test_gated_norm.py tests/test_ssm_step.py \
    >"$OUT/gpu_tests.log" 2>&1
  echo "pytest exit status $?"
  grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/gpu_tests.log" | tail -20
}

ssd() {
  log "SSD kernel, paper sizes"
  python3 -m benchmarks.bench_ssd --implementations pallas_gpu --sizes 4x32768,16x1024 --reps 20 --trials 3 \
    --out "$OUT/ssd.json" 2>&1 | quiet | tee "$OUT/ssd.log" | tail -12
}

sweeps() {
  log "SSD launch settings at 4x32768"
  python3 -m benchmarks.bench_ssd --implementations pallas_gpu --sizes 16x1024 --sweep 4x32768 --reps 20 --trials 2 \
    --out "$OUT/ssd_sweep.json" 2>&1 | quiet | tee "$OUT/ssd_sweep.log" | grep "sweep ssd"
  log "the SSMs' conv and gated norm: launch settings at 16x1024, kernels against XLA"
  python3 -m benchmarks.bench_ssm_ops --sizes 16x1024,4x4096,1x32768 --sweep 16x1024 --out "$OUT/ssm_ops.json" \
    2>&1 | quiet | tee "$OUT/ssm_ops.log" | sed -n '/kernel \/ xla/,$p'
}

step() {
  log "training step, Attamba against the transformer"
  python3 -m benchmarks.bench_train_step --models attamba,attamba-kernels,transformer --shapes 16x1024,8x2048,4x4096,64x1024,1x32768 \
    --profile-shapes 16x1024 --profile-top 60 --hlo-dir "$OUT/hlo_step" --deadline 500 --out "$OUT/train_step.json" \
    2>&1 | quiet >"$OUT/train_step.log"
  grep -E "^(attamba|attamba-kernels|transformer) |tokens/s ratio" "$OUT/train_step.log"
}

decode() {
  log "decode, Attamba against the transformer"
  python3 -m benchmarks.bench_decode --contexts 4096 32768 --batches 1 32 --repeats 3 --out "$OUT/decode.json" \
    2>&1 | quiet | tee "$OUT/decode.log" | grep "tok/s"
  for shape in "4096 1" "32768 32"; do
    set -- $shape
    log "decode profile, context $1, batch $2"
    python3 -m benchmarks.bench_decode --contexts "$1" --batches "$2" --profile --profile-top 40 \
      --out "$OUT/decode_profile_$1_$2.json" 2>&1 | quiet >"$OUT/decode_profile_$1_$2.log"
    grep "kernels per step" "$OUT/decode_profile_$1_$2.log"
  done
}

for stage in "$@"; do
  case $stage in
    checks | ssd | sweeps | step | decode) "$stage" ;;
    *) echo "unknown stage: $stage" >&2; exit 2 ;;
  esac
done
