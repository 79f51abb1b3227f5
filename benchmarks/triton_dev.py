"""Triton backend: correctness at real sizes, copy bandwidth, timings and a config sweep (one GPU call).

``python benchmarks/triton_dev.py [--quick] [--no-sweep] [--no-compile] [--no-old] [--small] [--T ...] [--jobs N]``
on a CUDA machine. Prints, per op/H/T: the error against the fp64 reference (outputs poisoned
with NaN first), the Triton time (CUDA-graph replays, median), GB/s, the ratio to the floor (bytes
that must move / measured copy bandwidth), the previously committed table's time ("old",
``launch._COMMITTED_TABLE``) and eager / torch.compile of ``mhc.reference`` for comparison.
Small T timings are L2-warm (inputs fit in L2), as in the peers' figures. The sweep times other
launch configs of ``pre``; ``--diag`` times the chunked path's launch schedules (phase A alone,
phase B alone after all of A, A/B alternating, the overlapped default) to show whether phase B's
re-read comes from L2; ``--small`` times the small-T variants (``SMALL``) beside the old and new
tables, the Sinkhorn's share at T=1, a one-program kernel's launch floor, and checks odd shapes
(n in 1, 2, 8; H in 1, 100, 384). Kernels are compiled first by ``--jobs`` processes in parallel (Triton's
cache is shared). The chosen table lives in ``mhc/backends/triton/launch.py`` and the figures in
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


def _row(**kw):
    base = dict(rowwise=False, num_warps=4, num_stages=1, post_block_h=1024, post_warps=4)
    return dict(base, **kw)


def _c(mib, bm, bh, sp, bmb, bc, cs, w=4, st=2):
    return _row(chunk_mib=mib, block_m=bm, block_h=bh, splits=sp, block_m_b=bmb, block_c=bc, c_steps=cs,
                num_warps=w, num_stages=st)


OLD = L._COMMITTED_TABLE
NEW = L._TABLE  # as imported (workers switch L._TABLE between jobs)
def _p(mib, bm, bh, sp, w, st, prep=True, bmb=16, bc=128, cs=4):
    return dict(_c(mib, bm, bh, sp, bmb, bc, cs, w=w, st=st), prep=prep)


def _sl(bm, bh, sp, w, st, prep=True):
    return _row(block_m=bm, block_h=bh, splits=sp, block_c=64, num_warps=w, num_stages=st, prep=prep)


SWEEP = {  # (op, T) -> candidate rows (Config fields); chunked where chunk_mib is set
    ("pre", 4096): [_p(32, 64, 32, 16, 4, 3), _p(32, 128, 32, 16, 4, 3), _p(64, 64, 64, 16, 4, 2)],
    ("head", 4096): [_p(32, 64, 32, 16, 4, 3), _p(32, 128, 32, 16, 4, 3)],
    ("fused_post_pre", 4096): [_sl(64, 64, 4, 8, 2), _sl(64, 32, 8, 8, 3)],
}


_TINY = dict(block_m=16, block_h=64, splits=128, block_c=2048, rowwise=True, num_warps=4, num_stages=1,
             post_block_h=256, post_warps=1)
_TAIL4 = dict(_TINY, block_c=1024, sk_elem=True, tail=True, tail_rows=1)
_CH = dict(chunk_mib=64, block_m=16, block_h=64, splits=32, block_m_b=4, block_c=256, c_steps=1,
           rowwise=False, num_warps=4, num_stages=1, post_block_h=512, post_warps=2)
_CHN = dict(_CH, sk_elem=True, b_split=True)
#: Small-T variants: name -> (T values, the whole table to run). "old" is OLD, "new" launch._TABLE.
#: Run 7 (first H100 call) also had: 8 warps in the tail (1.5 us slower than 4 at T=1: the 8 warps
#: issue the same in-thread Sinkhorn twice per scheduler), early prefetch (no change), 32 splits
#: (2-6 us slower), the chunked path with 2 stages (slower).
SMALL = {
    "tail bh64": ((1,), ((1, _TAIL4, None),)),
    "tail bh32": ((1,), ((1, dict(_TAIL4, block_h=32, splits=256), None),)),
    "tail bh32 pf512": ((1,), ((1, dict(_TAIL4, block_h=32, splits=256, tail_pf_bytes=512), None),)),
    "tail 2 rows bh32": ((2,), ((2, dict(_TAIL4, block_h=32, splits=256, tail_rows=2), None),)),
    "chunk s32": ((2, 8, 64), ((None, _CHN, None),)),
    "chunk s64": ((2, 8, 64), ((None, dict(_CHN, splits=64), None),)),
    "chunk s64 bmb8": ((8, 64), ((None, dict(_CHN, splits=64, block_m_b=8), None),)),
    "chunk bh32 s128": ((8, 64), ((None, dict(_CHN, block_h=32, splits=128), None),)),
    "chunk bm64 s128": ((8, 64), ((None, dict(_CHN, block_m=64, splits=128), None),)),
}
SMALL_OPS = ("pre", "head", "fused_post_pre")
#: Per-output bounds (relative Frobenius error vs the fp64 reference), outputs in return order.
TOL = {"pre": [1e-3, 1e-3, 1e-2], "post": [1e-2], "head": [1e-2], "fused_post_pre": [1e-2, 1e-3, 1e-3, 1e-2]}


def small_jobs(Hs):
    """(variant, op, H, T) of the small-T sweep."""
    return [(name, op, H, T) for name, (Ts, _) in SMALL.items() for H in Hs for T in Ts for op in SMALL_OPS]


def small(dev, bw, Hs):
    """Small-T variants beside the committed table ("old") and the current one ("new"), each checked
    against the fp64 reference with poisoned outputs; and the Sinkhorn's share at T=1
    (sinkhorn_repeat 1 vs 20) for old and new."""
    print("\n# small-T variants (us; err = max relative error of all outputs)")
    saved = L._TABLE
    try:
        for H in Hs:
            for T in (1, 2, 8, 64):
                d = make(T, H, dev, seed=T + H + 1)
                names = ["old", "new"] + [n for n, (Ts, _) in SMALL.items() if T in Ts]
                for op in SMALL_OPS:
                    cells = []
                    for name in names:
                        L._TABLE = _table(name)
                        try:
                            f = calls(d, L)[op]
                            backends._ALLOCATOR = _nan_empty
                            try:
                                errs = errors(op, d, f())
                            finally:
                                backends._ALLOCATOR = backends._plain_empty
                            ok = all(e == e and e < t for e, t in zip(errs, TOL[op]))
                            us = bench(f)
                            cells.append(f"{name}: {us:.1f}{'' if ok else ' ERR ' + ' '.join(f'{e:.1e}' for e in errs)}")
                        except Exception as e:
                            cells.append(f"{name}: FAILED {type(e).__name__}: {str(e)[:120]}")
                    print(f"small {op:<14} H={H} T={T:<3} " + " | ".join(cells), flush=True)
            d = make(1, H, dev, seed=H)
            e1 = list(EPS.values())
            e1[-1] = 1
            for name in ("old", "new"):
                L._TABLE = _table(name)
                f20 = calls(d, L)["pre"]
                f1 = lambda: L.pre(d["residual"], d["fn"], d["scale"], d["base"], *e1)  # noqa: E731
                print(f"small sinkhorn share, pre H={H} T=1 {name}: repeat 20 {bench(f20):.1f} us,"
                      f" repeat 1 {bench(f1):.1f} us", flush=True)
    finally:
        L._TABLE = saved


def launch_floor(dev):
    """One tiny Triton kernel (one program, one store) under CUDA-graph replay: the launch floor."""
    import triton.language as tl

    @triton.jit
    def _one(p):
        tl.store(p, 1.0)

    buf = torch.empty(1, device=dev)
    us = bench(lambda: _one[(1,)](buf))
    print(f"launch floor (one-program Triton kernel, graph replay): {us:.2f} us", flush=True)


#: Odd shapes: (n, H) x T (T=1: the register tail; 5: the chunked small-T bucket), bf16;
#: fp16 at one shape.
ODD = [(n, H, T, torch.bfloat16) for n in (1, 2, 8) for H in (1, 100, 384) for T in (1, 5)] + \
    [(8, 100, T, torch.float16) for T in (1, 5)]


def _odd_one(case, dev):
    """Every op at one odd shape through the current table; failures as strings."""
    from mhc import checking

    n, H, T, dtype = case
    fails = []
    for op in ("pre", "post", "head", "fused_post_pre"):
        args, kw = checking.make_inputs(op, (T,), n, H, dtype, device=dev, seed=n * 1000 + H + T)
        backends._ALLOCATOR = _nan_empty
        try:
            out = getattr(L, op)(*args, **kw)
        finally:
            backends._ALLOCATOR = backends._plain_empty
        out = out if isinstance(out, tuple) else (out,)
        refs = checking.oracle(op, args, kw)
        if op == "fused_post_pre":
            a = [checking._f64(t) for t in args]
            refs = (refs[0], *R.pre(checking._f64(out[0]), *a[4:], **kw))
        res = checking.compare(op, out, refs, dtype)
        fails += [f"{op} n={n} H={H} T={T} {dtype}: {k} {e:.1e} > {t:g}" for k, e, t in res if not e <= t]
    return fails


def _warm_odd(case):
    L._TABLE = NEW
    try:
        _odd_one(case, torch.device("cuda"))
        torch.cuda.synchronize()
        return None
    except Exception as e:
        return f"odd {case}: {type(e).__name__}: {str(e)[:200]}"


def odd_shapes(dev):
    """Every op through the current table at ``ODD``, against the fp64 oracle (``mhc.checking``),
    outputs poisoned; fused's pre half against the reference run on the kernel's own new residual
    (tiny H: 1-ulp residual differences move the mixes). Returns the number of failing shapes."""
    bad = 0
    for case in ODD:
        try:
            fails = _odd_one(case, dev)
        except Exception as e:
            fails = [f"{case}: {type(e).__name__}: {str(e)[:300]}"]
        for f in fails:
            print(f"odd FAIL {f}", flush=True)
        bad += bool(fails)
    print(f"odd shapes: {len(ODD)} shapes (n in 1, 2, 8; H in 1, 100, 384; T in 1, 5), 4 ops: "
          f"{bad} failing", flush=True)
    return bad


def sweep_jobs(Hs):
    """(op, H, T, row) of the sweep."""
    return [(op, H, T, row) for H in Hs for (op, T), rows in SWEEP.items() for row in rows]


def sweep(dev, bw, Hs):
    print("\n# config sweep (chunk_mib, block_m, block_h, splits, block_m_b, block_c, c_steps, warps, stages)")
    saved = L._TABLE
    try:
        data = {}
        for op, H, T, row in sweep_jobs(Hs):
            if (H, T) not in data:
                data = {(H, T): make(T, H, dev)}
            d = data[(H, T)]
            L._TABLE = ((None, row, None),)
            desc = tuple(row.get(k) for k in ("chunk_mib", "block_m", "block_h", "splits", "block_m_b",
                                               "block_c", "c_steps", "num_warps", "num_stages", "prep"))
            try:
                f = calls(d, L)[op]
                err = max(errors(op, d, f()))
                us = bench(f)
                ratio = us / (floor_bytes(op, T, H) / bw / 1e3)
                print(f"sweep {op} H={H} T={T:<6} {desc} chunk={L.configs(N, H, T, op).chunk:<5} {us:8.1f} us"
                      f"  {ratio:5.2f}x floor  err {err:.1e}", flush=True)
            except Exception as e:
                print(f"sweep {op} H={H} T={T:<6} {desc}  FAILED {type(e).__name__}: {e}", flush=True)
    finally:
        L._TABLE = saved


def diag(dev, bw, H, T, table=None, name="new"):
    """Launch schedules of the chunked pre at (H, T) with ``table`` (default: the current one):
    is phase B's re-read served by L2, how fast is phase A alone?"""
    saved = L._TABLE
    L._TABLE = table or saved
    try:
        cfg = L.configs(N, H, T)
    finally:
        L._TABLE = saved
    if not cfg.chunk:
        return
    d = make(T, H, dev)
    n_ch = triton.cdiv(T, cfg.chunk)
    spec = L.mix_specialization("pre", N, torch.bfloat16, cfg)
    e = tuple(EPS.values())
    scal = (e[0], e[1], e[2], e[3], int(e[4]))
    out = torch.empty(T, H, dtype=torch.bfloat16, device=dev)
    pm = torch.empty(T, N, 1, device=dev)
    cm = torch.empty(T, N, N, device=dev)
    r = d["residual"]
    fn = L._prep_fn(d["fn"], spec["N3"], spec["N3P"]) if cfg.prep else d["fn"]

    def run(sched):
        return lambda: L._chunked(cfg, spec, r, r, r, r, r, fn, d["scale"], d["base"], pm, cm, out, T, H,
                                  scal, schedule=sched)

    res_b = T * N * H * 2
    scheds = {
        "A only (all chunks)": [(c, -1) for c in range(n_ch)],
        "B only (after all A)": [(-1, c) for c in range(n_ch)],
        "A,B alternating": [x for c in range(n_ch) for x in ((c, -1), (-1, c))],
        "overlapped (default)": None,
    }
    print(f"\n# diag {name} pre H={H} T={T} chunk={cfg.chunk} ({n_ch} chunks) {cfg}; residual {res_b / 1e6:.0f} MB")
    for name, sc in scheds.items():
        us = bench(run(sc))
        print(f"diag {name:<22} {us:8.1f} us  residual-read rate {res_b / us / 1e3:6.0f} GB/s", flush=True)
    # B alone on one chunk right after A of that chunk (L2-warm) vs cold: per-chunk times.
    one_a, one_b = run([(0, -1)]), run([(-1, 0)])
    ab = bench(lambda: (one_a(), one_b()))
    a1 = bench(one_a)
    print(f"diag one chunk: A {a1:.1f} us, A then B {ab:.1f} us -> B {ab - a1:.1f} us "
          f"(B reads {cfg.chunk * N * H * 2 / 1e6:.1f} MB, writes {cfg.chunk * H * 2 / 1e6:.1f} MB)", flush=True)


def _table(key):
    """A hashable name for a table -> the table: "new", "old", or a sweep row's sorted items."""
    if key == "new":
        return NEW
    if key == "old":
        return OLD
    if isinstance(key, str):
        return SMALL[key][1]
    return ((None, dict(key), None),)


def _warm(job):
    """Compile one (table, op, H, T) in a worker: fills Triton's on-disk cache for the main process."""
    key, op, H, T = job
    try:
        L._TABLE = _table(key)
        d = make(T, H, torch.device("cuda"))
        calls(d, L)[op]()
        torch.cuda.synchronize()
        return None
    except Exception as e:  # the main process reports it again when it runs the same config
        return f"{op} H={H} T={T}: {type(e).__name__}: {str(e)[:200]}"


def warm_all(jobs, n, odd=()):
    """``jobs``: (table key, op, H, T). T is replaced by a small T of the same bucket and the same
    integer specialisation (a multiple of 16 stays one), which compiles the same kernel. ``odd``:
    cases of :func:`odd_shapes` to compile too."""
    t0 = time.time()
    uniq = list(dict.fromkeys((k, op, H, T if T <= 1024 else 2048) for k, op, H, T in jobs))
    with mp.get_context("spawn").Pool(n) as pool:
        res = pool.map_async(_warm_odd, list(odd))
        fails = [f for f in pool.imap_unordered(_warm, uniq) if f]
        fails += [f for f in res.get() if f]
    print(f"warm-up: {len(uniq)} calls in {time.time() - t0:.0f}s on {n} processes; failures: {fails}", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="H=4096 and T in {1, 512, 4096} only")
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--no-old", action="store_true", help="skip the single-launch baseline")
    ap.add_argument("--no-eager", action="store_true")
    ap.add_argument("--diag", action="store_true")
    ap.add_argument("--small", action="store_true", help="small-T variants, launch floor, odd shapes")
    ap.add_argument("--ops", nargs="*", default=["pre", "post", "head", "fused_post_pre"])
    ap.add_argument("--jobs", type=int, default=min(14, os.cpu_count() or 1))
    ap.add_argument("--compile-T", type=int, nargs="*", default=[1, 4096])
    ap.add_argument("--T", type=int, nargs="*", help="token counts (default: 1 8 64 512 4096 16384)")
    args = ap.parse_args()
    dev = torch.device("cuda")
    print(torch.cuda.get_device_name(), torch.__version__, triton.__version__, flush=True)
    Hs = (4096,) if args.quick else (4096, 7168)
    Ts = args.T or ((1, 512, 4096) if args.quick else (1, 8, 64, 512, 4096, 16384))
    ops = tuple(args.ops)
    jobs = [("new", op, H, T) for H in Hs for T in Ts for op in ops]
    if args.small:
        jobs += small_jobs(Hs) + [(k, op, H, T) for k in ("old", "new") for H in Hs for T in (1, 2, 8, 64)
                                  for op in SMALL_OPS]
    if not args.no_old:
        jobs += [("old", op, H, T) for H in Hs for T in Ts for op in ops if op != "post"]
    if not args.no_sweep:
        jobs += [(tuple(sorted(row.items())), op, H, T) for op, H, T, row in sweep_jobs(Hs)]
    if args.jobs > 1:
        warm_all(jobs, args.jobs, ODD if args.small else ())
    bw = copy_bandwidth(dev)
    print(f"copy bandwidth {bw:.0f} GB/s", flush=True)
    rows = []
    bad = 0
    tol = TOL
    for H in Hs:
        for T in Ts:
            d = make(T, H, dev, seed=T + H)
            for op, f in calls(d, L).items():
                if op not in ops:
                    continue
                backends._ALLOCATOR = _nan_empty
                try:
                    errs = errors(op, d, f())
                finally:
                    backends._ALLOCATOR = backends._plain_empty
                ok = all(e == e and e < t for e, t in zip(errs, tol[op]))
                bad += not ok
                fb = floor_bytes(op, T, H)
                floor_us = fb / bw / 1e3
                us = bench(f)
                old_us = float("nan")
                if not args.no_old and op != "post":
                    saved, L._TABLE = L._TABLE, OLD
                    try:
                        old_us = bench(calls(d, L)[op])
                    finally:
                        L._TABLE = saved
                ref_us = float("nan") if args.no_eager else bench(calls(d, R)[op])
                comp_us = float("nan")
                if not args.no_compile and T in args.compile_T:
                    cf = torch.compile(getattr(R, op), dynamic=False)
                    cd = calls(d, type("C", (), {op: staticmethod(cf)}))[op]
                    cd()
                    comp_us = bench(cd)
                rows.append((op, H, T, us, fb / us / 1e3, us / floor_us, floor_us, old_us, ref_us, comp_us))
                print(f"{op:<15} H={H:<5} T={T:<6} {us:9.1f} us {fb / us / 1e3:7.0f} GB/s {us / floor_us:6.2f}x floor"
                      f" (floor {floor_us:7.1f} us)  old {old_us:8.1f} ({old_us / floor_us:5.2f}x)  eager {ref_us:9.1f}"
                      f"  compile {comp_us:9.1f}  err {' '.join(f'{e:.1e}' for e in errs)} {'ok' if ok else 'FAIL'}",
                      flush=True)
    if args.diag:
        for H in Hs:
            diag(dev, bw, H, 4096)
            diag(dev, bw, H, 4096, OLD, "old")
            for row in (_p(32, 128, 32, 16, 4, 3),):
                diag(dev, bw, H, 4096, ((None, row, None),), "sweep")
    if not args.no_sweep:
        sweep(dev, bw, Hs)
    if args.small:
        launch_floor(dev)
        small(dev, bw, Hs)
        bad += odd_shapes(dev)
    print("\n| op | H | T | triton us | GB/s | x floor | old us | old x floor | eager us | compile us |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for op, H, T, us, gbs, ratio, floor_us, old_us, ref_us, comp_us in rows:
        print(f"| {op} | {H} | {T} | {us:.1f} | {gbs:.0f} | {ratio:.2f} | {old_us:.1f} | {old_us / floor_us:.2f} |"
              f" {ref_us:.1f} | {comp_us:.1f} |")
    print(f"\ncorrectness failures: {bad}")
    return 1 if bad else 0


if __name__ == "__main__":
    t0 = time.time()
    rc = main()
    print(f"total {time.time() - t0:.0f}s")
    sys.exit(rc)
