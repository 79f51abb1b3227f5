"""Triton backend: correctness at real sizes, copy bandwidth, timings and a config sweep (one GPU call).

``python benchmarks/triton_dev.py [--quick] [--no-sweep] [--no-compile]`` on a CUDA machine.
Prints, per op/H/T: the error against the fp64 reference (outputs poisoned with NaN first), the
Triton time (CUDA-graph replays, median), GB/s, the ratio to the floor (bytes that must move /
measured copy bandwidth), and eager / torch.compile of ``mhc.reference`` for comparison. Small
T timings are L2-warm (inputs fit in L2), as in the peers' figures. The sweep times other launch
configs of ``pre``; the chosen table lives in ``mhc/backends/triton/launch.py`` and the figures
in ``mhc/backends/triton/TUNING.md``.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import triton
import triton.testing

import mhc.backends as backends
from mhc import reference as R
from mhc.backends.triton import launch as L

N = 4
EPS = dict(rms_eps=1e-6, hc_pre_eps=1e-6, hc_sinkhorn_eps=1e-6, hc_post_mult_value=2.0, sinkhorn_repeat=20)


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def make(T, H, dev, seed=0):
    g = torch.Generator(device=dev).manual_seed(seed)
    n3 = 2 * N + N * N
    d = dict(
        residual=torch.randn(T, N, H, device=dev, generator=g).bfloat16(),
        x=torch.randn(T, H, device=dev, generator=g).bfloat16(),
        fn=torch.randn(n3, N * H, device=dev, generator=g) / (N * H) ** 0.5,
        scale=torch.rand(3, device=dev, generator=g) + 0.5,
        base=torch.randn(n3, device=dev, generator=g) * 0.5,
        fn_h=torch.randn(N, N * H, device=dev, generator=g) / (N * H) ** 0.5,
        scale_h=torch.rand(1, device=dev, generator=g) + 0.5,
        base_h=torch.randn(N, device=dev, generator=g) * 0.5,
    )
    d["pm"] = torch.rand(T, N, 1, device=dev, generator=g) * 2
    d["cm"] = torch.softmax(torch.randn(T, N, N, device=dev, generator=g), -1)
    return d


def calls(d, impl):
    """op -> zero-arg callable running ``impl`` (a module with the backend signatures)."""
    e = tuple(EPS.values())
    return {
        "pre": lambda: impl.pre(d["residual"], d["fn"], d["scale"], d["base"], *e),
        "post": lambda: impl.post(d["x"], d["residual"], d["pm"], d["cm"]),
        "head": lambda: impl.head(d["residual"], d["fn_h"], d["scale_h"], d["base_h"], 1e-6, 1e-6),
        "fused_post_pre": lambda: impl.fused_post_pre(d["x"], d["residual"], d["pm"], d["cm"], d["fn"],
                                                      d["scale"], d["base"], *e),
    }


def floor_bytes(op, T, H):
    n3 = 2 * N + N * N
    res, act, mixes = T * N * H * 2, T * H * 2, T * (N + N * N) * 4
    return {
        "pre": res + n3 * N * H * 4 + act + mixes,
        "post": act + res + mixes + res,
        "head": res + N * N * H * 4 + act,
        "fused_post_pre": act + res + mixes + n3 * N * H * 4 + res + mixes + act,
    }[op]


def errors(op, d, out):
    """Relative Frobenius errors of ``out`` against the fp64 reference, one per output."""
    dd = {k: v.double() for k, v in d.items()}
    e = tuple(EPS.values())
    if op == "pre":
        ref = R.pre(dd["residual"], dd["fn"], dd["scale"], dd["base"], *e)
    elif op == "post":
        ref = (R.post(dd["x"], dd["residual"], dd["pm"], dd["cm"]),)
        out = (out,)
    elif op == "head":
        ref = (R.head(dd["residual"], dd["fn_h"], dd["scale_h"], dd["base_h"], 1e-6, 1e-6),)
        out = (out,)
    else:
        # The contract rounds the new residual to bf16 before pre reads it: so does the oracle.
        new = R.post(dd["x"], dd["residual"], dd["pm"], dd["cm"]).bfloat16().double()
        ref = (new, *R.pre(new, dd["fn"], dd["scale"], dd["base"], *e))
    return [rel(o, r) for o, r in zip(out, ref)]


def bench(fn):
    return triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median") * 1e3  # us


def copy_bandwidth(dev):
    a = torch.empty(1 << 28, dtype=torch.uint8, device=dev).random_()  # 256 MiB
    b = torch.empty_like(a)
    us = bench(lambda: b.copy_(a))
    return 2 * a.numel() / us / 1e3  # GB/s, read + write


def _nan_empty(shape, dtype, device):
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


SWEEP = {  # T -> candidate rows of launch._TABLE for pre
    1: [(16, 16, 64, 128, 2048, True, 4, 1, 256, 1), (16, 16, 64, 128, 1024, True, 4, 1, 256, 1),
        (16, 16, 64, 128, 2048, True, 8, 1, 256, 1), (16, 16, 32, 128, 2048, True, 4, 1, 256, 1)],
    64: [(128, 16, 64, 32, 128, False, 4, 1, 512, 2), (128, 16, 64, 32, 2048, True, 8, 1, 512, 2),
         (128, 16, 64, 64, 128, False, 4, 1, 512, 2), (128, 16, 64, 32, 256, False, 8, 1, 512, 2)],
    512: [(1024, 16, 64, 16, 128, False, 4, 1, 1024, 4), (1024, 16, 64, 8, 128, False, 4, 1, 1024, 4),
          (1024, 16, 128, 8, 128, False, 4, 1, 1024, 4), (1024, 16, 64, 16, 256, False, 8, 1, 1024, 4)],
    4096: [(None, 64, 64, 4, 64, False, 8, 2, 1024, 4), (None, 64, 64, 8, 64, False, 8, 2, 1024, 4),
           (None, 32, 64, 4, 64, False, 4, 2, 1024, 4), (None, 16, 64, 4, 128, False, 4, 1, 1024, 4),
           (None, 16, 64, 8, 128, False, 4, 1, 1024, 4), (None, 64, 128, 4, 64, False, 8, 2, 1024, 4),
           (None, 32, 64, 8, 128, False, 8, 2, 1024, 4)],
}


def sweep(dev, bw, Hs):
    print("\n# pre config sweep (row of launch._TABLE: bm, bh, splits, bc, rowwise, warps, stages)")
    saved = L._TABLE
    try:
        for H in Hs:
            for T, rows in SWEEP.items():
                d = make(T, H, dev)
                for row in rows:
                    L._TABLE = (row,)
                    try:
                        f = calls(d, L)["pre"]
                        err = max(errors("pre", d, f()))
                        us = bench(f)
                        ratio = us / (floor_bytes("pre", T, H) / bw / 1e3)
                        print(f"sweep pre H={H} T={T:<6} {row[1:8]}  {us:8.1f} us  {ratio:5.2f}x floor  err {err:.1e}",
                              flush=True)
                    except Exception as e:
                        print(f"sweep pre H={H} T={T:<6} {row[1:8]}  FAILED {type(e).__name__}: {e}", flush=True)
    finally:
        L._TABLE = saved


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="H=4096 and T in {1, 512, 4096} only")
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--compile-T", type=int, nargs="*", default=[1, 4096])
    args = ap.parse_args()
    dev = torch.device("cuda")
    print(torch.cuda.get_device_name(), torch.__version__, triton.__version__, flush=True)
    bw = copy_bandwidth(dev)
    print(f"copy bandwidth {bw:.0f} GB/s", flush=True)
    Hs = (4096,) if args.quick else (4096, 7168)
    Ts = (1, 512, 4096) if args.quick else (1, 8, 64, 512, 4096, 16384)
    rows = []
    bad = 0
    for H in Hs:
        for T in Ts:
            d = make(T, H, dev, seed=T + H)
            for op, f in calls(d, L).items():
                backends._ALLOCATOR = _nan_empty
                try:
                    errs = errors(op, d, f())
                finally:
                    backends._ALLOCATOR = backends._plain_empty
                tol = {"pre": [1e-3, 1e-3, 1e-2], "post": [1e-2], "head": [1e-2],
                       "fused_post_pre": [1e-2, 1e-3, 1e-3, 1e-2]}[op]
                ok = all(e == e and e < t for e, t in zip(errs, tol))
                bad += not ok
                fb = floor_bytes(op, T, H)
                floor_us = fb / bw / 1e3
                us = bench(f)
                ref_us = bench(calls(d, R)[op])
                comp_us = float("nan")
                if not args.no_compile and T in args.compile_T:
                    cf = torch.compile(getattr(R, op), dynamic=False)
                    cd = calls(d, type("C", (), {op: staticmethod(cf)}))[op]
                    cd()
                    comp_us = bench(cd)
                rows.append((op, H, T, us, fb / us / 1e3, us / floor_us, floor_us, ref_us, comp_us, errs, ok))
                print(f"{op:<15} H={H:<5} T={T:<6} {us:9.1f} us {fb / us / 1e3:7.0f} GB/s {us / floor_us:6.2f}x floor"
                      f" (floor {floor_us:7.1f} us)  eager {ref_us:9.1f}  compile {comp_us:9.1f}  "
                      f"err {' '.join(f'{e:.1e}' for e in errs)} {'ok' if ok else 'FAIL'}", flush=True)
    if not args.no_sweep:
        sweep(dev, bw, (4096,) if args.quick else (4096, 7168))
    print("\n| op | H | T | triton us | GB/s | x floor | eager us | compile us |")
    print("|---|---|---|---|---|---|---|---|")
    for op, H, T, us, gbs, ratio, _, ref_us, comp_us, _, _ in rows:
        print(f"| {op} | {H} | {T} | {us:.1f} | {gbs:.0f} | {ratio:.2f} | {ref_us:.1f} | {comp_us:.1f} |")
    print(f"\ncorrectness failures: {bad}")
    return 1 if bad else 0


if __name__ == "__main__":
    t0 = time.time()
    rc = main()
    print(f"total {time.time() - t0:.0f}s")
    sys.exit(rc)
