"""The Triton kernels compile for Hopper at the odd shapes the contract tests draw, with no GPU.

The interpreter (what the CPU contract tests run) accepts things the compiler rejects: it has no
minimum dot size and no shared memory: NVIDIA's Triton needs K >= 16 in ``tl.dot`` (a tiny H, 1
or 7, once gave K = n x 1) and a block within the H100's 227 KB (n = 8 once asked 256-288 KB).
Both failed every pre/head/fused call at those shapes on the H100 only. Each build is checked
for both. ``python -m mhc aot``
builds the model shapes (n = 4, H in {4096, 7168}); this builds the odd ones, for sm90, in a
subprocess without ``TRITON_INTERPRET`` (conftest sets it for this process).
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")

ROOT = str(pathlib.Path(__file__).resolve().parent.parent)

_SCRIPT = r"""
import sys, torch, triton
from mhc.backends.triton import aot, launch, kernels
SMEM = 232448  # the H100's shared memory per block (opt-in), what Triton checks at launch
seen, bad = set(), 0
for n in (1, 8):
    for H in (1, 7, 4096):
        for T in (1, 5, 200, 2000):  # one T in each row of launch's table
            for op in ("pre", "head", "fused_post_pre"):
                cfg = launch.configs(n, H, T, op)
                spec = launch.mix_specialization(op, n, torch.bfloat16, cfg)
                kname = "chunk_kernel" if cfg.chunk else "mix_kernel"
                key = (kname, op, tuple(sorted(spec.items())), cfg.num_warps, cfg.num_stages)
                if key in seen:
                    continue
                seen.add(key)
                fn = getattr(kernels, kname)
                sig = {a: t for a, t in aot._mix_signature(op, torch.bfloat16, cfg.prep).items() if a in fn.arg_names}
                sig.update({k: "constexpr" for k in spec})
                label = f"{op} n={n} H={H} T={T} {kname}"
                try:
                    src = triton.compiler.ASTSource(fn=fn, signature={a: sig[a] for a in fn.arg_names},
                                                    constexprs=dict(spec))
                    c = triton.compile(src, target=aot._target("sm90"),
                                       options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
                except Exception as e:
                    print(f"FAILED {label}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
                    bad += 1
                    continue
                fits = c.metadata.shared <= SMEM
                print(f"{'ok  ' if fits else 'SMEM'} {label}: shared {c.metadata.shared} B", flush=True)
                bad += not fits
print(f"builds: {len(seen)}, failed: {bad}")
sys.exit(1 if bad else 0)
"""


def test_mix_kernels_compile_for_sm90_at_tiny_h_and_n8():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert "failed: 0" in out.stdout
