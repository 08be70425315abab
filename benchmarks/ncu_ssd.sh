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
# Leave ncu room to save and restore memory, and launch every kernel on its own: inside XLA's
# command buffers (CUDA graphs) ncu saw no kernel at all.
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_command_buffer="
bench=(python3 benchmarks/bench_ssd.py --sizes "$SIZE" --implementations pallas_gpu --reps 1 --trials 1
       --heads "$HEADS" --groups "$GROUPS" --out /tmp/ncu_ssd_bench.json)
sections=()
for s in $SECTIONS; do sections+=(--section "$s"); done
for kernel in ssd_fwd ssd_bwd; do
    ncu --clock-control none --graph-profiling node --kernel-name "regex:$kernel" --launch-count 1 "${sections[@]}" \
        -f -o "/tmp/$kernel" "${bench[@]}" > "/tmp/$kernel.log" 2>&1
    grep -E "==(PROF|ERROR|WARNING)==" "/tmp/$kernel.log" | head -20
    { ncu --import "/tmp/$kernel.ncu-rep" --page details || tail -40 "/tmp/$kernel.log"; } > "$OUT/$kernel.txt" 2>&1
    echo "wrote $OUT/$kernel.txt"
done
# Registers and spills: dump the compiled module's PTX and assemble the SSD kernels with ptxas.
rm -rf /tmp/ncu_ssd_dump
XLA_FLAGS="$XLA_FLAGS --xla_dump_to=/tmp/ncu_ssd_dump" "${bench[@]}" > /dev/null 2>&1
for ptx in $(grep -rl --include="*.ptx" "ssd_bwd" /tmp/ncu_ssd_dump 2>/dev/null); do
    echo "== $ptx"
    ptxas -arch=sm_90a -v "$ptx" -o /dev/null 2>&1 | grep -A2 "ssd_"
done > "$OUT/ssd_ptxas.txt"
[ -s "$OUT/ssd_ptxas.txt" ] || { echo "no PTX with the SSD kernels in the dump; files naming them:"; grep -rl "ssd_bwd" /tmp/ncu_ssd_dump | head; ls /tmp/ncu_ssd_dump | sed -n '1,5p;/ptx/p' | head -20; } >> "$OUT/ssd_ptxas.txt"
echo "wrote $OUT/ssd_ptxas.txt ($(wc -l < "$OUT/ssd_ptxas.txt") lines)"
