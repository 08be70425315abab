#!/usr/bin/env bash
# Hardware counters of the SSD Pallas kernels with Nsight Compute, one forward and one backward
# launch at the model's shape, and the registers / spills ptxas reports for them.
#   OUT=/tmp/ncu SIZE=16x1024 HEADS=16 GROUPS=2 bash benchmarks/ncu_ssd.sh
# Writes $OUT/ssd_{fwd,bwd}.txt (ncu's details page) and $OUT/ssd_ptxas.txt. Run from the
# repository root on the GPU machine; PYTHONPATH must reach the repository.
set -uo pipefail
OUT=${OUT:-/tmp/ncu_ssd}
SIZE=${SIZE:-16x1024}
HEADS=${HEADS:-16}     # the model's stacked K and V SSMs: 2 x 8 heads
GROUPS=${GROUPS:-2}
SECTIONS=${SECTIONS:-"SpeedOfLight LaunchStats Occupancy WarpStateStats SchedulerStats MemoryWorkloadAnalysis ComputeWorkloadAnalysis"}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
bench=(python3 benchmarks/bench_ssd.py --sizes "$SIZE" --implementations pallas_gpu --reps 1 --trials 1
       --heads "$HEADS" --groups "$GROUPS" --out /tmp/ncu_ssd_bench.json)
sections=()
for s in $SECTIONS; do sections+=(--section "$s"); done
for kernel in ssd_fwd ssd_bwd; do
    ncu --clock-control none --kernel-name "regex:$kernel" --launch-count 1 "${sections[@]}" \
        -f -o "/tmp/$kernel" "${bench[@]}" > "/tmp/$kernel.log" 2>&1 || tail -20 "/tmp/$kernel.log"
    ncu --import "/tmp/$kernel.ncu-rep" --page details > "$OUT/$kernel.txt" 2>&1 && echo "wrote $OUT/$kernel.txt"
done
# Registers and spills: dump the compiled module's PTX and assemble the SSD kernels with ptxas.
rm -rf /tmp/ncu_ssd_dump
XLA_FLAGS="--xla_dump_to=/tmp/ncu_ssd_dump" "${bench[@]}" > /dev/null 2>&1
for ptx in $(grep -l "ssd_" /tmp/ncu_ssd_dump/*.ptx 2>/dev/null); do
    echo "== $ptx"
    ptxas -arch=sm_90a -v "$ptx" -o /dev/null 2>&1 | grep -A2 "ssd_"
done > "$OUT/ssd_ptxas.txt"
echo "wrote $OUT/ssd_ptxas.txt ($(wc -l < "$OUT/ssd_ptxas.txt") lines)"
