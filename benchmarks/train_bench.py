"""Training benchmark of the mHC ops: forward, backward and forward + backward of ``pre``, ``head``,
``post`` and ``fused_post_pre`` per implementation, against the backward's bytes floor, every
implementation's outputs and gradients checked against the fp64 oracle. One run, one CSV.

    python benchmarks/train_bench.py                          # the grid on a GPU -> $OUT/train_bench.csv
    python benchmarks/train_bench.py --H 4096 --out $OUT/train-h4096.csv   # a part of it
    python benchmarks/train_bench.py --device cpu             # tiny sizes: a smoke test, no GPU

The grid: ops ``pre``, ``head``, ``post``, ``fused_post_pre``; T in {64, 512, 4096, 16384}; H in
{4096, 7168}; n = 4; bf16 activations, fp32 parameters and mixes (``--ops``, ``--T``, ``--H``,
``--impls`` choose subsets). Every float input requires grad. The inputs are
:func:`mhc.checking.device_inputs` (drawn on the device), the upstream gradients standard normal
in each output's dtype, the same for every implementation.

Implementations (``--impls``, comma list; default ``mhc/triton,eager,compile,liger``):

``mhc/<backend>`` (``mhc/triton``, ``mhc/torch``, ...)
    mhc's public API (``mhc.<op>``) inside ``mhc.use_backend`` naming the backend for the forward
    op and for every backward op (as a bare backend name does; named op by op here so that a row
    says exactly what ran). ``fused_post_pre`` has a backward op of its own.
``eager``
    ``mhc.reference.<op>`` (the math in plain PyTorch) with autograd.
``compile``
    ``torch.compile`` of the reference, as ``benchmarks/bench.py``'s compile peer
    (``fullgraph=True``, inductor, ``emulate_precision_casts``, T dynamic): AOTAutograd compiles
    the backward too. ``torch._functorch.config.donated_buffer`` is switched off so that its
    backward can be run again on a retained graph.
``liger``
    Liger-Kernel's mHC (``liger-kernel`` 0.8.5, imported on first use; when it does not import,
    or cannot run here, its rows say why). Its public functional API
    (``liger_kernel.transformers.functional``), which applies the autograd Functions of
    ``liger_kernel.ops.mhc``: ``liger_mhc_coeffs`` (``LigerMHCCoeffsFunction``: the fused
    ``x @ phi`` + RMS factor, sigmoids and Sinkhorn; its backward keeps the Sinkhorn history),
    ``liger_mhc_pre`` (``LigerMHCPreFunction``: ``sum_i h_pre[i] * x[i]``) and
    ``liger_mhc_post_res`` (``LigerMHCPostResFunction``: ``out[o] = h_post[o] * f +
    sum_i h_res[o, i] * x[i]``). Its parameters take its own layout, built once from ours before
    timing, and are the leaves that require grad: ``phi`` (n*H, 2n+n*n) = ``fn.T`` in
    ``--liger-phi`` (bf16 by default: Liger's tensor-core path, the dtype its ``LigerMHC`` module
    recommends; the oracle is evaluated at the rounded values it received, and its gradient,
    which Liger returns in phi's dtype, is judged by the bf16 bound), ``b`` = ``hc_base``,
    ``alpha_pre``/``alpha_post``/``alpha_res`` = ``hc_scale[0]``/``[1]``/``[2]`` (0-d fp32).
    Its Sinkhorn computes the same matrix as ours from the same logits, so its ``h_res`` output
    is our ``comb_mix`` as is; its post takes ``h_res[o, i]`` (destination first), so our
    ``comb_mix[i, j]`` (source first) goes in transposed. Per op:

    - ``pre``: ``liger_mhc_coeffs(residual, phi, b, alphas, tmax=sinkhorn_repeat,
      rms_eps, pre_eps=hc_pre_eps, sinkhorn_eps=hc_sinkhorn_eps, post_mult=hc_post_mult_value)``
      -> ``(h_pre, h_post, h_res)``; ``layer_input = liger_mhc_pre(residual, h_pre)``; outputs
      ``(h_post[..., None], h_res, layer_input)``.
    - ``post``: ``liger_mhc_post_res(residual, x, post_mix[..., 0], comb_mix.mT)``, the mixes
      held in Liger's layout (contiguous) as the leaves.
    - ``head``: Liger has no head op (its coefficient function always computes 2n+n*n mixes with
      Sinkhorn). Composed from its calls: ``liger_mhc_coeffs`` with ``phi`` zero-padded to
      2n+n*n columns (the first n are head's ``fn.T``, ``b[:n]`` = ``hc_base``, the rest zero;
      ``alpha_pre`` = ``hc_scale[0]``, ``pre_eps`` = ``hc_eps``; ``tmax=1``, the least Sinkhorn
      it allows, as ``h_post``/``h_res`` are discarded), then ``liger_mhc_pre``. The padding
      costs it little: its GEMM tiles 32 mix columns at a time either way. Its backward still
      runs the (one-step) Sinkhorn backward on zero gradients, as autograd hands its Function
      zeros for the unused outputs.
    - ``fused_post_pre``: Liger has no fused op. Composed as ``liger_mhc_post_res`` then its
      ``pre`` above on the new residual (which is rounded to bf16 and read back: the fusion's
      saving is not there).

Per row: ``fwd_us`` the forward alone (inputs requiring grad, so the graph is recorded and what
backward needs is saved, then dropped); ``bwd_us`` the backward alone
(``torch.autograd.grad(outs, inputs, grads, retain_graph=True)`` on a graph recorded once);
``step_us`` forward and backward together. All three are :func:`mhc.timing.time_cold` (Triton's
``do_bench`` median, L2 flushed before every call, no CUDA graph: launch and host overhead
included, as in eager training). ``bwd_floor_us``: :func:`mhc.timing.backward_floor_bytes` (each
tensor the backward needs read once, each gradient written once) over the copy bandwidth measured
at the start of the same run (``bench.copy_bandwidth``); ``bwd_ratio`` = ``bwd_us /
bwd_floor_us``. The printed rows also give the backward's achieved GB/s (floor bytes over
``bwd_us``). On CPU the timings are ``perf_counter`` medians and the floor is the CPU's: a smoke
test of the script, not a measurement.

``check``: before timing, the implementation's outputs and the gradients of every input are
compared with the fp64 oracle (:func:`mhc.checking.grad_oracle`: autograd of the reference in fp64
on the benchmark's device, at the values the implementation received, with the same upstream
gradients) under :data:`mhc.checking.TOLERANCES` and :data:`mhc.checking.GRAD_TOLERANCES`:
``ok`` or ``FAIL <what>``. Where T exceeds ``--check-max-T``, or the oracle runs out of device
memory, the check runs on fresh inputs at ``--check-T`` tokens of the same H and says so
(``ok@T=512``). An implementation that cannot serve is a row whose check says
``unavailable: <why>``; one that raises is a ``FAIL`` row; neither ends the table. The CSV is
rewritten after every row (a run cut short keeps what it measured); a short table is printed last
and written beside the CSV (``.md``). Exit status 1 if any check failed.

The whole default grid, with the compile peer's compilations (one forward and backward graph per
op and H), has not been timed yet; it may exceed a 10-minute call: run it per H (``--H 4096``,
then ``--H 7168`` with another ``--out``).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import datetime
import importlib.metadata
import os
import pathlib
import platform
import sys
import time
from collections.abc import Callable, Sequence

import torch

# bench.py, the one harness, sits beside this script (on sys.path when run as a script; put there
# for importers such as the tests).
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from bench import compile_impl, copy_bandwidth, device_name, requiring_grad  # noqa: E402

import mhc  # noqa: E402
from mhc import checking, reference, registry  # noqa: E402
from mhc.progress import Progress  # noqa: E402
from mhc.timing import backward_floor_bytes, time_cold  # noqa: E402

CSV_FIELDS = ("date", "device", "op", "impl", "n", "H", "T", "fwd_us", "bwd_us", "step_us", "bwd_floor_us",
              "bwd_ratio", "check")
GRID_T = (64, 512, 4096, 16384)
GRID_H = (4096, 7168)
# --device cpu: tiny sizes, a smoke test of the script's code paths.
CPU_T = (8,)
CPU_H = (64,)
DEFAULT_IMPLS = ("mhc/triton", "eager", "compile", "liger")
PEERS = ("eager", "compile", "liger")
DEFAULT_OUT = "mhc-bench"  # as bench.py: a folder of the current directory
DTYPE = torch.bfloat16


def _tuple(out) -> tuple:
    return out if isinstance(out, tuple) else (out,)


# --------------------------------------------------------------------------------------------
# Implementations
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Case:
    """One implementation set up for one op call.

    ``leaves``: the tensors that require grad, in the implementation's own layout; ``forward()``
    returns the op's outputs in mhc's layout and order (views where the implementation's layout
    differs), so that one set of upstream gradients serves every implementation; ``to_ours``
    maps the gradients of ``leaves`` to the gradients of mhc's inputs, in argument order;
    ``inputs``: the leaves' values as mhc's inputs (what the oracle is evaluated at); ``context``:
    entered around every forward (mhc's backend selection)."""

    leaves: list[torch.Tensor]
    forward: Callable[[], tuple]
    to_ours: Callable[[Sequence[torch.Tensor]], tuple]
    inputs: tuple
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext


@dataclasses.dataclass
class Impl:
    """``reasons(op, device, dtype, n, H, T)``: why it cannot serve (empty: it can);
    ``prepare(op, args, kwargs)``: a :class:`Case` for mhc's inputs ``args``."""

    name: str
    reasons: Callable[..., list[str]]
    prepare: Callable[[str, tuple, dict], Case]
    note: str = ""


def _backward_ops(op: str) -> tuple[str, ...]:
    """The backward ops that ``op``'s backward runs (fused_post_pre chains pre's and post's unless
    the registry has a backward op of its own)."""
    own = f"{op}_backward"
    return (own,) if own in registry.BACKWARD_OPS else ("pre_backward", "post_backward")


def mhc_impl(backend: str) -> Impl:
    """mhc's public API with ``backend`` for the forward op and every backward op."""
    spec = {op: backend for op in (*registry.OPS, *registry.BACKWARD_OPS)}

    def reasons(op, device, dtype, n, H, T):
        out = []
        for o in (op, *_backward_ops(op)):
            try:
                why = registry.reasons_for(backend, registry.Problem(o, device, dtype, n, H, T))
            except registry.BackendError as e:
                why = [str(e)]
            out += [f"{o}: {w}" for w in why]
        return out

    def prepare(op, args, kwargs):
        leaves = list(requiring_grad(args))
        f = getattr(mhc, op)
        return Case(leaves, lambda: _tuple(f(*leaves, **kwargs)), tuple, tuple(args),
                    lambda: mhc.use_backend(**spec))

    return Impl(f"mhc/{backend}", reasons, prepare, f"mhc.<op> under mhc.use_backend({backend!r} for "
                f"{', '.join(spec)})")


def eager_impl() -> Impl:
    """The reference in eager PyTorch, with autograd."""

    def prepare(op, args, kwargs):
        leaves = list(requiring_grad(args))
        f = getattr(reference, op)
        return Case(leaves, lambda: _tuple(f(*leaves, **kwargs)), tuple, tuple(args))

    return Impl("eager", lambda *a: [], prepare, "mhc.reference.<op>, eager, autograd")


def compile_peer(backend: str = "inductor") -> Impl:
    """torch.compile of the reference, compiled as bench.py's compile peer (one graph per op and
    H, T dynamic), backward by AOTAutograd; ``backend`` the torch.compile backend (``aot_eager``
    for fast smoke tests)."""
    import torch._functorch.config

    # The timed backward reruns torch.autograd.grad on a retained graph, which a compiled backward
    # refuses while it donates its saved buffers.
    torch._functorch.config.donated_buffer = False
    peer = compile_impl(backend)

    def prepare(op, args, kwargs):
        leaves = list(requiring_grad(args))
        runner = peer.prepare(op, tuple(leaves), kwargs)
        return Case(leaves, lambda: runner(False), tuple, tuple(args))

    return Impl("compile", peer.reasons, prepare, peer.note + "; donated_buffer=False")


def liger_impl(phi_dtype: torch.dtype = torch.bfloat16) -> Impl:
    """Liger-Kernel's mHC functions, mapped onto each op as the module docstring says."""
    state: dict[str, object] = {}

    def functional():
        if "mod" not in state:
            try:
                from liger_kernel.transformers import functional as lf

                state["mod"] = lf
                state["version"] = importlib.metadata.version("liger-kernel")
            except Exception as e:  # missing or broken: a reason on every row, not a crash
                state["mod"] = None
                state["why"] = f"liger_kernel does not import ({type(e).__name__}: {str(e)[:200]})"
        return state["mod"]

    def reasons(op, device, dtype, n, H, T):
        if functional() is None:
            return [str(state["why"])]
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            return [f"Liger's mHC kernels are Triton kernels: a GPU, or TRITON_INTERPRET=1 (inputs on {device})"]
        if dtype not in (torch.bfloat16, torch.float16):
            return [f"bf16/fp16 activations only without allow_fp32 (got {dtype})"]
        return []

    def leaf(t: torch.Tensor) -> torch.Tensor:
        return t.detach().clone().contiguous().requires_grad_(True)

    def coeffs_args(fn, hc_scale, hc_base, n):
        """Liger's parameters from ours: phi (n*H, m) = fn.T (zero-padded to m = 2n+n*n columns
        for head's (n, n*H) fn), b (m,), and three 0-d alphas (head: alpha_pre only)."""
        m = 2 * n + n * n
        phi = torch.zeros(fn.shape[1], m, dtype=phi_dtype, device=fn.device)
        phi[:, :fn.shape[0]] = fn.t().to(phi_dtype)
        b = torch.zeros(m, dtype=torch.float32, device=fn.device)
        b[:hc_base.numel()] = hc_base
        return leaf(phi), leaf(b), [leaf(hc_scale[i]) for i in range(hc_scale.numel())]

    def pre_call(lf, x, phi, b, alphas, kw, head: bool):
        """(h_pre, h_post, h_res) of liger_mhc_coeffs and layer_input of liger_mhc_pre. For head,
        ``alphas`` is (alpha_pre, 1.0): the same 0-d 1.0 serves alpha_post and alpha_res, whose
        mixes are discarded."""
        if head:
            a_pre, a_post, a_res = alphas[0], alphas[1], alphas[1]
            sc = dict(tmax=1, rms_eps=kw["rms_eps"], pre_eps=kw["hc_eps"],
                      sinkhorn_eps=reference.DEFAULTS["hc_sinkhorn_eps"],
                      post_mult=reference.DEFAULTS["hc_post_mult_value"])
        else:
            a_pre, a_post, a_res = alphas
            sc = dict(tmax=kw["sinkhorn_repeat"], rms_eps=kw["rms_eps"], pre_eps=kw["hc_pre_eps"],
                      sinkhorn_eps=kw["hc_sinkhorn_eps"], post_mult=kw["hc_post_mult_value"])
        h_pre, h_post, h_res = lf.liger_mhc_coeffs(x, phi, b, a_pre, a_post, a_res, **sc)
        return h_pre, h_post, h_res, lf.liger_mhc_pre(x, h_pre)

    def prepare(op, args, kwargs):
        lf = functional()
        if op in ("pre", "head"):
            residual, fn, hc_scale, hc_base = args
            n = residual.shape[-2]
            phi, b, alphas = coeffs_args(fn, hc_scale, hc_base, n)
            x = leaf(residual)
            leaves = [x, phi, b, *alphas]
            k = fn.shape[0]  # fn's rows: m for pre, n for head

            def to_ours(g):
                return (g[0], g[1][:, :k].t(), torch.stack(list(g[3:])).reshape(hc_scale.shape), g[2][:hc_base.numel()])

            inputs = (x.detach(), phi.detach()[:, :k].t().to(fn.dtype), torch.stack([a.detach() for a in alphas]),
                      b.detach()[:hc_base.numel()])
            if op == "head":
                one = torch.ones((), dtype=torch.float32, device=x.device)  # made once, not on every call
                return Case(leaves, lambda: (pre_call(lf, x, phi, b, (*alphas, one), kwargs, True)[3],), to_ours,
                            inputs)

            def forward():
                _, h_post, h_res, li = pre_call(lf, x, phi, b, alphas, kwargs, False)
                return h_post.unsqueeze(-1), h_res, li

            return Case(leaves, forward, to_ours, inputs)
        xin, residual, post_mix, comb_mix = args[:4]
        # Liger's layout of the input mixes: h_post (T, n), h_res (T, n, n) destination first.
        x, r = leaf(xin), leaf(residual)
        hp, hr = leaf(post_mix.squeeze(-1)), leaf(comb_mix.mT)
        mix_inputs = (x.detach(), r.detach(), hp.detach().unsqueeze(-1), hr.detach().mT)

        def post_to_ours(g):
            return (g[0], g[1], g[2].unsqueeze(-1), g[3].mT)

        if op == "post":
            return Case([x, r, hp, hr], lambda: (lf.liger_mhc_post_res(r, x, hp, hr),), post_to_ours, mix_inputs)
        fn, hc_scale, hc_base = args[4:]
        phi, b, alphas = coeffs_args(fn, hc_scale, hc_base, residual.shape[-2])

        def forward():
            new = lf.liger_mhc_post_res(r, x, hp, hr)
            _, h_post, h_res, li = pre_call(lf, new, phi, b, alphas, kwargs, False)
            return new, h_post.unsqueeze(-1), h_res, li

        def to_ours(g):
            return (*post_to_ours(g[:4]), g[4].t(), torch.stack(list(g[6:])), g[5])

        inputs = (*mix_inputs, phi.detach().t().to(fn.dtype), torch.stack([a.detach() for a in alphas]), b.detach())
        return Case([x, r, hp, hr, phi, b, *alphas], forward, to_ours, inputs)

    note = (f"liger_kernel.transformers.functional liger_mhc_coeffs/liger_mhc_pre/liger_mhc_post_res, phi "
            f"{str(phi_dtype).replace('torch.', '')}; head: zero-padded phi, tmax=1; fused_post_pre: post_res then "
            "pre (no fused op)")
    return Impl("liger", reasons, prepare, note)


def implementations(names: Sequence[str], liger_phi: torch.dtype, compile_backend: str = "inductor") -> list[Impl]:
    """The implementations named (``mhc/<backend>`` or a peer); unknown names raise ``ValueError``."""
    out = []
    for name in names:
        if name.startswith("mhc/") and name[4:] in registry.backend_names():
            out.append(mhc_impl(name[4:]))
        elif name == "eager":
            out.append(eager_impl())
        elif name == "compile":
            out.append(compile_peer(compile_backend))
        elif name == "liger":
            out.append(liger_impl(liger_phi))
        else:
            raise ValueError(f"unknown implementation {name!r}: mhc/<backend> with a backend of "
                             f"{', '.join(registry.backend_names())}, or one of {', '.join(PEERS)}")
    return out


# --------------------------------------------------------------------------------------------
# Inputs, check, timings
# --------------------------------------------------------------------------------------------

def upstream_grads(op: str, T: int, n: int, H: int, dtype: torch.dtype, device, seed: int) -> list[torch.Tensor]:
    """One gradient per output of ``op`` in mhc's layout and the output's dtype: post_mix (T, n, 1)
    and comb_mix (T, n, n) fp32, layer_input (T, H), post's and fused's new residual (T, n, H),
    head's output (T, H) in ``dtype``. Standard normal, drawn on ``device``."""
    mixes = [((T, n, 1), torch.float32), ((T, n, n), torch.float32)]
    shapes = {"pre": [*mixes, ((T, H), dtype)], "head": [((T, H), dtype)], "post": [((T, n, H), dtype)],
              "fused_post_pre": [((T, n, H), dtype), *mixes, ((T, H), dtype)]}[op]
    g = torch.Generator(device=device).manual_seed(seed + 2)
    return [torch.randn(s, generator=g, device=device, dtype=torch.float32).to(dt) for s, dt in shapes]


def _problems(errs: list[tuple[str, float, float]], prefix: str = "") -> list[str]:
    return [f"{prefix}{name} {e:.2e}>{t:g}" for name, e, t in errs if not e <= t]


def check(impl: Impl, op: str, args: tuple, kwargs: dict, grads: list[torch.Tensor]) -> str:
    """``ok`` or ``FAIL <what>``: the outputs and every input's gradient of ``impl`` against the fp64
    oracle at the values it received. Raises what the implementation or the oracle raises."""
    case = impl.prepare(op, args, kwargs)
    with case.context():
        outs = case.forward()
    got = case.to_ours(torch.autograd.grad(outs, case.leaves, grads))
    # fused_post_pre: pre's reference reads the new residual this implementation stored
    ref_outs, ref_grads = checking.grad_oracle(op, case.inputs, kwargs, grads,
                                               outs[0] if op == "fused_post_pre" else None)
    bad = (_problems(checking.compare(op, outs, ref_outs, DTYPE))
           + _problems(checking.compare_grads(op, got, ref_grads, DTYPE), "grad "))
    return "ok" if not bad else "FAIL " + "; ".join(bad)


def timings(impl: Impl, op: str, args: tuple, kwargs: dict, grads: list[torch.Tensor], device,
            rep_ms: int) -> tuple[float, float, float]:
    """(forward, backward, forward + backward) µs, each :func:`mhc.timing.time_cold`."""
    case = impl.prepare(op, args, kwargs)
    with case.context():
        fwd = time_cold(case.forward, device, rep_ms)
        outs = case.forward()
        bwd = time_cold(lambda: torch.autograd.grad(outs, case.leaves, grads, retain_graph=True), device, rep_ms)
        del outs
        step = time_cold(lambda: torch.autograd.grad(case.forward(), case.leaves, grads), device, rep_ms)
    return fwd, bwd, step


def _why(e: BaseException) -> str:
    first = str(e).splitlines()[0][:200] if str(e) else ""
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def _free(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def checked(impl: Impl, op: str, T: int, n: int, H: int, args: tuple, kwargs: dict, grads: list[torch.Tensor],
            device, seed: int, check_max_t: int, check_t: int) -> str:
    """The check column: at the benchmark's own inputs when ``T <= check_max_t`` and the oracle fits
    in memory, else at ``check_t`` tokens of the same H (``ok@T=<check_t>``)."""
    if T <= check_max_t:
        try:
            return check(impl, op, args, kwargs, grads)
        except torch.OutOfMemoryError:
            pass  # freed below, once the exception's frames (and the tensors they hold) are gone
        _free(device)
    small_args, small_kw = checking.device_inputs(op, check_t, n, H, device, seed=seed, dtype=DTYPE)
    small_grads = upstream_grads(op, check_t, n, H, DTYPE, device, seed)
    res = check(impl, op, small_args, small_kw, small_grads)
    head, _, rest = res.partition(" ")
    return f"{head}@T={check_t}" + (f" {rest}" if rest else "")


def run(ops: Sequence[str], impls: list[Impl], Ts: Sequence[int], Hs: Sequence[int], n: int, device,
        out_csv: pathlib.Path, rep_ms: int, seed: int, check_max_t: int, check_t: int, copy_bytes: int,
        log) -> list[dict]:
    """Check and time every (op, H, T, implementation); a row each, the CSV rewritten after every
    row. Returns the rows (with the floor's bytes under ``_floor_bytes`` for the printout)."""
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    dev_name = device_name(device)
    bw, bw_notes = copy_bandwidth(device, copy_bytes, rep_ms=max(rep_ms, 50))
    log(f"copy bandwidth on {dev_name}: {bw:.0f} GB/s (best of: " + ", ".join(f"{k} {v}" for k, v in bw_notes.items())
        + ")")
    for impl in impls:
        log(f"{impl.name}: {impl.note}")
    rows: list[dict] = []
    progress = Progress(len(ops) * len(Hs) * len(Ts) * len(impls))
    for op in ops:
        for H in Hs:
            for T in Ts:
                args, kwargs = checking.device_inputs(op, T, n, H, device, seed=seed, dtype=DTYPE)
                grads = upstream_grads(op, T, n, H, DTYPE, device, seed)
                nbytes = backward_floor_bytes(op, T, n, H, act_bytes=torch.finfo(DTYPE).bits // 8)
                floor_us = nbytes / (bw * 1e3)
                for impl in impls:
                    progress.step()
                    row = dict(date=date, device=dev_name, op=op, impl=impl.name, n=n, H=H, T=T, fwd_us="",
                               bwd_us="", step_us="", bwd_floor_us=f"{floor_us:.6g}", bwd_ratio="", check="",
                               _floor_bytes=nbytes)
                    why = impl.reasons(op, device, DTYPE, n, H, T)
                    if why:
                        row["check"] = "unavailable: " + "; ".join(why)
                    else:
                        try:
                            row["check"] = checked(impl, op, T, n, H, args, kwargs, grads, device, seed, check_max_t,
                                                   check_t)
                        except Exception as e:  # one failing implementation must not end the table
                            row["check"] = f"FAIL raised {_why(e)}"
                        _free(device)
                        if not row["check"].startswith("FAIL raised"):
                            try:
                                fwd, bwd, step = timings(impl, op, args, kwargs, grads, device, rep_ms)
                                row.update(fwd_us=f"{fwd:.3f}", bwd_us=f"{bwd:.3f}", step_us=f"{step:.3f}",
                                           bwd_ratio=f"{bwd / floor_us:.3f}")
                            except Exception as e:
                                row["check"] = f"FAIL timing raised {_why(e)} (check: {row['check']})"
                            _free(device)
                    rows.append(row)
                    _write_csv(out_csv, rows)
                    log(progress.prefix() + _fmt_row(row))
                del args, kwargs, grads
                _free(device)
    return rows


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------

def _write_csv(path: pathlib.Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)


def _fmt_row(r: dict) -> str:
    where = f"{r['op']:14s} H={r['H']:<5} T={r['T']:<6} {r['impl']:11s}"
    if not r["bwd_us"]:
        return f"{where} !! {r['check']}"
    gbps = r["_floor_bytes"] / float(r["bwd_us"]) / 1e3
    flag = "" if r["check"].startswith("ok") else "!! "
    return (f"{where} fwd {float(r['fwd_us']):9.1f} us  bwd {float(r['bwd_us']):9.1f} us  step "
            f"{float(r['step_us']):9.1f} us  bwd {gbps:7.1f} GB/s {float(r['bwd_ratio']):6.2f}x floor  "
            f"{flag}{r['check']}")


def table(rows: list[dict]) -> str:
    """Markdown, one table per op: per (H, T) the backward floor and, per implementation, the
    backward µs (× floor) / the step µs; ``!!`` marks a failed check, ``n/a`` an unavailable one."""
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    out = []
    for op in dict.fromkeys(r["op"] for r in rows):
        out += [f"**{op}** (cells: backward µs (× backward floor) / forward + backward µs)", "",
                "| H | T | bwd floor µs | " + " | ".join(impls) + " |", "|---:|---:|---:|" + "---:|" * len(impls)]
        cells: dict[tuple, dict] = {}
        for r in rows:
            if r["op"] == op:
                cells.setdefault((r["H"], r["T"]), {})[r["impl"]] = r
        for (H, T), by in cells.items():
            line = []
            for i in impls:
                r = by.get(i)
                if r is None:
                    line.append("")
                elif r["check"].startswith("unavailable"):
                    line.append("n/a")
                elif not r["bwd_us"]:
                    line.append("!! failed")
                else:
                    flag = "" if r["check"].startswith("ok") else " !!"
                    line.append(f"{float(r['bwd_us']):.1f} ({float(r['bwd_ratio']):.2f}×) / "
                                f"{float(r['step_us']):.1f}{flag}")
            floor = next(iter(by.values()))["bwd_floor_us"]
            out.append(f"| {H} | {T} | {float(floor):.1f} | " + " | ".join(line) + " |")
        out.append("")
    notes = dict.fromkeys(f"{r['impl']} {r['op']}: {r['check']}" for r in rows
                          if r["check"].startswith("unavailable"))
    fails = [f"{r['impl']} {r['op']} H={r['H']} T={r['T']}: {r['check']}" for r in rows
             if r["check"].startswith("FAIL")]
    if fails:
        out += ["Failed checks:", *[f"- {f}" for f in fails], ""]
    if notes:
        out += ["Not run:", *[f"- {x}" for x in notes], ""]
    return "\n".join(out)


def _ints(s: str) -> list[int]:
    return [int(v) for v in s.split(",") if v.strip()]


def _names(s: str) -> list[str]:
    return [v.strip() for v in s.split(",") if v.strip()]


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python benchmarks/train_bench.py",
                                 description=__doc__.splitlines()[0] + " (see the module docstring)")
    ap.add_argument("--device", help="cuda, cuda:1 or cpu (default: cuda if visible, else cpu with tiny sizes)")
    ap.add_argument("--ops", type=_names, default=list(registry.OPS), help="comma list (default: all four)")
    ap.add_argument("--impls", type=_names, default=list(DEFAULT_IMPLS),
                    help=f"comma list of mhc/<backend> and peers ({', '.join(PEERS)}); default "
                         f"{','.join(DEFAULT_IMPLS)}")
    ap.add_argument("--T", type=_ints, default=None, help=f"comma list of token counts (default {GRID_T})")
    ap.add_argument("--H", type=_ints, default=None, help=f"comma list of hidden sizes (default {GRID_H})")
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--rep-ms", type=int, default=None, help="do_bench budget per timing (default 100; cpu 10)")
    ap.add_argument("--check-max-T", type=int, default=16384,
                    help="largest T checked at the benchmark's own inputs; above it the check runs at --check-T")
    ap.add_argument("--check-T", type=int, default=512, help="tokens of the smaller check (default 512)")
    ap.add_argument("--compile-backend", default="inductor",
                    help="torch.compile backend of the compile peer (default inductor; aot_eager for fast smoke tests)")
    ap.add_argument("--liger-phi", default="bfloat16", choices=("bfloat16", "float16", "float32"),
                    help="dtype of Liger's phi (default bfloat16, its tensor-core path)")
    ap.add_argument("--out", default=None,
                    help=f"a .csv path, or a folder for train_bench.csv (default $OUT, else ./{DEFAULT_OUT})")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    def log(msg: str) -> None:
        print(msg, flush=True)

    device = torch.device(args.device) if args.device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    small = device.type == "cpu"
    Ts = args.T or (CPU_T if small else GRID_T)
    Hs = args.H or (CPU_H if small else GRID_H)
    rep_ms = args.rep_ms or (10 if small else 100)
    for op in args.ops:
        if op not in registry.OPS:
            ap.error(f"unknown op {op!r}; ops: {', '.join(registry.OPS)}")
    try:
        impls = implementations(args.impls, getattr(torch, args.liger_phi), args.compile_backend)
    except ValueError as e:
        ap.error(str(e))
    out = pathlib.Path(args.out or os.environ.get("OUT") or DEFAULT_OUT)
    out_csv = out if out.suffix == ".csv" else out / "train_bench.csv"
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    if small:
        log("cpu: tiny sizes and perf_counter timings, a smoke test of the script (the floor and its ratio are the "
            "CPU's copy bandwidth's, not a measurement)")
    log(f"python {platform.python_version()}, torch {torch.__version__}, "
        + ", ".join(f"{d} {_version(d)}" for d in ("triton", "liger-kernel")))
    log(f"grid: ops {','.join(args.ops)}; impls {','.join(i.name for i in impls)}; T {list(Ts)}; H {list(Hs)}; "
        f"n={args.n}; bf16; rep {rep_ms} ms; out {out_csv}")
    t0 = time.perf_counter()
    copy_bytes = (1 << 30) if device.type == "cuda" else (1 << 22)
    rows = run(args.ops, impls, Ts, Hs, args.n, device, out_csv, rep_ms, args.seed, args.check_max_T, args.check_T,
               copy_bytes, log)
    md = table(rows)
    out_csv.with_suffix(".md").write_text(md)
    log(f"\n{len(rows)} rows in {time.perf_counter() - t0:.0f} s; wrote {out_csv} and {out_csv.with_suffix('.md')}\n")
    log(md)
    return 1 if any(r["check"].startswith("FAIL") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
