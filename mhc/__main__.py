"""python -m mhc (also installed as the command mhc): what can serve here, does it agree with the
reference, and how fast.

Subcommands (none: info, then check, with check's options):
  info    versions, the device, and every backend with whether it can serve and why not
  check   run every backend that can serve on a small problem on the best device, compare each op
          with the fp64 reference, print one line per backend x op (the output nearest its tolerance,
          its relative error; kernel µs from CUDA-graph replays and eager µs per call, host overhead
          included); exit 1 if any backend disagrees or nothing could be checked
  aot     compile kernels ahead of time with no GPU (--backend triton|tilelang --arch ...)

Exit status: 2 and one line on stderr for an argument error (a malformed MHC_BACKEND included);
1 and one line for an error writing the output (a full disk); 141 and nothing for a reader that
stopped reading (python -m mhc check | head), as a Unix tool killed by SIGPIPE. The benchmark
harness is not part of the installed package: python benchmarks/bench.py in a checkout
(benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata as md
import os
import pathlib
import platform
import re
import signal
import sys

import torch

import mhc
from mhc import checking, registry, timing, validation
from mhc.progress import Progress, fmt_us
from mhc.registry import Problem

#: Distributions whose versions ``info`` reports besides the backends' own (``Backend.distribution``):
#: torch, and DeepSeek's tile-kernels, the peer of the benchmarks.
_DISTS = ("torch", "tile-kernels")

#: This package's distribution (pyproject.toml's ``name``). Others on PyPI install a top-level
#: module ``mhc`` too (``mhc``, ``mhc-pytorch``, ``mhc-cuda``): ``info`` names any that is installed.
DISTRIBUTION = "mhc-kernels"

#: Bounds of the command-line sizes and counts; a value outside is an argument error that names
#: the bound. ``check`` draws its inputs and runs the reference in fp64 on the host, so it also
#: bounds the residual's elements, T * n * H, by MAX_ELEMENTS (2 GiB per fp64 copy).
MAX_H = 1 << 16
MAX_T = 1 << 20
MAX_ELEMENTS = 1 << 28
MAX_REPS = 10_000
MAX_SEED = 2**63 - 1


def _version(dist: str) -> str:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return "not installed"


def _canonical(dist: str) -> str:
    return re.sub(r"[-_.]+", "-", dist).lower()


def other_mhc_distributions() -> list[str]:
    """The installed distributions other than this one that provide a top-level ``mhc`` (from
    ``importlib.metadata.packages_distributions``): each overwrites, or is overwritten by, this
    package's files."""
    try:
        found = md.packages_distributions().get("mhc", [])
    except Exception:  # a broken metadata file must not end the report
        return []
    return sorted({d for d in found if _canonical(d) != DISTRIBUTION})


def _distribution(name: str) -> str | None:
    """The distribution backend ``name`` needs, or None (none beyond torch, or a broken record)."""
    try:
        return registry.get(name).distribution
    except registry.BackendError:
        return None


def best_device() -> torch.device:
    """``cuda`` (current device; ROCm too) if a GPU is visible, else ``cpu``."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _device_desc(dev: torch.device) -> str:
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        kind = f"ROCm {torch.version.hip}" if torch.version.hip else f"CUDA {torch.version.cuda}"
        return f"{dev} {p.name} ({kind}, {p.multi_processor_count} SMs)"
    return f"cpu ({platform.processor() or platform.machine()}, no GPU visible)"


def _reasons_per_op(name: str, dev: torch.device, dtype: torch.dtype, args) -> dict[str, list[str]]:
    """``{op: why backend name cannot serve it}`` for the problem of ``args`` (n, H, T) on ``dev``
    (an empty list: it can; a broken record's error is its one reason)."""
    whys = {}
    for op in registry.OPS:
        try:
            whys[op] = registry.reasons_for(name, Problem(op, dev, dtype, args.n, args.H, args.T))
        except registry.BackendError as e:
            whys[op] = [str(e)]
    return whys


def cmd_info(args) -> int:
    dev = best_device()
    print(f"mhc {mhc.__version__}, Python {platform.python_version()}")
    dists = dict.fromkeys(_DISTS[:1] + tuple(_distribution(name) for name in registry.backend_names()) + _DISTS[1:])
    print("versions: " + ", ".join(f"{d} {_version(d)}" for d in dists if d))
    for other in other_mhc_distributions():
        print(f"NAME CLASH: the distribution {other} {_version(other)} also installs a top-level module mhc; "
              f"one overwrote the other's files (this mhc: {pathlib.Path(mhc.__file__).parent}). "
              f"Run pip uninstall {other}, then reinstall {DISTRIBUTION}")
    print(f"device: {_device_desc(dev)}")
    print(f"selection: MHC_BACKEND={registry.current_choice('pre')!r} (auto order here: "
          f"{', '.join(registry.auto_order(registry.platform_of(dev), 'pre', args.T))})")
    print(f"\nbackends on {dev} for n={args.n}, H={args.H}, T={args.T}, {args.dtype}:")
    dtype = getattr(torch, args.dtype)
    for name in registry.backend_names():
        whys = _reasons_per_op(name, dev, dtype, args)
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
            notes = list(registry.get(name).notes())
        except registry.BackendError:
            notes = []
        except registry.CAUGHT as e:  # a plug-in's notes() must not end the report
            notes = [f"its notes() raised {type(e).__name__}: {e}"]
        for note in notes:
            print(f"      note: {note}")
    return 0


def cmd_check(args) -> int:
    dev = torch.device(args.device) if args.device else best_device()
    dtype = getattr(torch, args.dtype)
    names = [args.backend] if args.backend else registry.backend_names()
    tol = checking.TOLERANCES[dtype]
    kernel_label = ("kernel µs: median of CUDA-graph replays (the GPU's time)" if dev.type == "cuda" else
                    "kernel µs: — (no CUDA graphs on this device)")
    print(f"\ncheck on {dev}: n={args.n}, H={args.H}, T={args.T}, {args.dtype}, vs fp64 reference. Error: "
          f"the output nearest its tolerance (rel. Frobenius error; tolerance {tol['act']:g} for "
          f"layer_input, new_residual and out, {tol['mix']:g} for post_mix and comb_mix). {kernel_label}; "
          f"eager µs: wall time per call of {args.reps} back-to-back calls synchronised once, median of "
          "5 rounds (host overhead included)")
    slow = _interpreted_backends(names)
    if slow:
        print(f"TRITON_INTERPRET=1: {', '.join(slow)} runs in Triton's CPU interpreter, which is slow (tens of "
              "seconds at the default sizes, minutes at larger --H/--T; the times it shows are the interpreter's): "
              "progress goes to stderr", flush=True)
    progress = Progress(len(slow) * len(registry.OPS))
    print(f"{'backend':10s} {'op':15s} {'result':34s} {'kernel µs':>10s} {'eager µs':>10s}")
    failed = []
    checked = 0
    for name in names:
        why = _reasons_per_op(name, dev, dtype, args)
        if all(why.values()):
            print(f"{name:10s} {'(every op)':15s} n/a")
            continue
        for op in registry.OPS:
            if why[op]:
                print(f"{name:10s} {op:15s} n/a")
                continue
            checked += 1
            a, kw = checking.make_inputs(op, (args.T,), args.n, args.H, dtype, dev, seed=args.seed)
            outs = checking.call(op, a, kw, name)
            errs = checking.compare(op, outs, checking.oracle(op, a, kw), dtype)
            bad = [f"{o} {e:.2e}>{t:g}" for o, e, t in errs if not e <= t]
            if bad:
                failed.append(f"{name}.{op}: " + ", ".join(bad))

            def call():
                return checking.call(op, a, kw, name)

            kernel = "—"
            if dev.type == "cuda":
                us, timer = timing.time_warm(call, dev, 20)
                kernel = fmt_us(us) + ("" if timer == "cudagraph" else "*")  # *: no capture, event-timed
            eager = fmt_us(timing.eager_us(call, dev, min(args.reps, 2) if name in slow else args.reps,
                                          1 if name in slow else 5))
            out, err, _ = max(errs, key=lambda e: e[1] / e[2])  # the output nearest its tolerance
            result = f"{'FAIL' if bad else 'ok'} {out}={err:.1e}"
            line = f"{name:10s} {op:15s} {result:34s} {kernel:>10s} {eager:>10s}"
            print(line, flush=True)
            if name in slow:
                progress.step()
                print(f"{progress.prefix()}{name}.{op}: {result} eager {eager}", file=sys.stderr, flush=True)
    print(f"(n/a: cannot serve here, see `{args.prog} info`; *: could not be captured in a CUDA graph, "
          "timed with events)")
    if checked == 0:
        print(f"\nNOTHING CHECKED: {' or '.join(names)} cannot serve n={args.n}, H={args.H}, {args.dtype} on {dev}")
        return 1
    if failed:
        print("\nDISAGREES WITH THE REFERENCE:\n  " + "\n  ".join(failed))
        return 1
    return 0


def _interpreted_backends(names: list[str]) -> list[str]:
    """The backends of ``names`` that run in an interpreter here (Triton under TRITON_INTERPRET=1)."""
    return [n for n in names if n == "triton" and os.environ.get("TRITON_INTERPRET") == "1"]


def cmd_aot(args) -> int:
    mod = importlib.import_module(f"mhc.backends.{args.backend}.aot")
    return int(mod.main(args.archs))


# --- argument checks: a user error is one line and exit status 2, as argparse's own ----------------


def _int_in(lo: int, hi: int, what: str):
    """An argparse ``type``: an int in [lo, hi], else an error that gives the bound."""

    def parse(text: str) -> int:
        shown = text if len(text) <= 24 else text[:20] + "..."
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{shown!r} is not an integer ({what}, in [{lo}, {hi}])") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"must be in [{lo}, {hi}] ({what}), got {shown}")
        return value

    return parse


def _device_error(spec: str) -> str | None:
    """Why ``check --device spec`` cannot run here, or None."""
    try:
        dev = torch.device(spec)
    except (RuntimeError, ValueError) as e:
        return f"--device {spec!r} is not a torch device ({str(e).splitlines()[0]})"
    if dev.type == "cpu":
        return None
    if dev.type == "meta":
        return "--device meta: meta tensors hold no values to compare; use cpu or cuda[:index]"
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            cpu_only = torch.version.cuda is None and not torch.version.hip
            why = "CPU-only build" if cpu_only else "no device found"
            return f"--device {spec}: no GPU is visible to this torch build ({why})"
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            return f"--device {spec}: only {torch.cuda.device_count()} GPU(s) visible (cuda:0 ...)"
        return None
    mod = getattr(torch, dev.type, None)
    if mod is None or not getattr(mod, "is_available", lambda: False)():
        return f"--device {spec}: no {dev.type} device is available here; use cpu or cuda[:index]"
    return None


def _env_error() -> str | None:
    """Why ``MHC_BACKEND`` is unusable (malformed, or an unknown name), or None."""
    try:
        for name in registry.parse_spec(os.environ.get(registry.ENV_VAR)).values():
            if name != "auto":
                registry.get(name)
    except ValueError as e:
        return str(e)
    except registry.BackendError:  # a known but broken backend: `info` shows why
        pass
    return None


def _arch_error(backend: str, archs: list[str]) -> str | None:
    """Why ``aot --backend backend --arch ...`` names an architecture it cannot build for, or None."""
    if not archs:
        return "--arch names no architecture"
    try:
        mod = importlib.import_module(f"mhc.backends.{backend}.aot")
    except registry.CAUGHT:  # the library itself missing or broken: the build reports it
        return None
    if backend == "triton":
        unknown = [a for a in archs if a not in mod.ARCHS]
        if unknown:
            return f"--arch {','.join(unknown)}: triton builds for {', '.join(mod.ARCHS)}"
        return None
    for a in archs:
        try:
            mod._arch(a)
        except ValueError as e:
            return f"--arch: {e}"
        except registry.CAUGHT:  # tilelang itself missing or broken: the build reports it
            return None
    return None


def _check_args(p: argparse.ArgumentParser, args) -> None:
    """``p.error`` (usage, one line, exit 2) for the first argument that cannot work (each size and
    count was bounded by its ``type`` already)."""
    if args.cmd == "aot":
        args.archs = [a.strip() for a in args.arch.split(",") if a.strip()]
        why = _arch_error(args.backend, args.archs)
        if why:
            p.error(why)
        return
    why = _env_error()
    if why:
        p.error(why)
    if args.cmd != "check":
        return
    if args.T * args.n * args.H > MAX_ELEMENTS:
        p.error(f"--T {args.T} x --n {args.n} x --H {args.H} is {args.T * args.n * args.H} residual elements; "
                f"check allows {MAX_ELEMENTS} (2**28): it draws its inputs and runs the reference in fp64 on the host")
    if args.backend is not None and args.backend not in registry.backend_names():
        p.error(f"--backend {args.backend!r} is not a backend; known: {', '.join(registry.backend_names())}")
    why = args.device and _device_error(args.device)
    if why:
        p.error(why)


# --- the parsers -----------------------------------------------------------------------------------


def _prog() -> str:
    """The program's name as invoked, for the usage lines: mhc (the installed command) or python -m mhc."""
    name = pathlib.Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    return "mhc" if name in ("mhc", "mhc.exe", "mhc-script.py") else "python -m mhc"


_HELPS = {"info": "versions, the device, and every backend: can it serve here, and why not",
          "check": "each backend x op against the fp64 reference (error, kernel and eager µs); exit 1 on a disagreement",
          "aot": "compile the GPU kernels ahead of time, with no GPU"}


def _problem_options(p: argparse.ArgumentParser, check: bool) -> None:
    p.add_argument("--n", type=_int_in(1, validation.MAX_N, "the stream count"), default=4,
                   help=f"streams per token, 1..{validation.MAX_N} (default: %(default)s)")
    p.add_argument("--H", type=_int_in(1, MAX_H, "the hidden size"), default=512,
                   help=f"hidden size, 1..{MAX_H} (default: %(default)s)")
    p.add_argument("--T", type=_int_in(1, MAX_T, "tokens"), default=64,
                   help=f"tokens, 1..{MAX_T} (default: %(default)s)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                   help="residual dtype (default: %(default)s)")
    if not check:
        return
    p.add_argument("--backend", help="check only this backend (default: every backend)")
    p.add_argument("--device", help="e.g. cpu, cuda:1 (default: the best device)")
    p.add_argument("--reps", type=_int_in(1, MAX_REPS, "calls per round"), default=200,
                   help=f"back-to-back calls per round of the eager timing, 1..{MAX_REPS} (default: %(default)s)")
    p.add_argument("--seed", type=_int_in(0, MAX_SEED, "the seed"), default=0,
                   help="seed of the random inputs (default: %(default)s)")


def _parsers(prog: str) -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The top-level parser and ``{subcommand: its parser, "": the main job's}``."""
    ap = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", metavar="{info,check,aot}")
    parsers = {}
    for name in ("info", "check"):
        parsers[name] = sub.add_parser(name, help=_HELPS[name], description=_HELPS[name])
        _problem_options(parsers[name], check=name == "check")
    pa = parsers["aot"] = sub.add_parser("aot", help=_HELPS["aot"], description=_HELPS["aot"])
    pa.add_argument("--backend", required=True, choices=["triton", "tilelang"], help="whose kernels")
    pa.add_argument("--arch", required=True, help="comma list: sm90, gfx942, gfx950 (tilelang: sm90, sm_90a, ...)")
    # The main job (no subcommand): info, then check, with check's options under the program's name.
    job = parsers[""] = argparse.ArgumentParser(
        prog=prog, description=f"info, then check (see {prog} --help for the subcommands)")
    _problem_options(job, check=True)
    return ap, parsers


def _parse(argv: list[str], prog: str) -> tuple[argparse.Namespace, argparse.ArgumentParser]:
    """The arguments, and the parser whose usage an error in them prints."""
    ap, parsers = _parsers(prog)
    if argv[:1] == ["bench"]:  # the subcommand that ran the harness before it left the package
        ap.error("the benchmarks are not part of the installed package: run python benchmarks/bench.py "
                 "in a checkout of the repository (benchmarks/README.md)")
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        args = parsers[""].parse_args(argv)
        args.cmd = "check"
        args.main_job = True
        return args, parsers[""]
    # An unknown subcommand is argparse's "invalid choice" here; an option that the subcommand
    # does not know is reported with the subcommand's usage, not the top level's.
    args, extra = ap.parse_known_args(argv)
    if args.cmd is None:
        ap.error("no subcommand")
    p = parsers[args.cmd]
    if extra:
        p.error(f"unrecognized arguments: {' '.join(extra)}")
    args.main_job = False
    return args, p


# --- output errors: as a Unix tool's -------------------------------------------------------------


class _WriteError(Exception):
    """Writing standard output failed (``cause``: the OSError)."""

    def __init__(self, cause: OSError) -> None:
        super().__init__(cause)
        self.cause = cause


class _Stdout:
    """``sys.stdout`` while :func:`main` runs: an OSError from writing it becomes :class:`_WriteError`,
    so that it is told apart from any other OSError."""

    def __init__(self, stream) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except OSError as e:
            raise _WriteError(e) from e

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError as e:
            raise _WriteError(e) from e

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def _drop_stdout(stream) -> None:
    """Point ``stream``'s file descriptor at /dev/null, so that the interpreter's flush of what is
    still buffered at exit fails no more (the Python docs' recipe for SIGPIPE)."""
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):  # not a real file (a test's capture)
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


def main(argv: list[str] | None = None) -> int:
    prog = _prog()
    argv = sys.argv[1:] if argv is None else list(argv)
    real = sys.stdout
    if real is not None:  # None: no console (pythonw), where print() writes nothing
        sys.stdout = _Stdout(real)
    try:
        try:
            args, p = _parse(argv, prog)
            args.prog = prog
            _check_args(p, args)
            if args.main_job:
                rc = cmd_info(args) or cmd_check(args)
            else:
                rc = {"info": cmd_info, "check": cmd_check, "aot": cmd_aot}[args.cmd](args)
            return rc
        finally:  # also after --help and argument errors (SystemExit): their text is written too
            try:
                if real is not None:
                    sys.stdout.flush()
            finally:
                sys.stdout = real
    except _WriteError as e:
        _drop_stdout(real)
        if isinstance(e.cause, BrokenPipeError):  # the reader stopped reading: quietly, as SIGPIPE would
            return 128 + getattr(signal, "SIGPIPE", 13)
        print(f"{prog}: error writing the output: {e.cause.strerror or e.cause}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
