#!/usr/bin/env bash
# Several GPUs of one host (bench_scaling.py), in stages named on the command line; each stage is
# sized to finish in under ten minutes on 4 GPUs. The cases follow the GPUs this host has (1, 2, 4).
#   kernels-365m   the 365M config at L=2048, 4 rows per GPU: data, fsdp and tensor meshes, the
#                  Pallas kernels (run per device under shard_map) against the XLA paths, profiled
#                  (each case's kernel families, the kernels' and NCCL's share of the step)
#   kernels-paper  the paper's Attamba at 16x1024 per GPU, the same meshes and paths
#   context-131k   the paper's Attamba and transformer at 1x131072 on 1, 2 and 4 GPUs of a context
#                  mesh, side by side (Attamba's kernels and XLA paths; the transformer's
#                  all-gather context parallelism), profiled: scaling efficiency, the bytes each step
#                  moves over the context axis (compiled HLO, "moved MB") and NCCL's time
#   context-365m   the 365M config at 1x131072 on the same context meshes
#   context-long   the longest sequences: LENGTHS (default 524288 and 1048576) per sequence on all
#                  the GPUs of a context mesh, with the memory savers (block remat, sliced loss),
#                  Attamba against the transformer
# Everything worth keeping goes to $OUT. Run from the repository root:
#   OUT=/tmp/multi bash benchmarks/multi_gpu_run.sh kernels-365m kernels-paper
set -uo pipefail
OUT=${OUT:-/tmp/multi_gpu_out}
LENGTHS=${LENGTHS:-"524288 1048576"}
GPUS=${GPUS:-$(nvidia-smi -L | wc -l)}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
log() { echo "[+${SECONDS}s] $*"; }
ATTAMBA=configs/paper/attamba_k8_w8.yaml
TRANSFORMER=configs/paper/transformer_isoparam.yaml
PATHS=chunked:compressed,pallas_gpu:pallas_gpu

cases() { # the cases of a mesh kind ($1: "data", "context"...) this host can run, with one GPU first
  local out=1
  for n in 2 4; do
    if [ "$n" -le "$GPUS" ]; then
      case $1 in
        meshes) out="$out,$n-data,$n-fsdp"; [ "$n" = 2 ] && out="$out,2-tensor"; [ "$n" = 4 ] && out="$out,4-data-tensor" ;;
        context) out="$out,$n-context" ;;
      esac
    fi
  done
  echo "$out"
}

scaling() { # name, then bench_scaling's arguments
  local name=$1
  shift
  log "$name"
  python3 -m benchmarks.bench_scaling --out "$OUT/$name.json" "$@" 2>&1 | grep -v "^W0\|^I0" | tee "$OUT/$name.log" | tail -30
}

kernels-365m() {
  scaling scaling_365m --cases "$(cases meshes)" --paths $PATHS --profile --deadline 540
}

kernels-paper() {
  scaling scaling_paper --config $ATTAMBA --cases "$(cases meshes)" --length 1024 --per-device-batch 16 \
    --paths $PATHS --profile --deadline 540
}

context-131k() {
  scaling context_131k --config $ATTAMBA,$TRANSFORMER --cases "$(cases context)" --length 131072 \
    --per-device-batch 1 --paths $PATHS --profile --deadline 540
}

context-365m() {
  scaling context_365m --config configs/scale/attamba_350m.yaml --cases "$(cases context)" --length 131072 \
    --per-device-batch 1 --paths $PATHS --deadline 540
}

context-long() {
  local widest
  widest=$(cases context | tr , '\n' | tail -1)
  for length in $LENGTHS; do
    scaling "context_$length" --config $ATTAMBA,$TRANSFORMER --cases "$widest" --length "$length" \
      --per-device-batch 1 --paths pallas_gpu:pallas_gpu --set train.remat=block train.loss_slice=2048 \
      --warmup 1 --steps 2 --repeats 2 --deadline 540
  done
}

for stage in "$@"; do
  case $stage in
    kernels-365m | kernels-paper | context-131k | context-365m | context-long) "$stage" ;;
    *) echo "unknown stage: $stage" >&2; exit 2 ;;
  esac
done
