"""Inputs, the fp64 oracle, the tolerance table and the output check: shared by the tests,
``python -m mhc check``, the GPU suite and the benchmarks, so that every correctness claim is
made against the same thing.

The oracle is :mod:`mhc.reference` evaluated in fp64 on the very inputs a backend received
(bf16 values upcast exactly). For ``fused_post_pre`` the oracle rounds the new residual to the
residual's dtype before ``pre`` reads it, as the op's contract says.

At GPU sizes (T up to 16384, H 7168) the inputs are drawn on the device
(:func:`device_inputs`), the oracle runs on a sample of token rows (:func:`sample_rows`,
:func:`reference_rows`: every op is row-independent) and :func:`check_outputs` compares,
after :func:`poisoned_outputs` made every unwritten output element NaN.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Sequence

import torch

from mhc import reference

__all__ = ["TOLERANCES", "GRAD_TOLERANCES", "OUTPUTS", "GRAD_INPUTS", "make_inputs", "oracle", "reference_f64",
           "grad_oracle", "per_token", "sum_error", "grad_error", "rel_error", "compare", "compare_grads", "call",
           "token_args", "device_inputs", "sample_rows", "reference_rows", "Check", "check_outputs", "nan_empty",
           "poisoned_outputs"]

#: Relative Frobenius error bounds vs the fp64 oracle, by output kind and residual dtype.
#: "act": outputs in the residual's dtype (layer_input, new residual, head, post);
#: "mix": post_mix and comb_mix (fp32). bf16/fp16 "act" bounds are DESIGN.md's 1e-2; fp16 has 3
#: more mantissa bits. "mix" is DESIGN.md's 1e-3, which leaves TF32 room (~3e-4 seen).
TOLERANCES = {
    torch.bfloat16: {"act": 1e-2, "mix": 1e-3},
    torch.float16: {"act": 2e-3, "mix": 1e-3},
    torch.float32: {"act": 1e-5, "mix": 1e-5},
    torch.float64: {"act": 1e-12, "mix": 1e-12},
}

#: Error bounds of gradients vs the fp64 backward (autograd of the reference), by gradient kind
#: and residual dtype. "act": gradients in the activation dtype (residual, x), which carry its
#: rounding (~3-4e-3 seen in bf16); "mix": fp32 gradients of the parameters and mixes (fn,
#: hc_base, post_mix, comb_mix), fp32 sums over T*n*H terms (~1e-6 seen). Both bound the relative
#: Frobenius error (:func:`rel_error`). "sum": ``hc_scale``'s gradient, a sum over tokens of terms
#: of both signs that lands near zero by chance (sum |terms| / |sum| from 31 to 5000 over 24
#: draws at T = 4096), so a relative error measures the draw: it is bounded per entry against
#: the sum of its terms' magnitudes (:func:`sum_error`). On the CPU (T = 4096, H = 7168, 8 draws
#: each of pre and fused_post_pre): an fp32 backward is at 0.4-4.0e-8 there, the Triton kernels'
#: arithmetic (fn as bf16 hi + lo, the GEMM accumulated in fp32) 0.5-3.5e-7, and up to 1.2e-6 if
#: the tensor cores' accumulation truncated (a model, not measured); fn rounded to bf16 (a real
#: loss) 4.8e-5 and more, a sign flip of one entry 5e-4 and more (docs/tuning/triton.md,
#: "grad_hc_scale at H = 7168").
GRAD_TOLERANCES = {
    torch.bfloat16: {"act": 1e-2, "mix": 1e-4, "sum": 2e-6},
    torch.float16: {"act": 1e-2, "mix": 1e-4, "sum": 2e-6},
    torch.float32: {"act": 1e-5, "mix": 1e-5, "sum": 2e-6},
}

#: Output names and kinds per op, in return order.
OUTPUTS = {
    "pre": (("post_mix", "mix"), ("comb_mix", "mix"), ("layer_input", "act")),
    "post": (("out", "act"),),
    "head": (("out", "act"),),
    "fused_post_pre": (("new_residual", "act"), ("post_mix", "mix"), ("comb_mix", "mix"), ("layer_input", "act")),
}

#: Names and gradient kinds (keys of :data:`GRAD_TOLERANCES`) of each op's differentiable inputs,
#: in argument order. fused's post_mix/comb_mix gradients come from the new residual's gradient,
#: which is in the residual's dtype (bf16), as it is for the unfused pair: they carry its rounding.
GRAD_INPUTS = {
    "pre": (("residual", "act"), ("fn", "mix"), ("hc_scale", "sum"), ("hc_base", "mix")),
    "head": (("residual", "act"), ("fn", "mix"), ("hc_scale", "sum"), ("hc_base", "mix")),
    "post": (("x", "act"), ("residual", "act"), ("post_mix", "mix"), ("comb_mix", "mix")),
    "fused_post_pre": (("x", "act"), ("residual", "act"), ("post_mix", "act"), ("comb_mix", "act"),
                       ("fn", "mix"), ("hc_scale", "sum"), ("hc_base", "mix")),
}


def make_inputs(op: str, lead: tuple[int, ...], n: int, H: int, dtype=torch.bfloat16, device="cpu",
                seed: int = 0, scale: float = 1.0) -> tuple[tuple, dict]:
    """Random, never-zero inputs for ``op``: ``(args, kwargs)`` for ``mhc.<op>(*args, **kwargs)``.

    ``lead`` are the leading dims (their product is T). ``scale`` multiplies the activations
    (the RMS normalisation makes pre/head invariant to it up to rounding; post is not). The mix
    inputs of post are a real ``pre`` output of the reference, so they are in range.
    """
    g = torch.Generator().manual_seed(seed)
    mdt = reference.acc_dtype(dtype)
    m = 2 * n + n * n

    def randn(*shape, s=1.0, dt=mdt):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * s).to(dt).to(device)

    residual = randn(*lead, n, H, s=scale, dt=dtype)
    kw = {k: reference.DEFAULTS[k] for k in ("rms_eps", "hc_pre_eps", "hc_sinkhorn_eps", "hc_post_mult_value",
                                              "sinkhorn_repeat")}
    if op == "head":
        fn = randn(n, n * H, s=1.0 / math.sqrt(n * H))
        hc_scale = (torch.rand(1, generator=g, dtype=torch.float64) + 0.5).to(mdt).to(device)
        return (residual, fn, hc_scale, randn(n, s=0.5)), dict(rms_eps=reference.DEFAULTS["rms_eps"],
                                                               hc_eps=reference.DEFAULTS["hc_eps"])
    # fn rows of unit-ish norm so that mixes are O(1): sigmoids and softmax see a real range.
    fn = randn(m, n * H, s=2.0 / math.sqrt(n * H))
    hc_scale = (torch.rand(3, generator=g, dtype=torch.float64) + 0.5).to(mdt).to(device)
    hc_base = randn(m, s=0.5)
    if op == "pre":
        return (residual, fn, hc_scale, hc_base), kw
    x = randn(*lead, H, s=scale, dt=dtype)
    prev = randn(*lead, n, H, dt=dtype)
    post_mix, comb_mix, _ = reference.pre(prev.cpu(), fn.cpu(), hc_scale.cpu(), hc_base.cpu())
    post_mix, comb_mix = post_mix.to(mdt).to(device), comb_mix.to(mdt).to(device)
    if op == "post":
        return (x, residual, post_mix, comb_mix), {}
    return (x, residual, post_mix, comb_mix, fn, hc_scale, hc_base), kw


def _f64(t):
    return t.detach().to("cpu", torch.float64) if isinstance(t, torch.Tensor) else t


def oracle(op: str, args: tuple, kwargs: dict) -> tuple[torch.Tensor, ...]:
    """The reference in fp64 on CPU for ``mhc.<op>(*args, **kwargs)``; always a tuple."""
    a = [_f64(t) for t in args]
    kwargs = {k: _f64(v) for k, v in kwargs.items()}  # norm_weight: on the inputs' device
    if op == "fused_post_pre":
        res_dtype = args[1].dtype
        new = reference.post(*a[:4])
        rounded = new.to(res_dtype).to(torch.float64)  # the contract: pre reads the stored residual
        return (new, *reference.pre(rounded, *a[4:], **kwargs))
    out = getattr(reference, op)(*a, **kwargs)
    return out if isinstance(out, tuple) else (out,)


def reference_f64(op: str, args: Sequence, kwargs: dict, res_dtype: torch.dtype,
                  new_residual: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """The reference of ``op`` on fp64 ``args`` (any device), differentiable: what :func:`oracle`
    computes, without its detach. For ``fused_post_pre`` ``pre`` reads the stored new residual, as
    the op's contract says: ``new_residual``, the one the checked call returned, where given (its
    value, with the gradient flowing through the fp64 ``post``: the backward under test reads that
    tensor, which may differ from the rounded fp64 value by an ulp), else the fp64 value rounded to
    ``res_dtype`` (the residual's dtype in the call being checked). Always a tuple."""
    if op == "fused_post_pre":
        new = reference.post(*args[:4])
        if new_residual is None:
            read = new.to(res_dtype).to(torch.float64)
        else:
            read = new + (new_residual.detach().to(new.device, torch.float64).reshape(new.shape) - new).detach()
        return (new, *reference.pre(read, *args[4:], **kwargs))
    out = getattr(reference, op)(*args, **kwargs)
    return out if isinstance(out, tuple) else (out,)


def grad_oracle(op: str, args: Sequence[torch.Tensor], kwargs: dict, grads_out: Sequence[torch.Tensor],
                new_residual: torch.Tensor | None = None) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """fp64 outputs and input gradients of ``op``: autograd of :func:`reference_f64` at the values of
    ``args`` (every one upcast exactly to fp64, on its own device: on a GPU the fp64 reference is
    affordable at T = 16384) with the upstream gradients ``grads_out`` (one per output, upcast).
    Returns ``(outputs, gradients of every arg in order)``, both fp64 and detached; the gradient of
    a "sum" input (:data:`GRAD_INPUTS`: hc_scale) comes per token, (m, T), as :func:`sum_error`
    takes it. ``args`` with one token dim (T first). ``new_residual``: fused_post_pre's, as the
    checked call returned it (:func:`reference_f64`)."""
    T = args[0].shape[0]
    leaves = [per_token(a, T) if kind == "sum" else a.detach().to(torch.float64).requires_grad_(True)
              for (_, kind), a in zip(GRAD_INPUTS[op], args)]
    with torch.enable_grad():
        outs = reference_f64(op, leaves, kwargs, args[1].dtype if op == "fused_post_pre" else args[0].dtype,
                             new_residual)
        grads = torch.autograd.grad(outs, leaves, [g.to(torch.float64) for g in grads_out])
    return tuple(o.detach() for o in outs), tuple(g.flatten(1) if kind == "sum" else g
                                                  for (_, kind), g in zip(GRAD_INPUTS[op], grads))


def per_token(hc_scale: torch.Tensor, T: int) -> torch.Tensor:
    """``hc_scale`` (m,) as an fp64 (m, T, 1) leaf: the reference broadcasts each entry over the
    token rows, so autograd returns its gradient per token, (m, T, 1): the terms that
    ``grad_hc_scale`` sums (for :func:`sum_error`)."""
    return hc_scale.detach().to(torch.float64).view(-1, 1, 1).expand(-1, T, 1).clone().requires_grad_(True)


def sum_error(got: torch.Tensor, terms: torch.Tensor) -> float:
    """``max_k |got[k] - sum_t terms[k, t]| / sum_t |terms[k, t]|`` in fp64: the error of a gradient
    that sums T per-token terms (``terms`` (m, T) or (m, T, 1), fp64: :func:`per_token`), against
    the size of what it sums rather than of the sum (see :data:`GRAD_TOLERANCES`, "sum"). ``inf``
    for NaN/inf or a shape mismatch; 0 where every term is zero and ``got`` is too."""
    terms = terms.detach().to(got.device, torch.float64).flatten(1)
    if tuple(got.shape) != (terms.shape[0],) or not torch.isfinite(got).all():
        return math.inf
    err = (got.detach().to(torch.float64) - terms.sum(1)).abs()
    size = terms.abs().sum(1)
    worst = torch.where(size > 0, err / size.clamp_min(torch.finfo(torch.float64).tiny), err)
    return float(worst.max()) if worst.numel() else 0.0


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref||_F / ||ref||_F`` in fp64 (``inf`` for NaN/inf or a shape mismatch; the
    absolute error when ``ref`` is all zero). On ``ref``'s device when ``out`` is there too (a
    GPU's gradients at T = 16384 are GBs), else on the CPU."""
    if tuple(out.shape) != tuple(ref.shape):
        return math.inf
    if out.device == ref.device:
        o, ref = out.detach().to(torch.float64), ref.detach().to(torch.float64)
    else:
        o, ref = _f64(out), _f64(ref)  # both on CPU in fp64, wherever each was computed
    if not torch.isfinite(o).all():
        return math.inf
    if ref.numel() == 0:
        return 0.0
    den = torch.linalg.vector_norm(ref).item()
    num = torch.linalg.vector_norm(o - ref).item()
    return num / den if den > 0 else num


def call(op: str, args: tuple, kwargs: dict, backend: str | None = None) -> tuple[torch.Tensor, ...]:
    """``mhc.<op>(*args, **kwargs, backend=backend)`` as a tuple."""
    import mhc

    out = getattr(mhc, op)(*args, **kwargs, backend=backend)
    return out if isinstance(out, tuple) else (out,)


def compare(op: str, outs: tuple, refs: tuple, dtype: torch.dtype) -> list[tuple[str, float, float]]:
    """``[(output name, rel error, tolerance)]`` for every output of ``op``."""
    tol = TOLERANCES[dtype]
    return [(name, rel_error(o, r), tol[kind]) for (name, kind), o, r in zip(OUTPUTS[op], outs, refs)]


def compare_grads(op: str, grads: Sequence[torch.Tensor], refs: Sequence[torch.Tensor],
                  dtype: torch.dtype) -> list[tuple[str, float, float]]:
    """``[(input name, rel error, tolerance)]`` for the gradient of every input of ``op`` against
    the fp64 ``refs`` (:func:`grad_oracle`), the tolerance from :data:`GRAD_TOLERANCES` for the
    residual's ``dtype`` and the input's kind in :data:`GRAD_INPUTS`. A gradient held in a 16-bit
    dtype (a peer that keeps ``fn`` in bf16 returns its gradient in bf16) is judged by the "act"
    bound: it carries that dtype's rounding (a "sum" one against the summed terms)."""
    tol = GRAD_TOLERANCES[dtype]
    out = []
    for (name, kind), g, r in zip(GRAD_INPUTS[op], grads, refs):
        if g is not None and g.dtype in (torch.bfloat16, torch.float16):
            out.append((name, rel_error(g, r.sum(1) if kind == "sum" else r), tol["act"]))
        else:
            out.append((name, math.inf if g is None else grad_error(kind, g, r), tol[kind]))
    return out


def grad_error(kind: str, got: torch.Tensor, ref: torch.Tensor) -> float:
    """The error that :data:`GRAD_TOLERANCES` bounds for a gradient of ``kind``: :func:`sum_error`
    against the per-token terms ``ref`` for "sum", else :func:`rel_error` against ``ref``."""
    return sum_error(got, ref) if kind == "sum" else rel_error(got, ref)


def token_args(op: str) -> int:
    """How many leading positional arguments of ``op`` carry the token dim (the rest are
    parameters): pre/head take ``residual`` first; post/fused take x, residual, post_mix, comb_mix."""
    return 1 if op in ("pre", "head") else 4


def device_inputs(op: str, T: int, n: int, H: int, device, seed: int = 0,
                  dtype: torch.dtype = torch.bfloat16) -> tuple[tuple, dict]:
    """Random, never-zero inputs for ``mhc.<op>`` with ``T`` tokens, drawn on ``device``.

    The parameters (fn (m, n*H) fp32, hc_scale, hc_base) and the keyword scalars come from
    :func:`make_inputs`; the token-sized tensors follow the same distributions
    (residual (T, n, H) and x (T, H) standard normal in ``dtype``; post_mix (T, n, 1) and
    comb_mix (T, n, n) fp32 are a real reference ``pre`` of another random residual) but are
    drawn by a generator on ``device``: make_inputs draws fp64 on the CPU, which takes minutes
    at T = 16384, H = 7168. Returns ``(args, kwargs)`` for ``mhc.<op>(*args, **kwargs)``.
    """
    device = torch.device(device)
    src = "fused_post_pre" if op in ("post", "fused_post_pre") else op
    base, kw = make_inputs(src, (1,), n, H, dtype, device, seed=seed)
    params = base[token_args(src):]
    g = torch.Generator(device=device).manual_seed(seed + 1)

    def randn(*shape):
        return torch.randn(*shape, generator=g, device=device, dtype=torch.float32).to(dtype)

    if op in ("pre", "head"):
        return (randn(T, n, H), *params), kw
    x, residual = randn(T, H), randn(T, n, H)
    with torch.no_grad():
        post_mix, comb_mix, _ = reference.pre(randn(T, n, H), *params)
    if op == "post":
        return (x, residual, post_mix, comb_mix), {}
    return (x, residual, post_mix, comb_mix, *params), kw


def sample_rows(T: int, device, k: int = 64, seed: int = 0) -> torch.Tensor:
    """Token rows the oracle is evaluated on: all of them for T <= k, else the first and last
    eight and ``k - 16`` others drawn at random (int64 indices on ``device``)."""
    if T <= k:
        return torch.arange(T, device=device)
    g = torch.Generator().manual_seed(seed)
    middle = torch.randperm(T - 16, generator=g)[: k - 16] + 8
    rows = torch.cat([torch.arange(8), middle.sort().values, torch.arange(T - 8, T)])
    return rows.to(device)


def reference_rows(op: str, args: tuple, kwargs: dict, rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """:func:`oracle` (fp64, CPU) on the token ``rows`` of ``args``."""
    k = token_args(op)
    sub = tuple(a.index_select(0, rows) for a in args[:k]) + tuple(args[k:])
    return oracle(op, sub, kwargs)


@dataclasses.dataclass
class Check:
    """The result of one correctness check: ``ok``, a short ``text`` and the largest error."""

    ok: bool
    text: str
    max_err: float


def check_outputs(op: str, outs: Sequence[torch.Tensor], refs: Sequence[torch.Tensor], rows: torch.Tensor,
                  dtype: torch.dtype) -> Check:
    """Compare ``outs`` (full outputs of ``op``) with ``refs`` (the oracle on ``rows``).

    Fails if any output element anywhere is NaN/inf (under :func:`poisoned_outputs`, outputs
    allocated through ``mhc.backends.empty``, Triton's and TileLang's, start as NaN, so this also
    catches elements they never write) or if a sampled output exceeds the tolerance.
    """
    if len(outs) != len(refs):
        return Check(False, f"returned {len(outs)} outputs, expected {len(refs)}", math.inf)
    bad_shape = [name for (name, _), o, r in zip(OUTPUTS[op], outs, refs)
                 if tuple(o.shape[1:]) != tuple(r.shape[1:])]
    if bad_shape:
        return Check(False, "wrong shape: " + ", ".join(bad_shape), math.inf)
    nonfinite = [name for (name, _), o in zip(OUTPUTS[op], outs) if not bool(torch.isfinite(o).all())]
    if nonfinite:
        return Check(False, "NaN/inf (unwritten?) in " + ", ".join(nonfinite), math.inf)
    errs = compare(op, tuple(o.index_select(0, rows) for o in outs), refs, dtype)
    bad = [f"{name} {e:.2e}>{t:g}" for name, e, t in errs if not e <= t]
    worst = max(e for _, e, _ in errs)
    return Check(not bad, "; ".join(bad) if bad else "ok", worst)


def nan_empty(shape, dtype, device) -> torch.Tensor:
    """``torch.empty`` filled with NaN where the dtype is floating point: an allocator for
    ``mhc.backends._ALLOCATOR`` under which an output element a kernel never writes fails the check."""
    t = torch.empty(shape, dtype=dtype, device=device)
    if t.is_floating_point():
        t.fill_(float("nan"))
    return t


@contextlib.contextmanager
def poisoned_outputs():
    """Inside, ``mhc.backends.empty`` returns NaN-filled tensors (:func:`nan_empty`, as the tests'
    conftest does for every test)."""
    import mhc.backends

    saved = mhc.backends._ALLOCATOR
    mhc.backends._ALLOCATOR = nan_empty
    try:
        yield
    finally:
        mhc.backends._ALLOCATOR = saved
