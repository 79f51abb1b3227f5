"""Development loop of the Triton backward kernels: for each op, H and T, check the Triton
backward against the fp64 torch backward (``mhc.backward``) at the same inputs, check that two
runs are bitwise equal, and time the backend function alone (CUDA-graph replay), against the
backward floor (``mhc.timing.backward_floor_bytes``) over the copy bandwidth of the same run.

GPU only:  python benchmarks/bwd_dev.py [--ops pre head post fused_post_pre] [--H 4096 7168]
           [--T 4096 16384] [--norm] [--once] [--profile]
``--once`` runs each case once, untimed and unchecked (for ``ncu``). Each gradient's relative
error is printed, ``!`` past its ``checking.GRAD_TOLERANCES`` bound; hc_scale's is marked ``~``
(its bound is ``checking.sum_error``'s, which needs the per-token terms: the GPU tests check it).
The op layer, autograd and the peers are ``benchmarks/train_bench.py``'s.
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

from bench import copy_bandwidth  # benchmarks/bench.py (this script's folder is on sys.path)
from mhc import backward as ref
from mhc import checking, timing
from mhc.backends.triton import backward as tri
from mhc.backends.triton import configs


def _case(op: str, T: int, n: int, H: int, norm: bool, dev):
    """(triton closure, fp64 torch closure, kinds of the gradients) for one case."""
    g = torch.Generator(device=dev).manual_seed(T + H)
    bf = torch.bfloat16

    def rn(*shape, dt=torch.float32):
        return torch.randn(*shape, device=dev, generator=g).to(dt)

    base = "pre" if op == "fused_post_pre" else op
    args, kw = checking.device_inputs("head" if op == "head" else "pre", T, n, H, dev, seed=T)
    residual, fn, hc_scale, hc_base = (a.reshape(T, n, H) if i == 0 else a for i, a in enumerate(args[:4]))
    if op == "post":
        ins = (rn(T, n, H, dt=bf), rn(T, H, dt=bf), residual, torch.rand(T, n, 1, device=dev),
               torch.rand(T, n, n, device=dev))
        mask = [True] * 4
        return (lambda f, d: f(*(d(t) for t in ins), mask)), ("act", "act", "mix", "mix")
    if op == "head":
        ins = (rn(T, H, dt=bf), residual, fn, hc_scale, hc_base)
        sc = (kw["rms_eps"], kw["hc_eps"])
        return (lambda f, d: f(*(d(t) for t in ins), *sc, [True] * 4)), ("act", "mix", "sum", "mix")
    sc = (kw["rms_eps"], kw["hc_pre_eps"], kw["hc_sinkhorn_eps"], kw["hc_post_mult_value"], kw["sinkhorn_repeat"])
    nrm = (rn(H, dt=bf) * 0.1 + 1.0,) if norm else ()
    up = (rn(T, n, 1), rn(T, n, n), rn(T, H, dt=bf))
    kinds = ("act", "mix", "sum", "mix") + (("act",) if norm else ())
    if base == op:
        return (lambda f, d: f(*(d(t) for t in up), *(d(t) for t in (residual, fn, hc_scale, hc_base)), *sc,
                               [True] * 4, *((d(nrm[0]), 1e-6, True) if norm else ()))), kinds
    post = (rn(T, H, dt=bf), rn(T, n, H, dt=bf), torch.rand(T, n, 1, device=dev), torch.rand(T, n, n, device=dev))
    gnew = rn(T, n, H, dt=bf)
    # post_mix's and comb_mix's gradients come through the bf16 new residual's (checking.GRAD_INPUTS)
    kinds = ("act", "act", "act", "act", "mix", "sum", "mix") + (("act",) if norm else ())
    return (lambda f, d: f(d(gnew), *(d(t) for t in up), d(residual), *(d(t) for t in post),
                           *(d(t) for t in (fn, hc_scale, hc_base)), *sc, [True] * 7,
                           *((d(nrm[0]), 1e-6, True) if norm else ()))), kinds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ops", nargs="+", default=["pre", "head", "post", "fused_post_pre"])
    ap.add_argument("--H", type=int, nargs="+", default=[4096, 7168])
    ap.add_argument("--T", type=int, nargs="+", default=[4096, 16384])
    ap.add_argument("--norm", action="store_true", help="pre and fused_post_pre with the fused RMSNorm")
    ap.add_argument("--once", action="store_true")
    ap.add_argument("--profile", action="store_true", help="also each kernel's µs (torch.profiler, 5 calls)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=INT",
                    help="override fields of every mhc.backends.triton.configs.BACKWARD_ROWS row that has them "
                         "(BackwardRow's, PostBackwardRow's: a sweep; the step counts follow)")
    a = ap.parse_args()
    if a.set:
        over = {k: int(v) for k, v in (kv.split("=") for kv in a.set)}
        fields = {f.name for row in (configs.BackwardRow, configs.PostBackwardRow) for f in dataclasses.fields(row)}
        unknown = set(over) - fields
        if unknown:
            ap.error(f"--set: {sorted(unknown)} are not fields of configs.BackwardRow or PostBackwardRow")
        for key, rows in configs.BACKWARD_ROWS.items():
            configs.BACKWARD_ROWS[key] = tuple(dataclasses.replace(r, **{k: v for k, v in over.items()
                                                                         if hasattr(r, k)}) for r in rows)
        print("configs overridden:", over)
    dev = torch.device("cuda")
    n = 4
    gbps = None if a.once else copy_bandwidth(dev, 1 << 30, 100)[0]
    if gbps:
        print(f"copy bandwidth {gbps:.0f} GB/s")
    for op in a.ops:
        for H in a.H:
            for T in a.T:
                call, kinds = _case(op, T, n, H, a.norm and op in ("pre", "fused_post_pre"), dev)
                fn_tri = getattr(tri, f"{op}_backward")
                run = (lambda: call(fn_tri, lambda t: t))
                if a.once:
                    run()
                    torch.cuda.synchronize()
                    continue
                got, again = run(), run()
                same = all((x is None and y is None) or torch.equal(x, y) for x, y in zip(got, again))
                want = call(getattr(ref, f"{op}_backward"), lambda t: t.double())
                errs = []
                for gt, w, kind in zip(got, want, kinds):
                    e = ((gt.double() - w).norm() / w.norm()).item()
                    if kind == "sum":  # hc_scale: bounded by checking.sum_error (the GPU tests), not here
                        errs.append(f"{e:.1e}~")
                    else:
                        errs.append(f"{e:.1e}{'' if e <= checking.GRAD_TOLERANCES[torch.bfloat16][kind] else '!'}")
                del want
                us, how = timing.time_warm(run, dev, 200)
                nbytes = timing.backward_floor_bytes(op, T, n, H)
                floor = nbytes / (gbps * 1e3)
                print(f"{op:15s} H={H:5d} T={T:6d}{' norm' if a.norm else ''}: {us:9.1f} us {nbytes / us / 1e3:6.0f} GB/s "
                      f"floor {floor:7.1f} us  x{us / floor:5.2f}  bitwise-repeat={same}  err {' '.join(errs)}",
                      flush=True)
                if a.profile:
                    _profile(run)


def _profile(run) -> None:
    """Each GPU kernel's mean µs over 5 calls of ``run`` (after one warm call)."""
    from torch.profiler import ProfilerActivity, profile

    run()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            run()
        torch.cuda.synchronize()
    for e in sorted(prof.key_averages(), key=lambda e: -e.device_time_total):
        if e.device_time_total > 0:
            print(f"    {e.device_time_total / 5:9.1f} us/call  {e.count // 5:2d}x  {e.key[:70]}")


if __name__ == "__main__":
    main()
