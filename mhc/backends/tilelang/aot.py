"""Ahead-of-time compilation of the TileLang kernels, on a machine with nvcc and no GPU.

``main(["sm90"])`` compiles every kernel configuration the launchers pick for n = 4 and
H in {4096, 7168} (``post``, ``pre``, ``head``, ``fused_post_pre``; one config per op, any T)
for ``{"kind": "cuda", "arch": "sm_90a"}`` (``sm90`` on the command line) into TileLang's disk cache (``TILELANG_CACHE_DIR``),
prints each, and returns non-zero if any failed. ``python -m mhc aot --backend tilelang
--arch sm90`` calls it; CI runs it as the compile check for this backend.
"""

from __future__ import annotations

import re
import sys
import time
import traceback

__all__ = ["main", "AOT_N", "AOT_H"]

AOT_N = (4,)
AOT_H = (4096, 7168)
OPS = ("post", "pre", "head", "fused")
#: SM count assumed per arch when picking configs (only matters if H / HC exceeds it).
_SMS = {"sm_90a": 132, "sm_100a": 148, "sm_80": 108}


def _arch(s: str) -> str:
    """``sm90``/``sm_90``/``90``/``sm_90a`` -> ``sm_90a``: the token the launchers use on that GPU
    (see ``launch.cuda_arch``), so the runtime finds these kernels in the disk cache."""
    m = re.fullmatch(r"(?:sm_?)?(\d+)([a-z]?)", s.strip().lower())
    if not m or len(m.group(1)) < 2:
        raise ValueError(f"unrecognised arch {s!r}: use e.g. sm90, sm_90 or 90")
    from mhc.backends.tilelang.launch import cuda_arch

    digits = m.group(1)
    return cuda_arch(int(digits[:-1]), int(digits[-1]))


def main(archs: list[str]) -> int:
    """Compile every configuration for each arch in ``archs``; 0 on success, 1 on any failure."""
    from mhc.backends.tilelang import cache_dir, find_compiler

    print(f"tilelang aot: cache {cache_dir()}, nvcc {find_compiler() or 'NOT FOUND'}", flush=True)
    try:
        import tilelang

        from mhc.backends.tilelang import launch as L

        tilelang.set_log_level("WARNING")  # one line per kernel below instead of two INFO lines
    except Exception as e:
        print(f"tilelang aot: cannot import tilelang: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    from mhc.progress import Progress

    failures = 0
    progress = Progress(len(archs) * len(AOT_N) * len(AOT_H) * len(OPS))
    for a in archs:
        try:
            arch = _arch(a)
        except ValueError as e:
            print(f"tilelang aot: {e}", file=sys.stderr)
            failures += 1
            continue
        target = {"kind": "cuda", "arch": arch}
        sms = _SMS.get(arch, 132)
        for n in AOT_N:
            for H in AOT_H:
                for op in OPS:
                    t0 = time.perf_counter()
                    progress.step()
                    try:
                        _, cfg = L.get_kernel(op, n, H, "bfloat16", target, sms)
                    except Exception:
                        failures += 1
                        print(f"{progress.prefix()}FAIL {arch} {op:5s} n={n} H={H}", flush=True)
                        traceback.print_exc()
                        continue
                    print(f"{progress.prefix()}ok   {arch} {op:5s} n={n} H={H} {cfg} {time.perf_counter() - t0:.1f}s",
                          flush=True)
    print(f"tilelang aot: {failures} failure(s)", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or ["sm90"]))
