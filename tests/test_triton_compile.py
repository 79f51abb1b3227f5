"""The Triton kernels compile for Hopper and MI300X at the odd shapes the contract tests draw, with
no GPU, and fit the arch's shared memory.

The interpreter (what the CPU contract tests run) accepts things the compiler rejects: it has no
minimum dot size and no shared memory: NVIDIA's Triton needs K >= 16 in ``tl.dot`` (a tiny H, 1
or 7, once gave K = n x 1) and a block within the H100's 227 KB (n = 8 once asked 256-288 KB).
Both failed every pre/head/fused call at those shapes on the H100 only. MI300X (gfx942) has
64 KB of LDS, and n >= 5 at T > 1024 asked 80-160 KB there until ``configs.configs`` learnt to
halve the K tile; above 128 tokens the two-pass kernels are sized by ``configs.gemm_shared``, an
upper bound that these builds hold. ``python -m mhc aot`` builds the model shapes (n = 4, H in {4096, 7168}); this
builds the odd ones, for sm90 and gfx942, in a subprocess without ``TRITON_INTERPRET`` (conftest
sets it for this process), with ``aot._build``, which fits the K tile to the compiled kernel's
``metadata.shared`` as the launcher does on a GPU (``launch.device_config``): a build fails on a
compile error or on more shared memory than the arch has. Where ``configs.shared_estimate`` (the
first guess) is below the real size, the line says so; that costs a compile, not correctness.

Marked ``slow`` (about 100 builds: 10-20 minutes on 2 cores): ``python -m pytest -m slow``, which
CI runs.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib

import pytest

from subprocs import failure_report, run_python

pytestmark = [pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed"),
              pytest.mark.slow]

ROOT = str(pathlib.Path(__file__).resolve().parent.parent)

_SCRIPT = r"""
import re, sys
from concurrent.futures import ProcessPoolExecutor
import torch, triton
from mhc.backends.triton import aot, build, configs, launch

# sm90: the tiny widths and n = 8 that failed on the H100, and n = 6 (fused_post_pre at T > 1024
# asked 308 KB); gfx942 (MI300X, 64 KB of LDS): the n >= 5 configs whose K tile is halved there.
CASES = ([("sm90", n, H) for n in (1, 8) for H in (1, 7, 4096)] + [("sm90", 6, 4096)]
         + [("gfx942", n, 4096) for n in (6, 8)])
seen, jobs, est = set(), [], {}
for arch, n, H in CASES:
    smem = configs.SHARED_MEMORY[arch]
    for T in (1, 5, 200, 2000):  # each row of launch's table, then plan()'s two buckets
        for op in ("pre", "head", "fused_post_pre"):
            if T <= configs.SMALL_T:
                pairs = [aot.mix_job(op, n, H, T, torch.bfloat16, arch)]
            else:
                pairs = list(aot.two_pass_jobs(op, n, H, T, torch.bfloat16, arch))
            for key, job in pairs:
                if (arch, key) in seen:
                    continue
                seen.add((arch, key))
                if T <= configs.SMALL_T:
                    cfg = configs.configs(n, H, T, op, smem)
                    e = configs.shared_estimate(op, n, cfg.block_m, cfg.block_h, cfg.num_stages, smem.amd)
                elif job[1] == "prenorm_kernel":
                    p = configs.plan(op, n, H, T, smem)
                    e = configs.gemm_shared(configs.mix_columns(op, n)[1], p.block_m, p.block_k, p.stages, smem.amd)
                else:
                    e = None  # prep and finalize: no pipeline, no estimate (the arch's limit still holds)
                est[job[0] + arch] = e
                jobs.append((arch, job))
print(f"triton {triton.__version__}: {len(jobs)} builds on 2 workers", flush=True)
bad = low = 0
with ProcessPoolExecutor(2) as pool:
    for (arch, job), (line, ok, detail) in zip(jobs, pool.map(aot._build, jobs)):
        m = re.search(r"shared (\d+)B", line)
        e = est[job[0] + arch]
        note = ""
        if m and e is not None and "fitted" not in line:
            note = f"  (estimate {e}B" + (", below the real size)" if int(m.group(1)) > e else ")")
            low += int(m.group(1)) > e
        print(("ok   " if ok else "BAD  ") + line + note + (f"\n     {detail}" if detail else ""), flush=True)
        bad += not ok
print(f"builds: {len(jobs)}, failed: {bad}, estimate below the real size: {low}")
sys.exit(1 if bad else 0)
"""


def test_mix_kernels_build_within_shared_memory_at_odd_shapes():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    rc, out = run_python(["-c", _SCRIPT], env)
    assert rc == 0 and "failed: 0" in out, failure_report(out)
    # Triton 3.9 warns on every build that leaves fp fusion to its default (build.COMPILE_OPTIONS).
    assert "TRITON_DEFAULT_FP_FUSION" not in out, failure_report(out, markers=("FP_FUSION",))


_DEVICE_SCRIPT = r"""
import contextlib, types
import torch, triton
from mhc.backends.triton import build, configs, launch

# launch.device_config as on an H100 (no GPU here): the device's target and shared memory are
# stood in for; the compiles are real. The estimate is made to lie (0 B: keep the table's tile),
# and the limit sits below what that tile really needs, so only the measured size can fit it.
target = build.target("sm90")
triton.runtime.driver.set_active(types.SimpleNamespace(get_current_target=lambda: target))
torch.cuda.device = lambda device: contextlib.nullcontext()
launch.INTERPRETED = False
compiled = []
real_compile = build.compile_mix
build.compile_mix = lambda *a, **k: compiled.append(a[3]) or real_compile(*a, **k)
op, n, H, T = "pre", 8, 4096, 100  # the chunked kernel's bucket (configs() serves T <= SMALL_T)
table = configs.configs(n, H, T, op, configs.SharedMemory(1 << 30))
need = real_compile(op, n, torch.bfloat16, table, target, True).metadata.shared
configs.shared_estimate = lambda *a: 0
launch.device_shared_memory = lambda device: configs.SharedMemory(need - 1)
dev = torch.device("cuda", 0)
cfg = launch.device_config(op, n, H, T, torch.bfloat16, dev)
got = real_compile(op, n, torch.bfloat16, cfg, target, True).metadata.shared
print(f"table tile {table.block_h} needs {need}B; fitted tile {cfg.block_h} needs {got}B; compiles {len(compiled)}")
assert cfg.block_h < table.block_h and got <= need - 1, "not fitted to the measured size"
before = len(compiled)
assert launch.device_config(op, n, H, T, torch.bfloat16, dev) == cfg and len(compiled) == before, "not cached"
print("ok")
"""


def test_device_config_fits_the_compiled_kernels_shared_memory():
    """``launch.device_config`` (the launcher's config on a GPU) halves the K tile by the compiled
    kernel's real ``metadata.shared``, not by the estimate, and compiles once per config."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    rc, out = run_python(["-c", _DEVICE_SCRIPT], env)
    assert rc == 0 and out.rstrip().endswith("ok"), failure_report(out)
