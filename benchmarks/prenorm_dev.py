"""Development sweep of the Triton two-pass path (issue 13): the prenorm GEMM alone, then the whole
op (GEMM + finalize), on one GPU in one call.

    python benchmarks/prenorm_dev.py [--budget-s 480] [--out DIR]

Stage 1 times ``kernels.prenorm_kernel`` alone over a grid of tiles (bytes: the residual read once,
reported as TB/s of residual) next to cuBLAS's bf16 ``x @ w`` of the same shape, and checks each
config's partial sums against fp64. Stage 2 varies the best GEMM tiles' order, stages and
precision. Stage 3 runs whole ops through ``launch._two_pass`` with several GEMM and second-pass
tiles (its chunked forms, measured in runs 1-2, are gone: results/two-pass-h200.md), checks every
output against the fp64 oracle on sampled rows (outputs poisoned), and times the current Triton
path in the same run. Times are CUDA-graph replay medians; the floor is ``mhc.timing.floor_bytes`` over the copy bandwidth measured here (``bench.copy_bandwidth``). Results: ``OUT/prenorm_dev.json``
and a table on stdout.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pathlib
import sys
import time

import torch
import triton
import triton.testing

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import mhc  # noqa: E402
from bench import copy_bandwidth  # noqa: E402  (benchmarks/bench.py, the one harness)
from mhc import checking, timing  # noqa: E402
from mhc.backends.triton import configs, kernels, launch  # noqa: E402

DEV = torch.device("cuda")
T0 = time.time()


def log(*a):
    print(f"[{time.time() - T0:6.1f}s]", *a, flush=True)


def graph_us(fn, rep_ms=60):
    return triton.testing.do_bench_cudagraph(fn, rep=rep_ms, return_mode="median") * 1e3


def gemm_runner(x2d, w, part, T, K, n3, n3p, c):
    bm, bk, kps, warps, stages, prec, split_fast = c
    steps = kps // bk
    splits = triton.cdiv(K, kps)
    grid = (triton.cdiv(T, bm) * splits,)
    sstride = T * n3p

    def run():
        kernels.prenorm_kernel[grid](x2d, w, part, T, K, sstride, N3=n3, N3P=n3p, BM=bm, BK=bk, STEPS=steps,
                                     PREC=prec, EXACT_BF16=True, EVEN_K=K % kps == 0, SPLIT_FAST=split_fast,
                                     num_warps=warps, num_stages=stages)
    return run, splits


def check_gemm(x2d, fn, part, T, n3, n3p, splits):
    rows = checking.sample_rows(T, DEV, 32)
    p = part.view(splits, T, n3p)[:, rows].sum(0).double()
    xr = x2d[rows].double()
    ref = torch.cat([xr @ fn.double().T, (xr * xr).sum(1, keepdim=True)], 1)
    got = p[:, : n3 + 1]
    return (torch.linalg.vector_norm(got - ref) / torch.linalg.vector_norm(ref)).item()


def stage_gemm(results, budget_end):
    n = 4
    shapes = [(4096, 4096), (4096, 7168), (16384, 4096), (16384, 7168)]
    base = []
    for bm in (64, 128, 256):
        for bk in (64, 128):
            for kps in (1024, 2048, 4096):
                for warps in (4, 8):
                    base.append((bm, bk, kps, warps, 4, "hilo", True))
    data = {}
    for T, H in shapes:
        K = n * H
        x = torch.randn(T, K, device=DEV).to(torch.bfloat16)
        fn = torch.randn(24, K, device=DEV) / math.sqrt(K)
        data[(T, H)] = x, fn
    out = []

    def run_cfgs(cfgs, shapes_now, tag):
        for c in cfgs:
            for T, H in shapes_now:
                if time.time() > budget_end:
                    return
                x, fn = data[(T, H)]
                K = n * H
                n3, n3p = 24, 32
                w = launch._prep_fn(fn, n3, n3p) if c[5] == "hilo" else fn
                part = torch.full((triton.cdiv(K, c[2]) * T * n3p,), float("nan"), device=DEV)
                try:
                    run, splits = gemm_runner(x, w, part, T, K, n3, n3p, c)
                    run()
                    torch.cuda.synchronize()
                    err = check_gemm(x, fn, part, T, n3, n3p, splits)
                    us = graph_us(run)
                except Exception as e:  # noqa: BLE001 - a config that does not build or fit
                    out.append(dict(stage=tag, cfg=c, T=T, H=H, error=f"{type(e).__name__}: {str(e)[:100]}"))
                    continue
                tbs = T * K * 2 / us / 1e6
                out.append(dict(stage=tag, cfg=c, T=T, H=H, us=us, tbs=tbs, err=err, splits=splits))

    log("stage 1: GEMM tiles at T=4096")
    run_cfgs(base, [(4096, 4096), (4096, 7168)], "s1")

    def best(k, shapes_now):
        score = {}
        for r in out:
            if "us" in r and (r["T"], r["H"]) in shapes_now and r["err"] < 1e-4:
                score.setdefault(tuple(r["cfg"]), []).append(r["tbs"])
        ranked = sorted(((sum(v) / len(v), c) for c, v in score.items() if len(v) == len(shapes_now)), reverse=True)
        return [c for _, c in ranked[:k]]

    top = best(4, [(4096, 4096), (4096, 7168)])
    log("stage 1 best:", top)
    var = []
    for c in top[:3]:
        bm, bk, kps, warps, stages, prec, sf = c
        var += [(bm, bk, kps, warps, 3, prec, sf), (bm, bk, kps, warps, 5, prec, sf),
                (bm, bk, kps, warps, stages, "tf32", sf), (bm, bk, kps, warps, stages, prec, False)]
    log("stage 2: variations")
    run_cfgs(var, [(4096, 4096), (4096, 7168)], "s2")
    top = best(4, [(4096, 4096), (4096, 7168)])
    log("stage 2 best:", top)
    run_cfgs(top, [(16384, 4096), (16384, 7168)], "s3")
    # cuBLAS's bf16 GEMM of the same shape, as the ceiling the issue quotes.
    for T, H in shapes:
        x, fn = data[(T, H)]
        wt = torch.zeros(n * H, 32, device=DEV, dtype=torch.bfloat16)
        wt[:, :24] = fn.T.to(torch.bfloat16)
        us = graph_us(lambda: torch.mm(x, wt))
        out.append(dict(stage="cublas", cfg="torch.mm bf16 N=32", T=T, H=H, us=us, tbs=T * n * H * 2 / us / 1e6))
    results["gemm"] = out
    return top


def plan_from(c, bt=1, bc=1024, bmb=16, fin_warps=4):
    bm, bk, kps, warps, stages, prec, sf = c
    return configs.TwoPass(block_m=bm, block_k=bk, steps=kps // bk, warps=warps, stages=stages,
                          prec=prec, split_fast=sf, bt=bt, bc=bc, bmb=bmb, fin_warps=fin_warps)


def op_runner(op, args, kw, plan, impl=None):
    impl = impl or launch._two_pass
    if op == "pre":
        sc = (kw["rms_eps"], kw["hc_pre_eps"], kw["hc_sinkhorn_eps"], kw["hc_post_mult_value"], kw["sinkhorn_repeat"])

        def run():
            o, pm, cm, _ = impl(op, plan, *args, sc)
            return pm, cm, o
    elif op == "head":
        sc = (kw["rms_eps"], kw["hc_eps"], 0.0, 0.0, 1)

        def run():
            return (impl(op, plan, *args, sc)[0],)
    else:
        sc = (kw["rms_eps"], kw["hc_pre_eps"], kw["hc_sinkhorn_eps"], kw["hc_post_mult_value"], kw["sinkhorn_repeat"])
        x, res, pmi, cmi, fn, s, b = args

        def run():
            o, pm, cm, new = impl(op, plan, res, fn, s, b, sc, fused_inputs=(x, pmi, cmi))
            return new, pm, cm, o
    return run


def stage_ops(results, top, copy_gbs, budget_end):
    n = 4
    out = []
    shapes = [(4096, 4096), (4096, 7168), (16384, 4096), (16384, 7168), (512, 4096), (512, 7168)]
    for op in ("pre", "head", "fused_post_pre"):
        for T, H in shapes:
            if time.time() > budget_end:
                break
            args, kw = checking.device_inputs(op, T, n, H, DEV, seed=T + H)
            rows = checking.sample_rows(T, DEV)
            refs = checking.reference_rows(op, args, kw, rows)
            floor_us = timing.floor_bytes(op, T, n, H) / (copy_gbs * 1e3)
            cands = [plan_from(c) for c in top[:2]]
            for bt, bc, fw in ((2, 1024, 4), (1, 2048, 8), (4, 512, 4), (1, 512, 2)):
                cands.append(plan_from(top[0], bt=bt, bc=bc, fin_warps=fw))
            for c in top[:2]:  # fewer K per program: more programs
                bm, bk, kps, warps, stages, prec, sf = c
                if kps > bk * 2:
                    cands.append(plan_from((bm, bk, kps // 2, warps, stages, prec, sf)))
            seen = set()
            for plan in cands:
                if plan in seen:
                    continue
                seen.add(plan)
                try:
                    run = op_runner(op, args, kw, plan)
                    with checking.poisoned_outputs():
                        outs = run()
                    torch.cuda.synchronize()
                    chk = checking.check_outputs(op, outs, refs, rows, torch.bfloat16)
                    us = graph_us(run)
                except Exception as e:  # noqa: BLE001
                    out.append(dict(op=op, T=T, H=H, plan=dataclasses.asdict(plan), error=f"{type(e).__name__}: {str(e)[:120]}"))
                    continue
                out.append(dict(op=op, T=T, H=H, plan=dataclasses.asdict(plan), us=us, floor_us=floor_us,
                                x=us / floor_us, ok=chk.ok, err=chk.max_err, text=chk.text))
            # The current Triton path in the same run.
            try:
                fn_ = getattr(mhc, op)
                us = graph_us(lambda: fn_(*args, **kw, backend="triton"))
                out.append(dict(op=op, T=T, H=H, plan="current triton", us=us, floor_us=floor_us, x=us / floor_us, ok=True))
            except Exception as e:  # noqa: BLE001
                out.append(dict(op=op, T=T, H=H, plan="current triton", error=str(e)[:120]))
            best = min((r for r in out if r.get("op") == op and r["T"] == T and r["H"] == H and "us" in r
                        and r.get("ok") and r["plan"] != "current triton"), key=lambda r: r["us"], default=None)
            cur = [r for r in out if r.get("op") == op and r["T"] == T and r["H"] == H and r["plan"] == "current triton"]
            log(op, T, H, f"floor {floor_us:.1f}", "best", f"{best['us']:.1f} ({best['x']:.2f}x)" if best else None,
                "current", f"{cur[0].get('us', float('nan')):.1f}" if cur else None)
    results["ops"] = out


def stage_split(results, top, budget_end):
    """pre's two passes apart: the whole op, and the GEMM alone (the difference is the second pass)."""
    n = 4
    out = []
    for T, H in ((1024, 4096), (576, 7168), (4096, 4096)):
        if time.time() > budget_end:
            break
        args, kw = checking.device_inputs("pre", T, n, H, DEV, seed=1)
        plan = plan_from(top[0])
        run = op_runner("pre", args, kw, plan)
        full = graph_us(run)
        res = args[0]
        K = n * H
        w = launch._prep_fn(args[1], 24, 32)
        kps = plan.steps * plan.block_k
        splits = triton.cdiv(K, kps)
        part = torch.empty(splits * T * 32, device=DEV)
        g, _ = gemm_runner(res.view(T, K), w, part, T, K, 24, 32, top[0])
        gemm = graph_us(g)
        out.append(dict(T=T, H=H, full_us=full, gemm_us=gemm, second_us=full - gemm,
                        bytes_res=T * K * 2))
        log("split", T, H, f"full {full:.1f} gemm {gemm:.1f} -> second pass ~{full - gemm:.1f} us "
            f"({T * K * 2 / (full - gemm) / 1e6:.2f} TB/s of residual re-read)")
    results["split"] = out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget-s", type=float, default=480)
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/prenorm-dev"))
    a = ap.parse_args()
    outdir = pathlib.Path(a.out)
    outdir.mkdir(parents=True, exist_ok=True)
    end = T0 + a.budget_s
    results = {"device": torch.cuda.get_device_name(), "triton": triton.__version__, "torch": torch.__version__}
    gbs, notes = copy_bandwidth(DEV, 2 << 30, 200)
    results["copy_GBps"] = gbs
    log(f"copy bandwidth {gbs:.0f} GB/s {notes}")
    try:
        top = stage_gemm(results, T0 + a.budget_s * 0.45)
        json.dump(results, open(outdir / "prenorm_dev.json", "w"), indent=1, default=str)
        stage_split(results, top, T0 + a.budget_s * 0.5)
        stage_ops(results, top, gbs, end)
    finally:
        json.dump(results, open(outdir / "prenorm_dev.json", "w"), indent=1, default=str)
    print("\n== GEMM alone (TB/s of residual read) ==")
    for r in results.get("gemm", []):
        if "us" in r and (r["stage"] != "s1" or r["tbs"] > 2.5):
            print(f"{r['stage']:6} {str(r['cfg']):48} T={r['T']:5} H={r['H']} {r['us']:8.1f} us {r['tbs']:.2f} TB/s"
                  + (f" err {r['err']:.1e}" if "err" in r else ""))
    errs = [r for r in results.get("gemm", []) if "error" in r]
    print(f"({len(errs)} GEMM configs failed to build/run)", errs[:3])
    print("\n== ops ==")
    for r in results.get("ops", []):
        if "us" in r:
            p = r["plan"] if isinstance(r["plan"], str) else "bm={block_m} bk={block_k} st={steps} w={warps} s={stages} {prec} bt={bt} bc={bc} fw={fin_warps}".format(**r["plan"])
            print(f"{r['op']:15} T={r['T']:5} H={r['H']} {r['us']:8.1f} us {r['x']:.2f}x {'ok' if r['ok'] else 'BAD ' + r.get('text', '')} {p}")
        else:
            print(r["op"], r["T"], r["H"], "ERROR", r.get("error"))


if __name__ == "__main__":
    main()
