"""Triton: the order in which programs walk memory (one GPU call).

``python benchmarks/order_sweep.py [--part post mix] [--H 4096 7168] [--T ...]`` on a CUDA machine.

``post``: ``kernels.post_kernel``'s tile, program order (H_FAST) and eviction policy, beside the
TileLang backend's ``post`` where it serves. ``mix``: ``fused_post_pre`` through the launcher with
the single-launch kernel's grid token-major (as before) and splits-major (``Config.split_fast``).
Every variant is first checked against the fp64 reference with NaN-poisoned outputs at every
shape, then timed (CUDA-graph replays, median). Cells: us, GB/s of floor bytes, x floor (floor =
the bytes the op must move over the copy bandwidth measured in the same run, the larger of the
measurements before and after). The chosen rows go to ``launch._TABLE`` and the figures to
``mhc/backends/triton/TUNING.md``.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import time

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from triton_dev import TOL, bench, calls, copy_bandwidth, errors, floor_bytes, make, rel  # noqa: E402

import mhc.backends as backends  # noqa: E402
from mhc import reference as R  # noqa: E402
from mhc.backends.triton import kernels  # noqa: E402
from mhc.backends.triton import launch as L  # noqa: E402

N = 4
#: (name, BT tokens, BH columns, warps, H_FAST, EVICT); "old" is the table before this sweep.
VARIANTS = [("old", 1, 1024, 4, False, "")]
for ev in ("", "evict_first"):
    for bt, bh, w in ((1, 1024, 4), (1, 512, 2), (1, 1024, 2), (1, 2048, 4), (1, 2048, 8), (1, 4096, 8),
                      (2, 1024, 4), (2, 1024, 8), (2, 2048, 8), (4, 512, 4), (4, 1024, 8)):
        VARIANTS.append((f"bt{bt} bh{bh} w{w}{' ef' if ev else ''}", bt, bh, w, True, ev))
VARIANTS.append(("old ef", 1, 1024, 4, False, "evict_first"))


def launcher(d, out, bt, bh, w, hf, ev):
    x, res, pm, cm = d["x"], d["residual"], d["pm"], d["cm"]
    T, n, H = res.shape
    grid = (triton.cdiv(T, bt) * triton.cdiv(H, bh),)

    def f():
        kernels.post_kernel[grid](x, res, pm, cm, out, T, H, N=n, NP=triton.next_power_of_2(n), BH=bh,
                                  EMULATE_RNE=False, BT=bt, H_FAST=hf, EVICT=ev, num_warps=w)
        return out
    return f


def table(rows, names, shapes, bw, op):
    print("| variant | " + " | ".join(f"H={H} T={T}" for H, T in shapes) + " |")
    print("|---|" + "---:|" * len(shapes))
    for name in names:
        cells = []
        for H, T in shapes:
            us = rows.get((name, H, T))
            fb = floor_bytes(op, T, H)
            cells.append("-" if us is None else f"{us:.1f} · {fb / us / 1e3:.0f} · {us / (fb / bw / 1e3):.3f}x")
        print(f"| {name} | " + " | ".join(cells) + " |")


def post_part(dev, Hs, Ts, bw0):
    tl_post = None
    try:
        from mhc.backends.tilelang import BACKEND

        tl_post = BACKEND.load().post
    except Exception as e:  # the peer is optional here
        print(f"tilelang post not run: {type(e).__name__}: {e}")
    bad = 0
    res = {}
    for H in Hs:
        for T in Ts:
            d = make(T, H, dev, seed=T + H)
            want = R.post(d["x"].double(), d["residual"].double(), d["pm"].double(), d["cm"].double())
            fb = floor_bytes("post", T, H)
            for name, *v in VARIANTS:
                out = torch.full((T, N, H), float("nan"), dtype=torch.bfloat16, device=dev)
                f = launcher(d, out, *v)
                err = rel(f(), want)
                if not err < 1e-2:
                    bad += 1
                    print(f"FAIL {name} H={H} T={T}: err {err:.1e}", flush=True)
                    continue
                res[name, H, T] = bench(f)
            if tl_post is not None:
                try:
                    res["tilelang", H, T] = bench(lambda: tl_post(d["x"], d["residual"], d["pm"], d["cm"]))
                except Exception as e:
                    print(f"tilelang post H={H} T={T}: {type(e).__name__}: {e}")
            line = " | ".join(f"{k[0]} {us:.1f}" for k, us in res.items() if k[1:] == (H, T))
            print(f"post H={H} T={T} floor {fb / bw0 / 1e3:.1f} us: {line}", flush=True)
    names = [v[0] for v in VARIANTS] + (["tilelang"] if tl_post is not None else [])
    return res, names, bad


def _split_fast_table(on):
    """launch._TABLE with the single-launch fused rows' grid splits-major (on) or token-major."""
    return tuple((t, row, None if fr is None else dict(fr, split_fast=on)) for t, row, fr in L._TABLE)


MIX_VARIANTS = (("token-major", False), ("splits-major", True), ("token-major again", False))


def _warm_mix(job):
    """Compile one (split_fast, H, T) in a worker: fills Triton's on-disk cache (a fused kernel takes
    ~50 s to compile; the workers run in parallel)."""
    on, H, T = job
    try:
        L._TABLE = _split_fast_table(on)
        d = make(T, H, torch.device("cuda"))
        calls(d, L)["fused_post_pre"]()
        torch.cuda.synchronize()
        return None
    except Exception as e:  # the main process reports it again when it runs the same config
        return f"H={H} T={T} split_fast={on}: {type(e).__name__}: {str(e)[:200]}"


def mix_part(dev, Hs, Ts, bw0):
    # T > 1024 compiles the same kernel as 2048 (the same bucket and integer specialisation).
    jobs = list(dict.fromkeys((on, H, T if T <= 1024 else 2048) for _, on in MIX_VARIANTS for H in Hs for T in Ts))
    t0 = time.time()
    with mp.get_context("spawn").Pool(min(len(jobs), os.cpu_count() or 1)) as pool:
        fails = [f for f in pool.imap_unordered(_warm_mix, jobs) if f]
    print(f"warm-up: {len(jobs)} compiles in {time.time() - t0:.0f}s; failures: {fails}", flush=True)
    bad = 0
    res = {}
    saved = L._TABLE
    try:
        for H in Hs:
            for T in Ts:
                d = make(T, H, dev, seed=T + H)
                f = calls(d, L)["fused_post_pre"]
                for name, on in MIX_VARIANTS:
                    L._TABLE = _split_fast_table(on)
                    backends._ALLOCATOR = lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype,
                                                                                  device=device)
                    try:
                        errs = errors("fused_post_pre", d, f())
                    finally:
                        backends._ALLOCATOR = backends._plain_empty
                    if not all(e == e and e < t for e, t in zip(errs, TOL["fused_post_pre"])):
                        bad += 1
                        print(f"FAIL fused {name} H={H} T={T}: {errs}", flush=True)
                        continue
                    res[name, H, T] = bench(f)
                line = " | ".join(f"{k[0]} {us:.1f}" for k, us in res.items() if k[1:] == (H, T))
                print(f"fused H={H} T={T} floor {floor_bytes('fused_post_pre', T, H) / bw0 / 1e3:.1f} us: {line}",
                      flush=True)
    finally:
        L._TABLE = saved
    return res, [v[0] for v in MIX_VARIANTS], bad


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", nargs="*", default=["post", "mix"], choices=["post", "mix"])
    ap.add_argument("--H", type=int, nargs="*", default=[4096, 7168])
    ap.add_argument("--T", type=int, nargs="*", help="default: post 1 64 4096 16384; mix 512 4096 16384")
    args = ap.parse_args()
    dev = torch.device("cuda")
    print(torch.cuda.get_device_name(), torch.__version__, triton.__version__, flush=True)
    bw0 = copy_bandwidth(dev)
    print(f"copy bandwidth {bw0:.0f} GB/s", flush=True)
    parts = {}
    bad = 0
    if "post" in args.part:
        Ts = args.T or [1, 64, 4096, 16384]
        *parts["post"], b = post_part(dev, args.H, Ts, bw0)
        parts["post"].append(Ts)
        bad += b
    if "mix" in args.part:
        Ts = args.T or [512, 4096, 16384]
        *parts["fused_post_pre"], b = mix_part(dev, args.H, Ts, bw0)
        parts["fused_post_pre"].append(Ts)
        bad += b
    bw1 = copy_bandwidth(dev)
    bw = max(bw0, bw1)
    print(f"copy bandwidth after {bw1:.0f} GB/s; floors below use {bw:.0f}")
    for op, (res, names, Ts) in parts.items():
        print(f"\n{op} (us · GB/s · x floor)\n")
        table(res, names, [(H, T) for H in args.H for T in Ts], bw, op)
    print(f"\ncorrectness failures: {bad}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
