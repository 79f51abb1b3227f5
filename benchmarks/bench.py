"""The benchmark harness: ``python benchmarks/bench.py`` from a checkout (``--help``). It is not
part of the installed package; it takes the floor and the timers from :mod:`mhc.timing`, and the
inputs, the fp64 oracle and the output check from :mod:`mhc.checking`.

The grid: op x implementation x T x H at n = 4, bf16 (default T in {1, 8, 64, 512, 4096, 16384},
H in {4096, 7168}). Implementations are every registered mhc backend that can serve on the
device (``torch`` is left out unless named: it *is* the eager peer, behind the op layer) and the
peers, in the same run:

``eager``
    :mod:`mhc.reference` called directly (the math in plain PyTorch).
``compile``
    ``torch.compile(mhc.reference.<op>, fullgraph=True)`` with the default inductor backend, one
    compiled function per (op, H), Dynamo's recompile limits raised and T marked dynamic for
    T >= 2 (T = 1 gets its own specialised graph), so no shape falls back to eager: a graph break
    or a hit recompile limit raises instead (``fullgraph=True``, ``fail_on_recompile_limit_hit``).
    Inductor's ``emulate_precision_casts`` keeps the reference's bf16 roundings inside fused
    kernels (without it, fused_post_pre's comb_mix misses the 1e-3 tolerance).
``tile-kernels``
    DeepSeek's TileLang kernels, when ``tile_kernels`` imports. ``post`` is its
    ``mhc_post_fwd``. It ships no prenorm GEMM (that lives in DeepGEMM), so ``pre`` is a cuBLAS
    fp32 GEMM on the upcast residual (``xf @ fn.T`` and ``sum(xf**2)``, one split) followed by
    ``mhc_pre_big_fuse_fwd``; ``head`` is that GEMM, ``mhc_reduce_partials_and_rmsnorm_fwd``,
    ``mhc_head_compute_mix_fwd`` and ``mhc_pre_apply_mix_fwd``; ``fused_post_pre`` is its post
    followed by its pre (it has no fused kernel). Why it cannot run is printed, never hidden.

Per row: warm µs (``triton.testing.do_bench_cudagraph``, median of CUDA-graph replays, inputs
left in L2 where they fit), cold µs (``triton.testing.do_bench``, median, L2 flushed before
each call, launch overhead included), achieved GB/s (the floor's bytes over the time) and the
ratio to the floor. The floor is :func:`mhc.timing.floor_bytes` over the copy bandwidth measured at the
start of the same run (the better of ``torch.Tensor.copy_`` and a vectorised Triton copy, bytes
read plus bytes written). On CPU both timings are ``time.perf_counter`` medians (a smoke test
of the harness, not a measurement).

Before timing, every (op, implementation, H, T) is checked once against the fp64 oracle of
:mod:`mhc.checking`: outputs allocated through ``mhc.backends.empty`` are poisoned with NaN and
must come back finite everywhere, and the oracle is evaluated on a sample of token rows (all of
them up to 64 tokens; every op is row-independent, so the sample's rows are compared exactly).
A failure is printed with ``!!`` in the row, listed at the end, and makes the exit status 1.

Outputs (``--out``, default ``mhc-bench/`` in the current directory, which this repository's
``.gitignore`` lists; results to keep go to ``--out benchmarks/results``): ``<prefix>.csv`` (rewritten after every
row, so a run cut short keeps what it measured), ``<prefix>-latency.png`` (µs vs T per op and
H), ``<prefix>-floor.png`` (fraction of the floor vs T) and ``<prefix>.md`` (the grid table, as under `benchmarks/results/grid-*.md`).
``--report CSV`` rebuilds the table and plots from a CSV without a device.

``--overhead``: host-side cost of one op call on CPU tensors, for the dispatch layers that sit
above a kernel (torch.library dispatch, validation, backend selection, autograd recording),
measured with a backend whose kernels return preallocated outputs, next to
``torch.library.custom_op`` doing the same, and the Triton launchers (plan lookup, allocations,
specialisation keys) with their launches stubbed. This is the number that matters at decode
sizes, where the kernels themselves take a few µs; CI prints it, so a regression shows in its log.

``--eager`` adds the eager µs per call (:func:`mhc.timing.eager_us`: 200 back-to-back calls synchronised
once, median of 5 rounds) of every implementation, and of the mhc backends and the eager peer
with inputs requiring grad: on a GPU, next to the graph replay µs (the kernels' time), it is
what a model run without CUDA graphs pays, host overhead included. Before each eager cell it
times a host yardstick (a one-element ``torch.add``: :func:`host_yardstick_us`), kept in the CSV
and summarised under the eager table.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import datetime
import functools
import math
import os
import pathlib
import platform
import sys
import tempfile
import time
import types
from collections.abc import Callable, Sequence

import torch

from mhc.checking import (Check, check_outputs, device_inputs, nan_empty, poisoned_outputs, reference_rows, sample_rows,
                          token_args)
from mhc.progress import Progress
from mhc.registry import OPS
from mhc.timing import _sync, eager_us, floor_bytes, host_us, time_cold, time_warm

GRID_T = (1, 8, 64, 512, 4096, 16384)
GRID_H = (4096, 7168)
# --quick: the decode, prefill-chunk and large-batch regimes at one width; the H100 run of the
# whole quick grid stays under 3 minutes including the compiles of the peers.
QUICK_T = (1, 64, 4096)
QUICK_H = (4096,)
# --device cpu: tiny sizes, a smoke test of the harness's code paths.
CPU_T = (1, 8)
CPU_H = (256,)
PEERS = ("eager", "compile", "tile-kernels")
#: Where results go without ``--out``: a folder of the current directory (never the package's own
#: tree), git-ignored in this repository.
DEFAULT_OUT = "mhc-bench"
CSV_FIELDS = ("date", "device", "op", "impl", "kind", "n", "H", "T", "dtype", "floor_bytes", "copy_GBps",
              "floor_us", "warm_us", "cold_us", "warm_GBps", "cold_GBps", "warm_ratio", "cold_ratio", "check",
              "max_rel_err", "warm_timer", "note", "eager_us", "eager_grad_us", "host_yardstick_us")



# --------------------------------------------------------------------------------------------
# Implementations: mhc backends and peers
# --------------------------------------------------------------------------------------------

Runner = Callable[[bool], tuple]  # runner(poison) -> the op's outputs as a tuple


def _as_tuple(out) -> tuple:
    return out if isinstance(out, tuple) else (out,)


@dataclasses.dataclass
class Impl:
    """One implementation under test. ``reasons(op, device, dtype, n, H, T)`` says why it cannot
    serve (empty: it can); ``prepare(op, args, kwargs)`` returns a :data:`Runner`."""

    name: str
    kind: str  # "backend" or "peer"
    reasons: Callable[..., list[str]]
    prepare: Callable[[str, tuple, dict], Runner]
    note: str = ""


def backend_impl(name: str) -> Impl:
    """An mhc backend called through the public API (``mhc.<op>(..., backend=name)``)."""
    import mhc
    from mhc import registry

    def reasons(op, device, dtype, n, H, T):
        try:
            return registry.reasons_for(name, registry.Problem(op, device, dtype, n, H, T))
        except registry.BackendError as e:
            return [str(e)]

    def prepare(op, args, kwargs):
        f = getattr(mhc, op)

        def run(poison=False):
            with poisoned_outputs() if poison else contextlib.nullcontext():
                return _as_tuple(f(*args, **kwargs, backend=name))

        return run

    return Impl(name, "backend", reasons, prepare)


def eager_impl() -> Impl:
    """The reference math in eager PyTorch."""
    from mhc import reference

    def prepare(op, args, kwargs):
        f = getattr(reference, op)
        return lambda poison=False: _as_tuple(f(*args, **kwargs))

    return Impl("eager", "peer", lambda *a: [], prepare, "mhc.reference, eager")


def _raise_dynamo_limits() -> dict[str, object]:
    """Raise Dynamo's recompile limits (their names changed across torch releases) and make a
    hit limit an error instead of a silent fall back to eager. Returns what was set."""
    import torch._dynamo.config as cfg

    wanted = {"cache_size_limit": 1024, "recompile_limit": 1024, "accumulated_cache_size_limit": 1 << 16,
              "accumulated_recompile_limit": 1 << 16, "fail_on_recompile_limit_hit": True}
    done = {}
    for key, value in wanted.items():
        if hasattr(cfg, key):
            setattr(cfg, key, value)
            done[key] = value
    return done


def compile_impl(backend: str = "inductor") -> Impl:
    """``torch.compile`` of the reference: one compiled function per (op, H) with T dynamic.

    T >= 2 is marked dynamic on every token-sized input (``mark_dynamic`` raises if the graph
    would specialise it); T = 1 is specialised by Dynamo and compiles once more. ``fullgraph``
    makes any graph break an error. Compile time is spent in the first (checking) call.
    """
    from mhc import reference

    limits = _raise_dynamo_limits()
    # Inductor drops the bf16 rounding between fused ops unless told to keep it; fused_post_pre's
    # pre must read the *stored* (rounded) new residual, and without the rounding its comb_mix
    # misses the 1e-3 tolerance (1.5e-3 to 1.8e-3 seen on the H100). A fair peer computes the
    # reference's function. Passed per compile, so no global config changes.
    options = {"emulate_precision_casts": True} if backend == "inductor" else None
    compiled: dict[tuple, Callable] = {}  # (op, n, H) -> compiled reference

    def prepare(op, args, kwargs):
        k = token_args(op)
        n, H = args[1].shape[-2:] if op in ("post", "fused_post_pre") else args[0].shape[-2:]
        key = (op, n, H)
        if key not in compiled:
            compiled[key] = torch.compile(getattr(reference, op), fullgraph=True, backend=backend, options=options)
        f = compiled[key]
        if args[0].shape[0] >= 2:
            for t in args[:k]:
                torch._dynamo.mark_dynamic(t, 0)
        return lambda poison=False: _as_tuple(f(*args, **kwargs))

    note = (f"torch.compile(fullgraph=True, backend={backend!r}, options={options}), T dynamic; "
            + ", ".join(f"{k}={v}" for k, v in limits.items()))
    return Impl("compile", "peer", lambda *a: [], prepare, note)


def tile_kernels_impl() -> Impl:
    """DeepSeek's tile-kernels (``tile_kernels.mhc``), imported on first use; see the module
    docstring for how each op is composed from its kernels."""
    state: dict[str, object] = {}

    def module():
        if "mod" not in state:
            try:
                import tile_kernels.mhc as tkm

                state["mod"] = tkm
            except Exception as e:  # a missing or broken install is a reason, not a crash
                state["mod"] = None
                state["why"] = f"tile_kernels does not import ({type(e).__name__}: {str(e)[:200]})"
        return state["mod"]

    def reasons(op, device, dtype, n, H, T):
        if device.type != "cuda" or torch.version.hip:
            return [f"runs on NVIDIA GPUs only (inputs on {device})"]
        if module() is None:
            return [str(state["why"])]
        out = []
        if dtype != torch.bfloat16:
            out.append(f"bf16 only (got {dtype})")
        if H % 128:
            out.append(f"H={H} is not a multiple of 128 (mhc_post_fwd's hidden block)")
        return out

    def alloc(shape, dtype, device, poison):
        return nan_empty(shape, dtype, device) if poison else torch.empty(shape, dtype=dtype, device=device)

    def gemm(residual, fn):
        # The prenorm GEMM that tile-kernels leaves to DeepGEMM: fp32 on the upcast residual,
        # as one split (n_splits = 1), plus the sum of squares.
        T, n, H = residual.shape
        xf = residual.view(T, n * H).float()
        return (xf @ fn.T).unsqueeze(0), xf.square().sum(-1).unsqueeze(0)

    def pre(residual, fn, hc_scale, hc_base, kw, poison):
        tk = module()
        T, n, H = residual.shape
        mul, sq = gemm(residual, fn)
        post_mix = alloc((T, n), torch.float32, residual.device, poison)
        comb_mix = alloc((T, n * n), torch.float32, residual.device, poison)
        layer_input = alloc((T, H), residual.dtype, residual.device, poison)
        tk.mhc_pre_big_fuse_fwd(mul, sq, hc_scale, hc_base, residual, post_mix, comb_mix, layer_input,
                                kw["rms_eps"], kw["hc_pre_eps"], kw["hc_sinkhorn_eps"],
                                kw["hc_post_mult_value"], kw["sinkhorn_repeat"], n_splits=1)
        return post_mix.view(T, n, 1), comb_mix.view(T, n, n), layer_input

    def post(x, residual, post_mix, comb_mix, poison):
        tk = module()
        T, n, H = residual.shape
        out = alloc((1, T, n, H), residual.dtype, residual.device, poison)
        tk.mhc_post_fwd(x.view(1, T, H), residual.view(1, T, n, H), post_mix.view(1, T, n, 1),
                        comb_mix.view(1, T, n, n), out=out)
        return out.view(T, n, H)

    def head(residual, fn, hc_scale, hc_base, kw, poison):
        tk = module()
        T, n, H = residual.shape
        mul, sq = gemm(residual, fn)
        dev = residual.device
        out_mul, sqrsum = torch.empty(T, 1, n, device=dev), torch.empty(T, 1, device=dev)
        mixes, weights = torch.empty(T, n, device=dev), torch.empty(T, n, device=dev)
        tk.mhc_reduce_partials_and_rmsnorm_fwd(mul.view(1, T, 1, n), sq.view(1, T, 1), out_mul, sqrsum, mixes,
                                               n * H, kw["rms_eps"], 1)
        tk.mhc_head_compute_mix_fwd(mixes, hc_scale, hc_base, weights, kw["hc_eps"])
        out = alloc((T, H), residual.dtype, dev, poison)
        tk.mhc_pre_apply_mix_fwd(residual, weights, out)
        return out

    def prepare(op, args, kwargs):
        if op == "pre":
            return lambda poison=False: pre(*args, kwargs, poison)
        if op == "head":
            return lambda poison=False: (head(*args, kwargs, poison),)
        if op == "post":
            return lambda poison=False: (post(*args, poison),)

        def fused(poison=False):
            new = post(*args[:4], poison)
            return (new, *pre(new, *args[4:], kwargs, poison))

        return fused

    note = ("tile-kernels 2.x: post = mhc_post_fwd; pre = fp32 cuBLAS GEMM + mhc_pre_big_fuse_fwd; head = GEMM + "
            "reduce_partials_and_rmsnorm + head_compute_mix + pre_apply_mix; fused = its post then its pre")
    return Impl("tile-kernels", "peer", reasons, prepare, note)


def implementations(names: Sequence[str] | None, compile_backend: str, log) -> list[Impl]:
    """The implementations to run: ``names`` (backend or peer names), or by default every
    registered backend except ``torch`` plus every peer. Unknown names raise ``ValueError``."""
    from mhc import registry

    backends = registry.backend_names()
    if names is None:
        log("backend torch: left out by default (it is the eager peer behind the op layer); "
            "add it with --impls")
        names = [b for b in backends if b != "torch"] + list(PEERS)
    out = []
    for name in names:
        if name == "eager":
            out.append(eager_impl())
        elif name == "compile":
            out.append(compile_impl(compile_backend))
        elif name == "tile-kernels":
            out.append(tile_kernels_impl())
        elif name in backends:
            out.append(backend_impl(name))
        else:
            raise ValueError(f"unknown implementation {name!r}: backends {', '.join(backends)}; "
                             f"peers {', '.join(PEERS)}")
    return out


def requiring_grad(args: tuple) -> tuple:
    """``args`` with every floating-point tensor a leaf that requires grad (fresh, the same values):
    timing a call with autograd recording."""
    return tuple(a.detach().clone().requires_grad_(True) if isinstance(a, torch.Tensor) and a.is_floating_point()
                 else a for a in args)


#: The implementations whose eager time with autograd recording is measured (``--eager``): the mhc
#: backends and the eager reference. The compiled and tile-kernels peers record no backward.
_GRAD_PEERS = ("eager",)


def _triton_copy_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def copy_kernel(src, dst, numel, BLOCK: tl.constexpr):
        # int32 elements, 16 per thread at 8 warps: four 16-byte loads and stores in flight.
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        tl.store(dst + offs, tl.load(src + offs, mask=mask), mask=mask)

    return copy_kernel


def copy_bandwidth(device: torch.device, nbytes: int, rep_ms: int) -> tuple[float, dict[str, str]]:
    """The device's copy bandwidth in GB/s (bytes read + bytes written over the median time of
    a ``nbytes`` copy): the better of ``torch.Tensor.copy_`` and a vectorised Triton copy.
    Returns ``(GB/s, {method: GB/s or why it did not run})``."""
    numel = nbytes // 4
    src = torch.randn(numel, device=device).view(torch.int32)
    dst = torch.empty_like(src)
    found: dict[str, float] = {}
    notes: dict[str, str] = {}
    found["torch copy_"] = 2 * nbytes / (time_cold(lambda: dst.copy_(src), device, rep_ms) * 1e-6) / 1e9
    if device.type == "cuda":
        try:
            kern = _triton_copy_kernel()
            block = 4096
            grid = (-(-numel // block),)  # ceil(numel / block) programs

            def run():
                kern[grid](src, dst, numel, BLOCK=block, num_warps=8, enable_fp_fusion=True)

            with torch.cuda.device(device):
                run()
                torch.cuda.synchronize(device)
                if not torch.equal(src, dst):
                    raise RuntimeError("the Triton copy kernel copied wrong bytes")
            found["triton copy"] = 2 * nbytes / (time_cold(run, device, rep_ms) * 1e-6) / 1e9
        except Exception as e:
            notes["triton copy"] = f"did not run ({type(e).__name__}: {str(e)[:120]})"
    else:
        notes["triton copy"] = "not run on cpu (a GPU kernel)"
    notes.update({k: f"{v:.0f} GB/s" for k, v in found.items()})
    return max(found.values()), notes


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------

def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()})"


def _write_csv(path: pathlib.Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)


def _fmt_row(r: dict) -> str:
    if r["warm_us"] == "":
        return (f"{r['op']:15s} {r['impl']:12s} H={r['H']:<5} T={r['T']:<6} !! {r['check']}")
    flag = "ok" if r["check"] == "ok" else f"!! FAIL {r['check']}"
    # No GB/s or floor ratio on CPU: the floor is a GPU's memory bound (the fields are empty there).
    rate = (f"{float(r['warm_GBps']):7.0f} GB/s {float(r['warm_ratio']):6.2f}x floor  " if r["warm_ratio"] else "")
    eager = ""
    if r.get("eager_us"):
        eager = f"eager {_num(r['eager_us']):8.1f} us " + (
            f"(grad {_num(r['eager_grad_us']):8.1f} us) " if r.get("eager_grad_us") else "")
    return (f"{r['op']:15s} {r['impl']:12s} H={r['H']:<5} T={r['T']:<6} warm {float(r['warm_us']):9.1f} us "
            f"cold {_num(r['cold_us']):9.1f} us {eager}{rate}{flag}")


def host_yardstick_us(device: torch.device) -> float:
    """The host's speed at this moment: host µs per call of a one-element ``torch.add`` on
    ``device`` (best of 3 rounds of 1000 calls, :func:`host_us`). The eager cells are host time at
    small T, and the machine's host speed moves between runs and within one (by up to a half on
    the H200 machine: benchmarks/results/eager-repeats-h200.md); ``--eager`` records this next to
    each eager cell so that a table carries its own measure of the host."""
    x = torch.ones(1, device=device)
    return host_us(lambda: torch.add(x, 1.0), 1000, 3, warmup=50)


def run(ops: Sequence[str], impls: list[Impl], Ts: Sequence[int], Hs: Sequence[int], n: int,
        device: torch.device, dtype: torch.dtype, out_csv: pathlib.Path, rep_ms: int, cold: bool,
        seed: int, copy_bytes: int, log, eager: bool = False) -> tuple[list[dict], list[str], list[str]]:
    """Check and time every (H, T, op, impl); returns ``(rows, failures, skipped)``. ``eager``:
    also the eager µs per call (:func:`eager_us`), without and (backends and the eager peer)
    with inputs requiring grad."""
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    dev_name = device_name(device)
    bw, bw_notes = copy_bandwidth(device, copy_bytes, rep_ms=max(rep_ms, 50))
    log(f"copy bandwidth on {dev_name}: {bw:.0f} GB/s (best of: "
        + ", ".join(f"{k} {v}" for k, v in bw_notes.items()) + ")")
    for impl in impls:
        if impl.note:
            log(f"{impl.name}: {impl.note}")
    rows: list[dict] = []
    failures: list[str] = []
    skipped: dict[str, None] = {}  # insertion-ordered set of "impl op: reason" lines
    # The floor (bytes over the copy bandwidth) bounds a GPU kernel; a CPU run is a smoke test of
    # the harness, whose GB/s and floor ratios would mean nothing: they are left empty there.
    rated = device.type == "cuda"
    progress = Progress(len(Hs) * len(Ts) * len(ops) * len(impls))
    for H in Hs:
        for T in Ts:
            for op in ops:
                args, kwargs = device_inputs(op, T, n, H, device, seed=seed, dtype=dtype)
                rows_idx = sample_rows(T, device, seed=seed)
                refs = reference_rows(op, args, kwargs, rows_idx)
                fb = floor_bytes(op, T, n, H, act_bytes=torch.finfo(dtype).bits // 8)
                floor_us = fb / (bw * 1e9) * 1e6
                for impl in impls:
                    progress.step()
                    why = impl.reasons(op, device, dtype, n, H, T)
                    if why:
                        line = f"{impl.name} {op}: cannot run: " + "; ".join(why)
                        if line not in skipped:
                            skipped[line] = None
                            log("skip " + line)
                        continue
                    row = dict(date=date, device=dev_name, op=op, impl=impl.name, kind=impl.kind, n=n, H=H, T=T,
                               dtype=str(dtype).replace("torch.", ""), floor_bytes=fb, copy_GBps=f"{bw:.1f}",
                               floor_us=f"{floor_us:.3f}" if rated else "", warm_us="", cold_us="", warm_GBps="", cold_GBps="",
                               warm_ratio="", cold_ratio="", check="", max_rel_err="", warm_timer="", note="",
                               eager_us="", eager_grad_us="")
                    t0 = time.perf_counter()
                    try:
                        runner = impl.prepare(op, args, kwargs)
                        outs = runner(True)
                        _sync(device)
                        chk = check_outputs(op, outs, refs, rows_idx, dtype)
                        del outs
                    except Exception as e:
                        chk = Check(False, f"raised {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}",
                                    math.inf)
                        runner = None
                    first_s = time.perf_counter() - t0
                    row["check"], row["max_rel_err"] = chk.text, f"{chk.max_err:.3e}"
                    if first_s > 5:
                        row["note"] = f"first call {first_s:.0f} s (compile)"
                    if not chk.ok:
                        failures.append(f"{op} {impl.name} H={H} T={T}: {chk.text}")
                    if runner is not None:
                        fn = functools.partial(runner, False)
                        try:
                            warm, timer = time_warm(fn, device, rep_ms)
                            row["warm_us"], row["warm_timer"] = f"{warm:.3f}", timer
                            if rated:
                                row["warm_GBps"] = f"{fb / (warm * 1e-6) / 1e9:.1f}"
                                row["warm_ratio"] = f"{warm / floor_us:.3f}"
                            if cold:
                                c = time_cold(fn, device, rep_ms)
                                row["cold_us"] = f"{c:.3f}"
                                if rated:
                                    row["cold_GBps"] = f"{fb / (c * 1e-6) / 1e9:.1f}"
                                    row["cold_ratio"] = f"{c / floor_us:.3f}"
                            if eager:
                                row["host_yardstick_us"] = f"{host_yardstick_us(device):.2f}"
                                row["eager_us"] = f"{eager_us(fn, device):.3f}"
                                if impl.kind == "backend" or impl.name in _GRAD_PEERS:
                                    g = functools.partial(impl.prepare(op, requiring_grad(args), kwargs), False)
                                    row["eager_grad_us"] = f"{eager_us(g, device):.3f}"
                        except Exception as e:
                            row["note"] = f"timing failed: {type(e).__name__}: {str(e)[:160]}"
                            failures.append(f"{op} {impl.name} H={H} T={T}: timing failed ({type(e).__name__})")
                    if row["warm_us"] == "" and chk.ok:
                        row["check"] = "ok (" + row["note"] + ")"
                    if row["warm_us"] != "" and not row["cold_us"]:
                        row["cold_us"] = "nan"
                        if rated:
                            row["cold_GBps"] = row["cold_ratio"] = "nan"
                    rows.append(row)
                    _write_csv(out_csv, rows)
                    log(progress.prefix() + _fmt_row(row))
                del args, kwargs, refs
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    return rows, failures, list(skipped)


# --------------------------------------------------------------------------------------------
# Reports: the markdown table and the plots
# --------------------------------------------------------------------------------------------

def read_csv(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _impl_order(rows: list[dict]) -> list[str]:
    seen = list(dict.fromkeys(r["impl"] for r in rows))
    backends = [i for i in seen if i not in PEERS]
    return backends + [p for p in PEERS if p in seen]


def _num(s) -> float:
    try:
        return float(s)
    except (TypeError, ValueError):
        return math.nan


def markdown(rows: list[dict], skipped: Sequence[str] = ()) -> str:
    """The grid table (`benchmarks/results/grid-*.md`): per op, one row per (H, T), one column per implementation, each cell
    ``warm µs · achieved GB/s · ratio to floor`` (``!!`` marks a failed check)."""
    if not rows:
        return "(no rows)\n"
    impls = _impl_order(rows)
    r0 = rows[0]
    lines = [f"Run of {r0['date']} on **{r0['device']}**, n = {r0['n']}, {r0['dtype']}. Copy bandwidth "
             f"{float(r0['copy_GBps']):.0f} GB/s (bytes read + written, measured in the same run). Cells: warm "
             + ("µs (median of CUDA-graph replays)" if r0["warm_timer"] != "perf_counter" else
                "µs (perf_counter median: a CPU smoke run, not a measurement)")
             + " · achieved GB/s (floor bytes / time) · × floor. Cold (L2 flushed) numbers are in the CSV.", ""]
    by = {(r["op"], int(r["H"]), int(r["T"]), r["impl"]): r for r in rows}
    for op in OPS:
        keys = sorted({(H, T) for (o, H, T, _) in by if o == op})
        if not keys:
            continue
        lines += [f"**{op}**", "", "| H | T | floor µs | " + " | ".join(impls) + " |",
                  "|---:|---:|---:|" + "---:|" * len(impls)]
        for H, T in keys:
            cells = []
            for impl in impls:
                r = by.get((op, H, T, impl))
                if r is None:
                    cells.append("—")
                elif r["warm_us"] in ("", "nan"):
                    cells.append("!! " + r["check"][:40])
                else:
                    bad = "" if r["check"] == "ok" else " !!FAIL"
                    rate = (f" · {_num(r['warm_GBps']):.0f} · {_num(r['warm_ratio']):.2f}×" if r["warm_ratio"]
                            else "")
                    cells.append(f"{_num(r['warm_us']):.1f}{rate}{bad}")
            floor = _num(by[next(k for k in by if k[:3] == (op, H, T))]["floor_us"])
            lines.append(f"| {H} | {T} | {'—' if math.isnan(floor) else f'{floor:.1f}'} | " + " | ".join(cells) + " |")
        lines.append("")
    if any(r.get("eager_us") for r in rows):
        lines += ["**Eager µs per call** (200 back-to-back calls synchronised once, median of 5 rounds; "
                  "host and device together) next to the graph replay µs above: `graph / eager / eager with "
                  "inputs requiring grad`", "", "| op | H | T | " + " | ".join(impls) + " |",
                  "|---|---:|---:|" + "---:|" * len(impls)]
        for op in OPS:
            for H, T in sorted({(H, T) for (o, H, T, _) in by if o == op}):
                cells = []
                for impl in impls:
                    r = by.get((op, H, T, impl))
                    if r is None or not r.get("eager_us"):
                        cells.append("—")
                        continue
                    grad = f" / {_num(r['eager_grad_us']):.1f}" if r.get("eager_grad_us") else ""
                    cells.append(f"{_num(r['warm_us']):.1f} / {_num(r['eager_us']):.1f}{grad}")
                lines.append(f"| {op} | {H} | {T} | " + " | ".join(cells) + " |")
        lines.append("")
        ys = sorted(_num(r["host_yardstick_us"]) for r in rows if r.get("host_yardstick_us"))
        if ys:
            lines += [f"Host yardstick (a one-element `torch.add` on the device, host µs per call, timed right "
                      f"before each eager cell; `host_yardstick_us` in the CSV): {ys[0]:.1f} to {ys[-1]:.1f} µs, "
                      f"median {ys[len(ys) // 2]:.1f}. The eager cells move with the host's speed.", ""]
    if skipped:
        lines += ["Not run:", ""] + [f"- {s}" for s in skipped] + [""]
    return "\n".join(lines)


def plots(rows: list[dict], prefix: pathlib.Path) -> list[str] | str:
    """``<prefix>-latency.png`` (warm µs vs T, floor dashed) and ``<prefix>-floor.png``
    (floor µs / warm µs vs T), one panel per (op, H). Returns the files written, or why none."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:
        return (f"no plots: matplotlib is not available ({type(e).__name__}: {e}); "
                "pip install 'mhc-kernels[bench]' (or matplotlib)")
    rows = [r for r in rows if _num(r["warm_us"]) == _num(r["warm_us"])]
    if not rows:
        return "no plots: no timed rows"
    impls = _impl_order(rows)
    ops = [op for op in OPS if any(r["op"] == op for r in rows)]
    Hs = sorted({int(r["H"]) for r in rows})
    written = []
    rated = any(not math.isnan(_num(r["floor_us"])) for r in rows)  # CPU runs have no floor
    for what in ("latency", "floor") if rated else ("latency",):
        fig, axes = plt.subplots(len(ops), len(Hs), figsize=(max(7.0, 5.5 * len(Hs)), 3.6 * len(ops)), squeeze=False)
        for i, op in enumerate(ops):
            for j, H in enumerate(Hs):
                ax = axes[i][j]
                sel = [r for r in rows if r["op"] == op and int(r["H"]) == H]
                for impl in impls:
                    pts = sorted((int(r["T"]), _num(r["warm_us"]), _num(r["floor_us"])) for r in sel
                                 if r["impl"] == impl)
                    if not pts:
                        continue
                    xs = [p[0] for p in pts]
                    ys = [p[1] if what == "latency" else p[2] / p[1] for p in pts]
                    ax.plot(xs, ys, marker="o", label=impl)
                if what == "latency":
                    fl = sorted({(int(r["T"]), _num(r["floor_us"])) for r in sel})
                    ax.plot([p[0] for p in fl], [p[1] for p in fl], "k--", label="floor")
                    ax.set_yscale("log")
                    ax.set_ylabel("µs (warm)")
                else:
                    # Warm runs of small T read their inputs from L2 and can beat the HBM floor.
                    top = max([1.0] + [(_num(r["floor_us"]) / _num(r["warm_us"])) for r in sel])
                    ax.set_ylim(0, 1.05 * top)
                    ax.axhline(1.0, color="k", ls="--", lw=0.8)
                    ax.set_ylabel("fraction of floor")
                ax.set_xscale("log", base=2)
                ax.set_xlabel("T (tokens)")
                ax.set_title(f"{op}, H={H}")
                ax.grid(True, which="both", alpha=0.3)
        axes[0][0].legend(fontsize=8)
        r0 = rows[0]
        fig.suptitle(f"mhc {what} — {r0['device']}, {r0['date']}, n={r0['n']}, {r0['dtype']}")
        fig.tight_layout()
        path = f"{prefix}-{what}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written


def report(rows: list[dict], prefix: pathlib.Path, skipped: Sequence[str], log) -> None:
    """Write ``<prefix>.md`` and the plots next to the CSV."""
    md = markdown(rows, skipped)
    pathlib.Path(f"{prefix}.md").write_text(md)
    log(f"wrote {prefix}.md")
    p = plots(rows, prefix)
    log(p if isinstance(p, str) else "wrote " + ", ".join(p))


def summary(rows: list[dict]) -> str:
    """A compact table for the end of the log: warm µs and × floor per (op, H, T) and impl."""
    impls = _impl_order(rows)
    rows = [{**r, "H": str(r["H"]), "T": str(r["T"])} for r in rows]  # live rows hold ints, CSV rows str
    by = {(r["op"], r["H"], r["T"], r["impl"]): r for r in rows}
    keys = list(dict.fromkeys((r["op"], r["H"], r["T"]) for r in rows))
    head = f"{'op':15s}{'H':>5s}{'T':>6s}{'floor':>8s} " + "".join(f"{i[:18]:>19s}" for i in impls)
    out = [head]
    for op, H, T in sorted(keys, key=lambda k: (OPS.index(k[0]), int(k[1]), int(k[2]))):
        cells = []
        for i in impls:
            r = by.get((op, H, T, i))
            if r is None or r["warm_us"] in ("", "nan"):
                cells.append(f"{'-' if r is None else '!!':>19s}")
            else:
                mark = "" if r["check"] == "ok" else "!"
                ratio = f"{_num(r['warm_ratio']):5.2f}x" if r["warm_ratio"] else " " * 6
                cells.append(f"{_num(r['warm_us']):9.1f}us {ratio}{mark:1s}")
        fl = _num(next(by[k] for k in by if k[:3] == (op, H, T))["floor_us"])
        out.append(f"{op:15s}{H:>5s}{T:>6s}{'-' if math.isnan(fl) else f'{fl:.1f}':>8s} " + "".join(cells))
    return "\n".join(out)


# --------------------------------------------------------------------------------------------
# Host overhead (--overhead)
# --------------------------------------------------------------------------------------------

def _best_us(fn, n: int = 2000, rounds: int = 7) -> float:
    return host_us(fn, n, rounds, warmup=200)


class _AnyKey(dict):
    """A handle table that serves one stand-in handle for every key (``--overhead``)."""

    def __init__(self, handle) -> None:
        super().__init__()
        self.handle = handle

    def get(self, key, default=None):
        return self.handle


def _stub_handle():
    """Stands in for a compiled kernel's handle: its launcher and ``h[grid](*args)`` do nothing."""
    from mhc.backends.triton import direct

    class Stub:
        def __getitem__(self, grid):
            return lambda *args, **kw: None

    return direct._Handle(Stub(), lambda *args: None, 0, (), 0, lambda device: 0)


def _triton_launch_paths(res: dict) -> None:
    """Host µs of the Triton launchers on CPU tensors with every kernel handle stubbed (Triton's
    C launcher, a few µs on a GPU host, not included): the plan lookup, the allocations, the
    specialisation key and addresses of each launch."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        res["triton launchers"] = "skipped: TRITON_INTERPRET=1 (the interpreter runs the kernels)"
        return
    try:
        from mhc.backends.triton import launch
    except Exception as e:  # no triton here: say so, it is not a failure of this report
        res["triton launchers"] = f"skipped: {type(e).__name__}: {e}"
        return
    from mhc import plans

    dev, n, H = torch.device("cpu"), 4, 64
    for op in OPS:
        for T in (1, 64, 512):
            if op == "post" and T == 64:
                continue
            args, kw = device_inputs(op, T, n, H, dev)
            p = launch.plan_for(op, n, H, T, args[0].dtype if op != "post" else args[1].dtype, dev)
            subs = (p.post, p) if isinstance(p, launch.TwoPassPlan) and p.post else (p,)
            for k in [getattr(q, name, None) for q in subs for name in ("kernel", "prep", "prenorm", "finalize")]:
                if isinstance(k, launch.DirectKernel):
                    k.handles = _AnyKey(_stub_handle())
            f = getattr(launch, op)
            vals = tuple(kw.values())
            res[f"triton launcher {op}, T={T} (launch stubbed)"] = _best_us(lambda: f(*args, *vals), n=500, rounds=5)
    plans.PLANS.clear("triton")  # the stubs must not serve a later call


def overhead() -> dict[str, float | str]:
    """Host µs per call (best of 7 rounds of 2000) of each dispatch layer, on CPU tensors: with
    a backend whose kernels return preallocated outputs (so only mhc's layers are timed), with
    and without an input requiring grad, and the Triton launchers with their launches stubbed."""
    import mhc
    from mhc import checking, registry

    inputs = {op: checking.make_inputs(op, (1,), 4, 64) for op in OPS}
    (x, r, pm, cm), _ = inputs["post"]
    out = torch.empty_like(r)
    outs = {"pre": (pm.clone(), cm.clone(), x.clone()), "post": out, "head": x.clone(),
            "fused_post_pre": (out, pm.clone(), cm.clone(), x.clone())}
    fake = types.SimpleNamespace(**{op: (lambda o: lambda *a: o)(outs[op]) for op in OPS})
    rec = registry.Backend("overhead_probe", None,
                           registry.Capabilities(frozenset({"cpu"}), frozenset({r.dtype})), load=lambda: fake)
    registry.register(rec, replace=True)
    lib = torch.library.Library("mhc_overhead", "FRAGMENT")
    try:
        @torch.library.custom_op("mhc_overhead::post", mutates_args=(), device_types=None)
        def _cop(x: torch.Tensor, r: torch.Tensor, pm: torch.Tensor, cm: torch.Tensor) -> torch.Tensor:
            return out.new_empty(out.shape)

        res: dict[str, float | str] = {
            "python call of the kernel": _best_us(lambda: fake.post(x, r, pm, cm)),
            "torch.empty_like (an allocation)": _best_us(lambda: torch.empty_like(r)),
            "torch.library.custom_op, empty body": _best_us(lambda: _cop(x, r, pm, cm)),
            "mhc.validation.check_post": _best_us(lambda: mhc.validation.check_post(x, r, pm, cm)),
            "mhc.registry.select": _best_us(lambda: registry.select("post", r.device, r.dtype, 4, 64, 1, "overhead_probe")),
            "torch.ops.mhc.post (whole op layer)": _best_us(
                lambda: torch.ops.mhc.post.default(x, r, pm, cm, backend="overhead_probe")),
        }
        for op in OPS:
            a, kw = inputs[op]
            f = getattr(mhc, op)
            res[f"mhc.{op} (public wrapper)"] = _best_us(lambda: f(*a, **kw, backend="overhead_probe"))
            g = requiring_grad(a)
            res[f"mhc.{op}, inputs requiring grad"] = _best_us(lambda: f(*g, **kw, backend="overhead_probe"), n=500)
        for op in OPS:  # the probe's outputs keep T = 1's shapes: the layers above do not look at them
            a, kw = checking.make_inputs(op, (64,), 4, 64)
            f = getattr(mhc, op)
            res[f"mhc.{op}, T=64"] = _best_us(lambda: f(*a, **kw, backend="overhead_probe"))
            g = requiring_grad(a)
            res[f"mhc.{op}, T=64, inputs requiring grad"] = _best_us(lambda: f(*g, **kw, backend="overhead_probe"),
                                                                    n=500)
    finally:
        registry.unregister("overhead_probe")
        del lib
    _triton_launch_paths(res)
    return res


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

def _ints(s: str) -> list[int]:
    return [int(v) for v in s.split(",") if v.strip()]


def _names(s: str) -> list[str]:
    return [v.strip() for v in s.split(",") if v.strip()]


def _out_error(out_dir: pathlib.Path) -> str | None:
    """Why the results cannot be written to ``out_dir`` (made here if missing), or None."""
    if out_dir.exists() and not out_dir.is_dir():
        return f"--out {out_dir}: not a folder"
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_dir):
            pass
    except OSError as e:
        return f"--out {out_dir}: cannot write there ({e.strerror or e})"
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python benchmarks/bench.py", description="Check and time every mhc op per backend and peer, "
        "against the bytes-moved floor (see this file's docstring and benchmarks/README.md).")
    ap.add_argument("--overhead", action="store_true", help="host overhead per call (CPU) and exit")
    ap.add_argument("--quick", action="store_true",
                    help=f"T in {QUICK_T}, H in {QUICK_H}, shorter repetitions (under 3 minutes on an H100)")
    ap.add_argument("--device", help="cuda, cuda:1 or cpu (default: cuda if visible, else cpu with tiny sizes)")
    ap.add_argument("--ops", type=_names, default=list(OPS), help="comma list (default: all four)")
    ap.add_argument("--impls", type=_names, default=None,
                    help=f"comma list of backends and peers ({', '.join(PEERS)}); default: every backend "
                         "but torch, and every peer")
    ap.add_argument("--T", type=_ints, default=None, help=f"comma list of token counts (default {GRID_T})")
    ap.add_argument("--H", type=_ints, default=None, help=f"comma list of hidden sizes (default {GRID_H})")
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    ap.add_argument("--rep-ms", type=int, default=None, help="timing budget per measurement (default 20, quick 10)")
    ap.add_argument("--no-cold", action="store_true", help="skip the L2-flushed timings")
    ap.add_argument("--eager", action="store_true",
                    help="also the eager µs per call (200 back-to-back calls synchronised once, median of 5 rounds), "
                         "without and with inputs requiring grad, next to the graph replay µs")
    ap.add_argument("--compile-backend", default="inductor",
                    help="torch.compile backend of the compile peer (default inductor; aot_eager for fast smoke tests)")
    ap.add_argument("--out", default=None, help=f"output folder (default ./{DEFAULT_OUT})")
    ap.add_argument("--prefix", default=None, help="file name prefix (default bench, quick or cpu-quick)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--report", metavar="CSV", help="rebuild the markdown table and plots from a CSV and exit")
    args = ap.parse_args(argv)
    out_dir = pathlib.Path(args.out or DEFAULT_OUT)
    why = None if args.overhead or args.report else _out_error(out_dir)  # before anything runs
    if why:
        ap.error(why)

    def log(msg: str) -> None:
        print(msg, flush=True)

    if args.overhead:
        for name, us in overhead().items():
            print(f"{name:50s} {us:7.2f} us" if isinstance(us, float) else f"{name:50s} {us}")
        return 0
    if args.report:
        src = pathlib.Path(args.report)
        rows = read_csv(src)
        report(rows, src.with_suffix(""), (), log)
        print(summary(rows))
        return 0

    device = torch.device(args.device) if args.device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    small = device.type == "cpu"
    Ts = args.T or (CPU_T if small else QUICK_T if args.quick else GRID_T)
    Hs = args.H or (CPU_H if small else QUICK_H if args.quick else GRID_H)
    rep_ms = args.rep_ms or (10 if args.quick or small else 20)
    for op in args.ops:
        if op not in OPS:
            ap.error(f"unknown op {op!r}; ops: {', '.join(OPS)}")
    prefix_name = args.prefix or ("cpu-quick" if small else "quick" if args.quick else "bench")
    prefix = out_dir / prefix_name
    dtype = getattr(torch, args.dtype)
    if small:
        log("cpu: tiny sizes and perf_counter timings, a smoke test of the harness (no CUDA graphs, no L2 flush; "
            "no GB/s or floor ratios: the floor is a GPU's memory bound)")
    try:
        impls = implementations(args.impls, args.compile_backend, log)
    except ValueError as e:
        ap.error(str(e))
    import importlib.metadata as md

    def version(d):
        try:
            return md.version(d)
        except md.PackageNotFoundError:
            return "not installed"

    log(f"python {platform.python_version()}, torch {torch.__version__}, " + ", ".join(
        f"{d} {version(d)}" for d in ("triton", "tilelang", "tile-kernels")))
    log(f"grid: ops {','.join(args.ops)}; impls {','.join(i.name for i in impls)}; T {Ts}; H {Hs}; n={args.n}; "
        f"{args.dtype}; rep {rep_ms} ms; out {prefix}.csv")
    t0 = time.perf_counter()
    copy_bytes = (1 << 30) if device.type == "cuda" else (1 << 22)
    rows, failures, skipped = run(args.ops, impls, Ts, Hs, args.n, device, dtype, pathlib.Path(f"{prefix}.csv"),
                                  rep_ms, not args.no_cold, args.seed, copy_bytes, log, eager=args.eager)
    log(f"\n{len(rows)} rows in {time.perf_counter() - t0:.0f} s; wrote {prefix}.csv")
    report(rows, prefix, skipped, log)
    if skipped:
        log("\nnot run:\n  " + "\n  ".join(skipped))
    log("\n" + summary(rows))
    if failures:
        log(f"\n!! {len(failures)} CHECK FAILURES (outputs disagree with the fp64 oracle or a call raised):\n  "
            + "\n  ".join(failures))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
