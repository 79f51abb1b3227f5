#!/usr/bin/env bash
# One device call: the GPU test suite, then the benchmark, with every log and result under $OUT.
#   benchmarks/gpu_run.sh [bench args...]      e.g. benchmarks/gpu_run.sh --quick
# Environment: MHC_TESTS=all (default: the GPU suites tests/test_gpu*.py) | suite (every test file,
#              the contract tests included, on the GPU) | none | a pytest -k expression for the GPU suites;
#              MHC_TEST_FILES: what MHC_TESTS=suite runs (default: tests);
#              MHC_PYTEST_ARGS: extra pytest arguments (e.g. -v, which makes xdist name every
#              result as it lands, so a cut run still names its failures);
#              MHC_BENCH=1 (default) | 0; MHC_WARM_PEERS=0 (default) | 1 (see below);
#              MHC_GPU_SITE=.gpu-site (default): where site.tar.xz and tlcache are. Packages
#              under /tmp/site (installed by an earlier call from wheels downloaded on a machine with
#              internet, or unpacked here from .gpu-site) are found through PYTHONPATH.
# Writes at most 7 files (the device call returns 8): device.txt, gpu-tests.log, bench.log and
# the benchmark's CSV, markdown table and two plots.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
export TILELANG_CACHE_DIR="${TILELANG_CACHE_DIR:-/tmp/tlcache}"
OUT="${OUT:-/tmp/mhc-out}"
mkdir -p "$OUT"
# tilelang, z3, tvm-ffi and tile-kernels packed in one archive (.gpu-site/site.tar.xz, carried),
# and TileLang kernels compiled ahead of time (.gpu-site/tlcache), as the TileLang backend's
# development loop carries them; unpacked once per machine.
site="${MHC_GPU_SITE:-.gpu-site}"
if [[ -f $site/site.tar.xz && ! -d /tmp/site/tilelang ]]; then
  mkdir -p /tmp/site && tar -xJf "$site/site.tar.xz" -C /tmp/site
fi
# Extra wheels in $site/whl (e.g. pytest-xdist and execnet, which MHC_TESTS=suite uses to run
# the suite on several CPU cores: the contract tests' time is mostly kernel compilation).
if compgen -G "$site/whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$site"/whl/*.whl
fi
# (tlcache.tar.xz: the same, packed: TileLang's cache is ~0.4 MB a kernel, 5x less compressed,
# and a call carries 64 MiB at most.)
if [[ ! -d $TILELANG_CACHE_DIR ]]; then
  mkdir -p "$TILELANG_CACHE_DIR"
  [[ -d $site/tlcache ]] && cp -r "$site/tlcache/." "$TILELANG_CACHE_DIR/"
  [[ -f $site/tlcache.tar.xz ]] && tar -xJf "$site/tlcache.tar.xz" -C "$TILELANG_CACHE_DIR"
fi
# MHC_WARM_PEERS=1: compile tile-kernels' kernels (one per op and H; T is dynamic in them) in the
# background while the tests run, so that the benchmark call after this one finds them cached.
if [[ ${MHC_WARM_PEERS:-0} == 1 ]]; then
  setsid nohup python3 benchmarks/bench.py --impls tile-kernels --T 1 --no-cold --rep-ms 1 --out /tmp/mhc-warm \
    >/tmp/mhc-warm.log 2>&1 < /dev/null &
fi
{ date -u; cat SOURCE.txt 2>/dev/null || git log -1 --format='source: commit %H %s' 2>/dev/null; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
  python3 -m mhc info --H 4096 --T 4096; } >"$OUT/device.txt" 2>&1
tail -n 12 "$OUT/device.txt"
rc=0
tests="${MHC_TESTS:-all}"
if [[ $tests != none ]]; then
  if [[ $tests == suite ]]; then
    # The whole suite on the GPU: every backend that can serve CUDA tensors runs the contract
    # tests (derandomised draws, as in CI). TileLang compiles one kernel per (op, n, H) drawn,
    # ~10 s each: carry them precompiled in $site/tlcache (python -m mhc aot ... --n ... --H ...).
    par=(); python3 -c "import xdist" 2>/dev/null && par=(-n "${MHC_TEST_JOBS:-8}")
    MHC_HYPOTHESIS_PROFILE=${MHC_HYPOTHESIS_PROFILE:-ci} python3 -m pytest -q ${MHC_TEST_FILES:-tests} -rfEs -p no:cacheprovider \
      "${par[@]}" --durations=15 ${MHC_PYTEST_ARGS:-} >"$OUT/gpu-tests.log" 2>&1
  else
    # The GPU suites: with pytest-xdist (on the H200 machine's image) in 6 workers sharing the GPU
    # they reached 93 % in 270 s there (2026-11-30, benchmarks/results/gpu-tests-h200-merged-cut.log);
    # serially they outrun a 10-minute call. -v names every result as it lands, so a cut run
    # still says what passed; pytest-timeout stops a test that hangs.
    k=(); [[ $tests != all ]] && k=(-k "$tests")
    par=(); python3 -c "import xdist" 2>/dev/null && par=(-n "${MHC_TEST_JOBS:-6}" -v)
    python3 -c "import pytest_timeout" 2>/dev/null && par+=(--timeout 240)
    python3 -m pytest -q -m gpu tests/test_gpu.py tests/test_gpu_autograd.py -rfEs -p no:cacheprovider "${par[@]}" \
      "${k[@]}" ${MHC_PYTEST_ARGS:-} >"$OUT/gpu-tests.log" 2>&1
  fi
  trc=$?; rc=$((rc | trc))
  grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/gpu-tests.log" | tail -n 25
  echo "gpu tests exit $trc"
fi
if [[ ${MHC_BENCH:-1} == 1 ]]; then
  python3 benchmarks/bench.py --out "$OUT" "$@" >"$OUT/bench.log" 2>&1
  brc=$?; rc=$((rc | brc))
  grep -E "copy bandwidth|skip |FAIL|CHECK|rows in" "$OUT/bench.log" | head -n 40
  sed -n '/^op  /,$p' "$OUT/bench.log"
  echo "bench exit $brc"
fi
exit $rc
