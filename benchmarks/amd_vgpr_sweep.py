"""VGPRs and spills of the small-T kernels (``mix_kernel``, ``chunk_kernel``) on AMD targets, for
candidate AMD rows of ``configs.SMALL_ROWS``; no GPU needed (``build.compile_kernel``).

    python benchmarks/amd_vgpr_sweep.py                      # the AMD rows as they stand
    python benchmarks/amd_vgpr_sweep.py --ops fused_post_pre --T 64 \
        --variant '{"block_h": 32}' --variant '{"block_h": 32, "num_warps": 8}'

Each variant makes the AMD rows of an op the NVIDIA rows with the variant's fields changed
(fields of ``configs.Row``); ``{}`` builds the H100/H200 rows unchanged. Prints one line per
build: VGPRs (with AGPRs on gfx942/gfx950), spilled VGPRs, SGPRs (their spills go to VGPR lanes),
scratch bytes, LDS.
Results that chose the AMD rows: benchmarks/results/aot-amd-vgpr.md.
"""
import dataclasses
import argparse
import json
import time
from concurrent.futures import ProcessPoolExecutor

import torch


def build_one(job):
    arch, op, H, T, norm, variant = job
    from mhc.backends.triton import aot, build, configs

    t0 = time.time()
    if variant is not None:
        key = op + "+norm" if norm else op
        nvidia = configs.SMALL_ROWS[(key, configs.NVIDIA)]
        configs.SMALL_ROWS[(key, configs.AMD)] = tuple(dataclasses.replace(r, **variant) for r in nvidia)
    try:
        cfg = configs.configs(4, H, T, op, configs.SHARED_MEMORY[arch], norm=norm)
        spec = build.mix_specialization(op, 4, torch.bfloat16, cfg, configs.norm_chunks(H, cfg.block_c) if norm else 0)
        kname = "chunk_kernel" if cfg.chunk else "mix_kernel"
        c = build.compile_kernel(kname, build.mix_signature(op, torch.bfloat16), spec, cfg.num_warps,
                                 cfg.num_stages, H % 16 == 0, build.target(arch))
        res = (f"{aot._amd_resources(c.asm['amdgcn'])}  lds {c.metadata.shared}B  "
               f"[block_h {cfg.block_h} steps {cfg.h_per_split // cfg.block_h} splits {cfg.splits} "
               f"N3P {spec['N3P']} warps {cfg.num_warps}]")
    except Exception as e:
        kname, res = "?", f"FAILED {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    what = "" if variant is None else json.dumps(variant)
    return f"{arch} {op:<14} H={H} T<={T:<3} {'[norm]' if norm else '      '} {kname:<12} {what}  {res}  ({time.time() - t0:.0f}s)"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="gfx942,gfx950")
    ap.add_argument("--ops", default="pre,head,fused_post_pre")
    ap.add_argument("--H", default="4096,7168")
    ap.add_argument("--T", default="1,64", help="one T per small-T bucket (T <= SMALL_T)")
    ap.add_argument("--variant", action="append", help="JSON dict of Row fields changed in the AMD rows; repeatable")
    ap.add_argument("--workers", type=int, default=2)
    a = ap.parse_args()
    variants = [json.loads(v) for v in a.variant] if a.variant else [None]
    jobs = [(arch, op, int(H), int(T), norm, v)
            for arch in a.arch.split(",") for op in a.ops.split(",") for H in a.H.split(",")
            for T in a.T.split(",") for norm in ((False,) if op == "head" else (False, True)) for v in variants]
    with ProcessPoolExecutor(a.workers) as pool:
        for line in pool.map(build_one, jobs):
            print(line, flush=True)


if __name__ == "__main__":
    main()
