#!/usr/bin/env bash
# One device call for the training work: the backward kernels' checks and timings at the default
# configs (bwd_dev.py, with and without the fused RMSNorm), the backward's host time at small T
# (host_profile.py --backward-cases), the training benchmark for the given
# H (train_bench.py: mhc, eager, torch.compile, Liger-Kernel), the GPU autograd tests, then the
# forward ops' eager table (bench.py --eager). Each
# step has a time cap so that a slow one leaves the rest their turn; logs and the CSV under $OUT.
#   benchmarks/train_gpu.sh [H]     (default 4096; MHC_MODEL_S=150 adds model_bench's training step)
# Liger-Kernel comes from .whl-liger/ (benchmarks/README.md, "Training").
set -uo pipefail
cd "$(dirname "$0")/.."
H="${1:-4096}"
OUT="${OUT:-/tmp/mhc-out}"; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
compgen -G ".whl-liger/*.whl" >/dev/null &&
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl-liger/*.whl
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader | tee "$OUT/device.txt"
(cd benchmarks && timeout "${MHC_DEV_S:-130}" python bwd_dev.py --H "$H" &&
   timeout 60 python bwd_dev.py --norm --ops pre fused_post_pre --H "$H") > "$OUT/bwd-dev-h$H.log" 2>&1
# The backward's host time at small T (train_bench's backward at T = 512 and 4096 took far longer than
# its kernels on the H100: benchmarks/results/backward-h100.md).
timeout "${MHC_HOST_S:-60}" python benchmarks/host_profile.py --no-blocks --backends triton --cases "" --grad-cases "" \
  --backward-cases pre:512,pre:4096,post:512 --calls 200 > "$OUT/host-backward.log" 2>&1
# The whole grid takes half an hour (torch.compile and Liger compile per cell: 20-45 s each on
# the H100); one call takes two T values, MHC_TRAIN_T picks them.
timeout "${MHC_TRAIN_S:-230}" python benchmarks/train_bench.py --H "$H" --T "${MHC_TRAIN_T:-4096,16384}" \
  --out "$OUT/train-h$H.csv" \
  > "$OUT/train-h$H.log" 2>&1
timeout "${MHC_TESTS_S:-110}" python -m pytest -q --maxfail=3 -rs tests/test_gpu_autograd.py -k "${MHC_TESTS_K:-not 100_runs}" \
  > "$OUT/gpu-autograd-tests.log" 2>&1
# The model benchmark's training step (unpatched and patched, one run), when MHC_MODEL_S is set.
if [[ ${MHC_MODEL_S:-0} -gt 0 ]]; then
  timeout "$MHC_MODEL_S" python benchmarks/model_bench.py --phases train --out "$OUT" > "$OUT/model-train.log" 2>&1
fi
# The eager (host-bound) table of the forward ops, for the one-way-in change's cost on the device.
timeout "${MHC_EAGER_S:-60}" python benchmarks/bench.py --quick --eager --no-cold --impls triton,eager --H "$H" \
  --out "$OUT/eager-h$H.csv" > "$OUT/eager-h$H.log" 2>&1
echo "== bwd_dev"; grep -v "^copy" "$OUT/bwd-dev-h$H.log" | tail -30
echo "== host time of the backward"; grep "^== " "$OUT/host-backward.log"
echo "== train_bench"; tail -40 "$OUT/train-h$H.log"
echo "== tests"; tail -15 "$OUT/gpu-autograd-tests.log"
[[ -f $OUT/model-train.log ]] && { echo "== model (train)"; tail -25 "$OUT/model-train.log"; }
echo "== eager"; tail -25 "$OUT/eager-h$H.log"
