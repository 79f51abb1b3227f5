#!/usr/bin/env bash
# One device call of the backward development loop (benchmarks/bwd_dev.py): checks and timings of
# every op at the default configs, the fused RMSNorm, a sweep of the streaming pass's tile, and
# ncu's per-kernel time and bytes. Logs under $OUT.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp/mhc-out}"; mkdir -p "$OUT"
cd benchmarks
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader | tee "$OUT/dev.log"
python bwd_dev.py "$@" 2>&1 | tee -a "$OUT/dev.log"
python bwd_dev.py --norm --ops pre fused_post_pre "$@" 2>&1 | tee -a "$OUT/dev.log"
# The streaming pass runs one CTA per SM (207-255 registers at 8 warps): more pipeline stages are
# its way to more bytes in flight, wider tiles the other (docs/tuning/triton.md, "Backward").
for s in "res_stages=3" "res_stages=4" "res_bm=32 res_bh=64" "res_bm=16 res_bh=128" "res_bm=32 res_bh=32" \
         "bh=64" "bm=128 stats_warps=8" "stats_stages=4"; do
  timeout 120 python bwd_dev.py --ops pre fused_post_pre --H 4096 --T 16384 --set $s 2>&1 | grep -v "^copy" | tee -a "$OUT/dev.log"
done
timeout 150 ncu --clock-control none -k regex:'_bwd|prep' \
  --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum,launch__registers_per_thread \
  python bwd_dev.py --once --H 4096 --T 16384 > "$OUT/ncu.txt" 2>&1
grep -E "^  [_a-z]|duration|bytes|registers" "$OUT/ncu.txt" | head -90
