"""Triton ``post``: the order in which programs walk memory, the tile and the eviction policy of
``kernels.post_kernel`` (one GPU call).

``python benchmarks/order_sweep.py [--H 4096 7168] [--T 1 64 4096 16384]`` on a CUDA machine,
beside the TileLang backend's ``post`` where it serves. (The same study of ``mix_kernel``'s grid,
splits-major vs token-major, ran from 4c037f5's version of this script: TUNING.md.) Every
variant is first checked against the fp64 reference with NaN-poisoned outputs at every shape,
then timed (CUDA-graph replays, median). Cells: us, GB/s of floor bytes, x floor (floor =
the bytes the op must move over the copy bandwidth measured in the same run, the larger of the
measurements before and after). The chosen rows go to ``launch._POST`` and the figures to
``mhc/backends/triton/TUNING.md``.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from triton_dev import bench, copy_bandwidth, floor_bytes, make, rel  # noqa: E402

from mhc import reference as R  # noqa: E402
from mhc.backends.triton import kernels  # noqa: E402

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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--H", type=int, nargs="*", default=[4096, 7168])
    ap.add_argument("--T", type=int, nargs="*", default=[1, 64, 4096, 16384])
    args = ap.parse_args()
    dev = torch.device("cuda")
    print(torch.cuda.get_device_name(), torch.__version__, triton.__version__, flush=True)
    bw0 = copy_bandwidth(dev)
    print(f"copy bandwidth {bw0:.0f} GB/s", flush=True)
    res, names, bad = post_part(dev, args.H, args.T, bw0)
    bw1 = copy_bandwidth(dev)
    bw = max(bw0, bw1)
    print(f"copy bandwidth after {bw1:.0f} GB/s; floors below use {bw:.0f}")
    print("\npost (us · GB/s · x floor)\n")
    table(res, names, [(H, T) for H in args.H for T in args.T], bw, "post")
    print(f"\ncorrectness failures: {bad}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
