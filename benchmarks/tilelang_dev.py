"""Check and time the TileLang backend's launchers on one GPU in one go (its development loop).

    PYTHONPATH=.:<site with tilelang> python benchmarks/tilelang_dev.py [--quick] [--sweep] [--out DIR]

1. copy bandwidth (``bench.copy_bandwidth``, the one harness's) -> the floor's rate;
2. correctness of pre, post, head, fused_post_pre at n=4, H in {4096, 7168},
   T in {1, 8, 64, 512, 4096, 16384} against the fp64 oracle (``mhc.checking``: inputs drawn on
   the GPU, the oracle on sampled token rows, outputs poisoned with NaN first so an unwritten
   element fails), a bitwise rerun (the kernels are deterministic), plus odd shapes (n in
   {1, 2, 8}, H not a multiple of the tile);
3. timings (``mhc.timing.time_warm``: median of CUDA-graph replays; no input rotation, so
   T <= 512 partly runs from L2), with tile-kernels beside where it can be called:
   ``mhc_post_fwd`` and ``mhc_pre_big_fuse_fwd`` (the latter without its GEMM, fed precomputed
   logits, so it is a lower bound for tile-kernels' pre);
4. ``--sweep``: the mix kernels under other launch configs (``SWEEP``, passed as the launchers'
   ``_cfg`` override) at H = 7168.

The floor is ``mhc.timing.floor_bytes`` over the copy bandwidth. Prints a table last; writes
results.json and log lines under --out (default $OUT or /tmp/mhc-tilelang-dev).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import copy_bandwidth  # noqa: E402  (benchmarks/bench.py, the one harness)
from mhc import checking, timing  # noqa: E402
from mhc.backends.tilelang import BACKEND  # noqa: E402
from mhc.registry import OPS, Problem  # noqa: E402

#: (BM, HC, threads, min_blocks) per mix op for --sweep; aot's sweep list compiles the same.
SWEEP = {
    "pre": ((64, 128, 256, 2), (64, 64, 128, 4), (32, 128, 128, 4)),
    "head": ((64, 128, 256, 2), (64, 64, 128, 4), (32, 128, 128, 4)),
    "fused_post_pre": ((64, 128, 256, 1), (64, 128, 256, 2), (64, 64, 128, 4), (32, 128, 256, 2)),
}
DTYPE = torch.bfloat16


def _tuple(out) -> tuple:
    return out if isinstance(out, tuple) else (out,)


def check(f, op, T, n, H, dev, seed) -> tuple[checking.Check, bool]:
    """``f`` (a launcher, maybe with a config override) on fresh inputs vs the fp64 oracle, with
    poisoned outputs; and whether a second run with the same inputs is bitwise the same."""
    args, kw = checking.device_inputs(op, T, n, H, dev, seed=seed, dtype=DTYPE)
    rows = checking.sample_rows(T, dev, seed=seed)
    refs = checking.reference_rows(op, args, kw, rows)
    with checking.poisoned_outputs():
        outs = _tuple(f(*args, **kw))
        again = _tuple(f(*args, **kw))
    same = all(torch.equal(a, b) for a, b in zip(outs, again))
    return checking.check_outputs(op, outs, refs, rows, DTYPE), same


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="H=4096 and T<=4096 only")
    ap.add_argument("--out", default=os.environ.get("OUT") or "/tmp/mhc-tilelang-dev")
    ap.add_argument("--no-odd", action="store_true")
    ap.add_argument("--sweep", action="store_true", help="time the mix kernels under SWEEP's configs (H=7168)")
    ap.add_argument("--budget-s", type=float, default=520.0, help="stop starting new sections after this")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    t_start = time.time()
    log = open(os.path.join(args.out, "log.txt"), "w")

    def say(*a):
        s = " ".join(str(x) for x in a)
        print(s, flush=True)
        log.write(s + "\n")
        log.flush()

    dev = torch.device("cuda", torch.cuda.current_device())
    props = torch.cuda.get_device_properties(dev)
    say(f"device {props.name} sm_{props.major}{props.minor} SMs={props.multi_processor_count} torch {torch.__version__}")
    say("probe reasons:", BACKEND.probe(Problem("pre", dev, DTYPE, 4, 4096, 1)), "notes:", BACKEND.notes())
    L = BACKEND.load()
    import tilelang

    say("tilelang", tilelang.__version__, "cache", os.environ.get("TILELANG_CACHE_DIR"))
    results = {"device": props.name, "rows": [], "errors": [], "compile_s": {}}
    gbps, notes = copy_bandwidth(dev, 1 << 30, 200)
    results["copy_GBps"] = gbps
    say(f"copy bandwidth {gbps:.0f} GB/s (read + write; {notes})")

    def floor_us(op, T, n, H):
        return timing.floor_bytes(op, T, n, H) / (gbps * 1e3)

    Hs = (4096,) if args.quick else (4096, 7168)
    Ts = (1, 8, 64, 512, 4096) if args.quick else (1, 8, 64, 512, 4096, 16384)
    fns = {op: getattr(L, op) for op in OPS}

    # compile (or load from the disk cache) every kernel first, timing each
    for H in Hs:
        for op in OPS:
            a, kw = checking.device_inputs(op, 1, 4, H, dev, dtype=DTYPE)
            t0 = time.time()
            try:
                fns[op](*a, **kw)
                torch.cuda.synchronize()
                results["compile_s"][f"{op}/H={H}"] = time.time() - t0
                say(f"first call {op} H={H}: {time.time() - t0:.1f}s")
            except Exception:
                results["errors"].append(f"{op} H={H} first call: {traceback.format_exc()}")
                say(f"FIRST CALL FAILED {op} H={H}\n{traceback.format_exc()}")

    # correctness
    for H in Hs:
        for T in Ts:
            for op in OPS:
                try:
                    chk, same = check(fns[op], op, T, 4, H, dev, 1000 * T + H)
                    ok = chk.ok and same
                    results["rows"].append(dict(kind="check", op=op, T=T, H=H, ok=ok, check=chk.text,
                                                max_rel_err=chk.max_err, rerun_bitwise=same))
                    say(f"check {op:15s} H={H:5d} T={T:6d} {'ok  ' if ok else 'FAIL'} {chk.text} "
                        f"max_rel_err={chk.max_err:.2e} rerun_bitwise={same}")
                except Exception:
                    results["errors"].append(f"check {op} T={T} H={H}: {traceback.format_exc()}")
                    say(f"CHECK ERROR {op} T={T} H={H}\n{traceback.format_exc()}")
                torch.cuda.empty_cache()

    # timings, tile-kernels beside
    try:
        import tile_kernels.mhc as tk

        say("tile-kernels imported")
    except Exception as e:
        tk = None
        say(f"tile-kernels unavailable: {type(e).__name__}: {e}")
    table = []
    for H in Hs:
        for T in Ts:
            for op in OPS:
                if time.time() - t_start > args.budget_s:
                    say("time budget reached; skipping remaining timings")
                    break
                try:
                    a, kw = checking.device_inputs(op, T, 4, H, dev, seed=7, dtype=DTYPE)
                    f = fns[op]
                    us, _ = timing.time_warm(lambda: f(*a, **kw), dev, 100)
                    fl = floor_us(op, T, 4, H)
                    row = dict(kind="time", op=op, T=T, H=H, us=us, GBps=timing.floor_bytes(op, T, 4, H) / us / 1e3,
                               floor_us=fl, ratio=us / fl)
                    if tk is not None and op in ("post", "pre"):
                        try:
                            if op == "post":
                                x, r, pm, cm = a
                                tkf = lambda: tk.mhc_post_fwd(x.view(1, T, H), r.view(1, T, 4, H),  # noqa: E731
                                                              pm.view(1, T, 4, 1), cm.view(1, T, 4, 4))
                            else:
                                r = a[0]
                                gm = torch.randn(1, T, 24, device=dev)
                                gs = torch.rand(1, T, device=dev) * 4 * H
                                pmo = torch.empty(T, 4, device=dev)
                                cmo = torch.empty(T, 16, device=dev)
                                lio = torch.empty(T, H, dtype=DTYPE, device=dev)
                                tkf = lambda: tk.mhc_pre_big_fuse_fwd(gm, gs, a[2], a[3], r, pmo, cmo, lio,  # noqa: E731
                                                                      *kw.values(), n_splits=1)
                            row["tk_us"], _ = timing.time_warm(tkf, dev, 100)
                        except Exception as e:
                            row["tk_err"] = f"{type(e).__name__}: {str(e)[:200]}"
                    results["rows"].append(row)
                    table.append(row)
                    say(f"time {op:15s} H={H:5d} T={T:6d} {us:9.2f} us {row['GBps']:7.0f} GB/s "
                        f"floor {fl:8.2f} us ratio {row['ratio']:5.2f}"
                        + (f"  tk {row['tk_us']:.2f} us" if "tk_us" in row else "")
                        + (f"  tk error {row['tk_err']}" if "tk_err" in row else ""))
                except Exception:
                    results["errors"].append(f"time {op} T={T} H={H}: {traceback.format_exc()}")
                    say(f"TIME ERROR {op} T={T} H={H}\n{traceback.format_exc()}")
                torch.cuda.empty_cache()

    # config sweep of the mix kernels (pre/head/fused) at H=7168: correctness at T=4096, then times
    if args.sweep:
        from mhc.backends.tilelang.kernels import MixConfig

        H = 7168
        for op, cfgs in SWEEP.items():
            for cfg_t in cfgs:
                cfg = MixConfig(*cfg_t)
                if time.time() - t_start > args.budget_s:
                    say("time budget reached; skipping rest of sweep")
                    break
                f = lambda *a, _f=fns[op], _c=cfg, **kw: _f(*a, **kw, _cfg=_c)  # noqa: E731
                try:
                    chk, same = check(f, op, 4096, 4, H, dev, 11)
                    times = {}
                    for T in (1, 64, 512, 4096, 16384):
                        a, kw = checking.device_inputs(op, T, 4, H, dev, seed=7, dtype=DTYPE)
                        times[T], _ = timing.time_warm(lambda: f(*a, **kw), dev, 100)
                    row = dict(kind="sweep", op=op, cfg=str(cfg_t), ok=chk.ok and same,
                               **{f"us_T{T}": v for T, v in times.items()},
                               **{f"ratio_T{T}": v / floor_us(op, T, 4, H) for T, v in times.items()})
                    results["rows"].append(row)
                    say(f"sweep {op:15s} {cfg_t} {'ok  ' if row['ok'] else 'FAIL ' + chk.text} "
                        + " ".join(f"T{T}={v:.1f}us({row[f'ratio_T{T}']:.2f}x)" for T, v in times.items()))
                except Exception:
                    results["errors"].append(f"sweep {op} {cfg_t}: {traceback.format_exc()}")
                    say(f"SWEEP ERROR {op} {cfg_t}\n{traceback.format_exc()[-1500:]}")
                torch.cuda.empty_cache()

    # odd shapes: generality (n != 4, H not a multiple of the tile, T not a multiple of BM)
    if not args.no_odd:
        for n, H, T in ((1, 64, 3), (2, 1000, 70), (8, 512, 130), (4, 4100, 65)):
            if time.time() - t_start > args.budget_s:
                say("time budget reached; skipping odd shapes")
                break
            for op in OPS:
                try:
                    chk, same = check(fns[op], op, T, n, H, dev, 3)
                    ok = chk.ok and same
                    results["rows"].append(dict(kind="odd", op=op, n=n, T=T, H=H, ok=ok, check=chk.text,
                                                max_rel_err=chk.max_err, rerun_bitwise=same))
                    say(f"odd   {op:15s} n={n} H={H:5d} T={T:4d} {'ok  ' if ok else 'FAIL'} {chk.text} "
                        f"max_rel_err={chk.max_err:.2e} rerun_bitwise={same}")
                except Exception:
                    results["errors"].append(f"odd {op} n={n} T={T} H={H}: {traceback.format_exc()}")
                    say(f"ODD ERROR {op} n={n} T={T} H={H}\n{traceback.format_exc()[-1500:]}")

    with open(os.path.join(args.out, "results.json"), "w") as fh:
        json.dump(results, fh, indent=1, default=str)
    say(f"\n=== summary (copy bandwidth {gbps:.0f} GB/s) ===")
    say(f"{'op':15s} {'H':>5s} {'T':>6s} {'us':>9s} {'GB/s':>6s} {'xfloor':>6s} {'tk us':>8s}")
    for r in table:
        say(f"{r['op']:15s} {r['H']:5d} {r['T']:6d} {r['us']:9.2f} {r['GBps']:6.0f} {r['ratio']:6.2f} "
            f"{r.get('tk_us', float('nan')):8.2f}")
    bad = [r for r in results["rows"] if r["kind"] in ("check", "odd") and not r["ok"]]
    say(f"checks: {sum(1 for r in results['rows'] if r['kind'] in ('check', 'odd'))} run, {len(bad)} failed, "
        f"{len(results['errors'])} errors; wall {time.time() - t_start:.0f}s")
    return 1 if bad or results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
