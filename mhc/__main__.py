"""``python -m mhc``: what can serve here, does it agree with the reference, and how fast.

Subcommands (no subcommand = ``info`` then ``check``):
  info    versions, the device, and every backend with whether it can serve and why not
  check   run every backend that can serve on a small problem on the best device, compare each op
          with the fp64 reference, print backend x op (relative error, median µs); exit 1 if any
          backend disagrees
  bench   the benchmark grid (``mhc.bench``); ``--overhead`` measures host overhead per call
  aot     compile kernels ahead of time with no GPU (``--backend triton|tilelang --arch ...``)
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata as md
import platform
import sys

import torch

import mhc
from mhc import bench, checking, registry
from mhc.progress import Progress, fmt_us
from mhc.registry import Problem

_DISTS = ("torch", "triton", "tilelang", "amd-aiter", "tile-kernels")


def _version(dist: str) -> str:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return "not installed"


def best_device() -> torch.device:
    """``cuda`` (current device; ROCm too) if a GPU is visible, else ``cpu``."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _device_desc(dev: torch.device) -> str:
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        kind = f"ROCm {torch.version.hip}" if torch.version.hip else f"CUDA {torch.version.cuda}"
        return f"{dev} {p.name} ({kind}, {p.multi_processor_count} SMs)"
    return f"cpu ({platform.processor() or platform.machine()}, no GPU visible)"


def cmd_info(args) -> int:
    dev = best_device()
    print(f"mhc {mhc.__version__}, Python {platform.python_version()}")
    print("versions: " + ", ".join(f"{d} {_version(d)}" for d in _DISTS))
    print(f"device: {_device_desc(dev)}")
    print(f"selection: MHC_BACKEND={registry.current_choice('pre')!r} (auto order here: "
          f"{', '.join(registry.auto_order(registry.platform_of(dev), 'pre', args.T))})")
    print(f"\nbackends on {dev} for n={args.n}, H={args.H}, T={args.T}, {args.dtype}:")
    dtype = getattr(torch, args.dtype)
    for name in registry.backend_names():
        whys = {}
        for op in registry.OPS:
            try:
                whys[op] = registry.reasons_for(name, Problem(op, dev, dtype, args.n, args.H, args.T))
            except registry.BackendError as e:
                whys[op] = [str(e)]
        can = [op for op, w in whys.items() if not w]
        print(f"  {name:9s} " + ("serves " + ", ".join(can) if can else "cannot serve"))
        groups: dict[str, list[str]] = {}  # identical reasons are printed once for all their ops
        for op, w in whys.items():
            if w:
                groups.setdefault("; ".join(w), []).append(op)
        for why, ops in groups.items():
            label = "all ops" if len(ops) == len(registry.OPS) else ", ".join(ops)
            print(f"      {label}: {why}")
        try:
            for note in registry.get(name).notes():
                print(f"      note: {note}")
        except registry.BackendError:
            pass
    return 0


def cmd_check(args) -> int:
    dev = torch.device(args.device) if args.device else best_device()
    dtype = getattr(torch, args.dtype)
    names = [args.backend] if args.backend else registry.backend_names()
    print(f"\ncheck on {dev}: n={args.n}, H={args.H}, T={args.T}, {args.dtype}, vs fp64 reference "
          f"(rel. Frobenius error; tolerance act {checking.TOLERANCES[dtype]['act']:g}, "
          f"mix {checking.TOLERANCES[dtype]['mix']:g})")
    slow = _interpreted_backends(names)
    if slow:
        print(f"TRITON_INTERPRET=1: {', '.join(slow)} runs in Triton's CPU interpreter, which is slow (tens of "
              "seconds at the default sizes, minutes at larger --H/--T; the times it shows are the interpreter's): "
              "progress goes to stderr", flush=True)
    progress = Progress(len(slow) * len(registry.OPS))
    print(f"{'backend':10s}" + "".join(f"{op:>26s}" for op in registry.OPS))
    failed = []
    for name in names:
        cells = []
        for op in registry.OPS:
            try:
                why = registry.reasons_for(name, Problem(op, dev, dtype, args.n, args.H, args.T))
            except registry.BackendError as e:
                why = [str(e)]
            if why:
                cells.append("n/a")
                continue
            a, kw = checking.make_inputs(op, (args.T,), args.n, args.H, dtype, dev, seed=args.seed)
            outs = checking.call(op, a, kw, name)
            errs = checking.compare(op, outs, checking.oracle(op, a, kw), dtype)
            bad = [f"{o} {e:.2e}>{t:g}" for o, e, t in errs if not e <= t]
            if bad:
                failed.append(f"{name}.{op}: " + ", ".join(bad))
            us = bench.median_us(lambda: checking.call(op, a, kw, name), dev, min(args.reps, 2) if name in slow else args.reps)
            err = max(e for _, e, _ in errs)
            cells.append(f"{'FAIL' if bad else 'ok'} {err:.1e} {fmt_us(us):>11s}")
            if name in slow:
                progress.step()
                print(f"{progress.prefix()}{name}.{op}: {cells[-1]}", file=sys.stderr, flush=True)
        print(f"{name:10s}" + "".join(f"{c:>26s}" for c in cells))
    print("(n/a: cannot serve here, see `python -m mhc info`)")
    if failed:
        print("\nDISAGREES WITH THE REFERENCE:\n  " + "\n  ".join(failed))
        return 1
    return 0


def _interpreted_backends(names: list[str]) -> list[str]:
    """The backends of ``names`` that run in an interpreter here (Triton under TRITON_INTERPRET=1)."""
    import os

    return [n for n in names if n == "triton" and os.environ.get("TRITON_INTERPRET") == "1"]


def cmd_bench(args) -> int:
    bench = importlib.import_module("mhc.bench")
    return bench.main(args.rest)


def cmd_aot(args) -> int:
    archs = [a.strip() for a in args.arch.split(",") if a.strip()]
    try:
        mod = importlib.import_module(f"mhc.backends.{args.backend}.aot")
    except ModuleNotFoundError as e:
        print(f"aot: backend {args.backend!r} has no ahead-of-time compiler ({e})", file=sys.stderr)
        return 2
    return int(mod.main(archs))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mhc", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd")

    def problem_args(p, T=64):
        p.add_argument("--n", type=int, default=4)
        p.add_argument("--H", type=int, default=512)
        p.add_argument("--T", type=int, default=T)
        p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])

    for name in ("info", "check"):
        p = sub.add_parser(name)
        problem_args(p)
        if name == "check":
            p.add_argument("--backend", help="check only this backend")
            p.add_argument("--device", help="e.g. cpu, cuda:1 (default: the best device)")
            p.add_argument("--reps", type=int, default=20)
            p.add_argument("--seed", type=int, default=0)
    pb = sub.add_parser("bench", help="benchmarks; `python -m mhc bench --help`")
    pb.add_argument("rest", nargs=argparse.REMAINDER)
    pa = sub.add_parser("aot")
    pa.add_argument("--backend", required=True, choices=["triton", "tilelang"])
    pa.add_argument("--arch", required=True, help="comma list: sm90, gfx942, gfx950")
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # the benchmark parses its own options
        return cmd_bench(argparse.Namespace(rest=argv[1:]))
    if not argv or argv[0] not in sub.choices and argv[0] not in ("-h", "--help"):
        full = ap.parse_args(["check"] + argv)  # the main job: info, then check, same options
        return cmd_info(full) or cmd_check(full)
    args = ap.parse_args(argv)
    return {"info": cmd_info, "check": cmd_check, "bench": cmd_bench, "aot": cmd_aot}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
