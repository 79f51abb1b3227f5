"""Bitwise repeatability of the Triton two-pass path on the GPU, and its graph-replay time.

On the H200 (Triton 3.6), prenorm_kernel at 128 x 64 tiles, N3P = 32 (pre, fused_post_pre), 8 warps
and 2-4 pipeline stages gave partials that differed from run to run (up to 4e-4 absolute on some
rows); 4 warps, 1 stage, 64 x 64 or 128 x 32 tiles did not. This script checks the configs that
configs.plan() picks: 5 runs per op and shape, every output compared bitwise with the first.
"""
import torch

from mhc import checking, timing

dev = torch.device("cuda")
for op, T, H in (("pre", 513, 4096), ("fused_post_pre", 513, 4096), ("head", 513, 4096),
                 ("pre", 4096, 4096), ("pre", 4096, 7168), ("fused_post_pre", 4096, 7168),
                 ("head", 4096, 7168), ("pre", 16384, 7168), ("fused_post_pre", 16384, 4096)):
    args, kw = checking.device_inputs(op, T, 4, H, dev, seed=7)
    first = checking.call(op, args, kw, "triton")
    bad = 0
    for _ in range(4):
        outs = checking.call(op, args, kw, "triton")
        bad += sum(int((a != b).sum()) for a, b in zip(first, outs))
    us, _ = timing.time_warm(lambda: checking.call(op, args, kw, "triton"), dev, 30)
    print(f"{op:15} T={T:5} H={H}: {'repeatable' if bad == 0 else f'{bad} elements differ'}  {us:.1f} us", flush=True)
