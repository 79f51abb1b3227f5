"""Triton backward kernels for ``pre``, ``head`` and ``post`` (the math: ``mhc/backward.py``), and
their launchers, with the signatures of the torch backend's ``pre_backward``, ``head_backward``
and ``post_backward`` (flattened, contiguous, T >= 1; see ``mhc/autograd.py``).

``post_backward``: one program per token, looping over H: ``grad_x`` and ``grad_residual`` are
elementwise plus an n x n mix; ``grad_post_mix``/``grad_comb_mix`` are reductions over H kept in
registers (no atomics, so the result is deterministic).

``pre_backward``/``head_backward`` read the residual twice, because the forward returns no
intermediate:

1. ``_mix_bwd_kernel``, per block of BM tokens: recompute the prenorm GEMM and sum of squares
   (the mixes), in the same pass the collapse's weight gradient ``g_w[i] = g_out . x_i``; then the
   activations' backward (sigmoid derivatives; for pre also Sinkhorn's backward) gives
   ``g_a = dL/d(mixes*scale+base)``. It writes ``g_mixes = g_a*scale`` (T, m), the rsqrt factor
   ``r`` and the RMS coefficient ``(g_mixes . mixes) r^2 / K`` per token, the collapse weights,
   and per-block partial sums for ``grad_hc_base`` and ``grad_hc_scale`` (summed by torch after:
   (blocks, m+3) floats, deterministic).
2. ``_res_bwd_kernel``, per (stream, BK hidden slice), looping over all tokens:
   ``grad_residual = w * g_out + r * (g_mixes @ fn) - coef * x`` and
   ``grad_fn[:, slice] = sum_t (g_mixes * r)^T x`` accumulated in registers (no atomics).

Sinkhorn's backward *recomputes* the iterations from the recomputed logits, in registers: to
step back through normalisation k it replays the forward from the softmax up to step k
(O(repeat^2) n x n steps a token: about 800 at repeat=20, a few thousand flops a token, nothing
next to the GEMM), with the forward's own steps (``kernels._sk_softmax``, ``kernels._sk_norm``)
on the same in-thread tuple form; the activations are ``kernels._logit`` and ``_pre_weight``.
Storing the iterates instead would need a (T, 2*repeat, n, n) scratch buffer (2.5 KB a token,
round-tripping through memory) or dynamic register indexing, which Triton lacks.

Every load is cast to fp32 right after ``tl.load``; dots are fp32 (``ieee``: the gradient of fn
sums T products, TF32's 10-bit mantissa would cost ~1e-3).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mhc.backends import device_guard, empty
from mhc.backends.triton.kernels import (_elems, _logit, _pre_weight, _rms_factor, _sk_norm, _sk_scale,
                                         _sk_softmax, _sk_sums)
from mhc.backends.triton.launch import COMPILE_OPTIONS

# --- Sinkhorn backward ------------------------------------------------------------------------------


@triton.jit
def _sk_centre(g, w, ROWS: tl.constexpr, N: tl.constexpr, NP: tl.constexpr):
    """``g - sum(g * w)`` along each row (``ROWS``) or column, in the tuple form (padding passes):
    the backward of a normalisation (w: its output) and of the softmax (w: the softmax, rows)."""
    gw = ()
    for k in tl.static_range(NP * NP):
        gw = gw + (g[k] * w[k],)
    d = _sk_sums(gw, ROWS, N, NP)
    out = ()
    for i in tl.static_range(NP):
        for j in tl.static_range(NP):
            if (i < N) & (j < N):
                out = out + (g[i * NP + j] - (d[i] if ROWS else d[j]),)
            else:
                out = out + (g[i * NP + j],)
    return out


@triton.jit
def _sk_norm_bwd(y, g, eps, ROWS: tl.constexpr, N: tl.constexpr, NP: tl.constexpr):
    """``dL/dy`` for one normalisation ``out = kernels._sk_norm(y, ROWS)`` given ``g = dL/dout``
    (tuple form): ``(g - sum(g * out along the row or column)) / (sum(y) + eps)``."""
    out, r = _sk_norm(y, eps, ROWS, N, NP)
    return _sk_scale(_sk_centre(g, out, ROWS, N, NP), r, ROWS, N, NP)


@triton.jit
def _sinkhorn_bwd(c, g, repeat, eps, N: tl.constexpr, NP: tl.constexpr):
    """``dL/dc`` for ``comb = kernels._sinkhorn(c)`` given ``g = dL/dcomb``, both in the tuple form
    (entries with i or j >= N pass through). The forward's steps are replayed with its own
    helpers: normalisation k is a column step at even k, a row step at odd k; to step back
    through normalisation k, its input is recomputed from ``softmax + eps``.
    """
    p, a0 = _sk_softmax(c, eps, N, NP)
    # Back through normalisations 2m (columns) and 2m-1 (rows), m = repeat-1 .. 1; then 0.
    m = repeat - 1
    while m > 0:  # while, not range: the interpreter cannot take a run-time range bound
        yr, _ = _sk_norm(a0, eps, False, N, NP)  # the input of step 1
        t = 1
        while t < m:  # -> the input of step 2m-1
            yr, _ = _sk_norm(yr, eps, True, N, NP)
            yr, _ = _sk_norm(yr, eps, False, N, NP)
            t += 1
        yc, _ = _sk_norm(yr, eps, True, N, NP)  # the input of step 2m
        g = _sk_norm_bwd(yc, g, eps, False, N, NP)
        g = _sk_norm_bwd(yr, g, eps, True, N, NP)
        m -= 1
    g = _sk_norm_bwd(a0, g, eps, False, N, NP)
    # the softmax over j: dL/dc = p * (g - sum_j g * p); the + eps passes g through
    g = _sk_centre(g, p, True, N, NP)
    out = ()
    for k in tl.static_range(NP * NP):
        out = out + (p[k] * g[k],)  # padding: never read
    return out


# --- pre / head backward ------------------------------------------------------------------------------


@triton.jit
def _mix_bwd_kernel(res_ptr, fn_ptr, gout_ptr, gpm_ptr, gcm_ptr, scale_ptr, base_ptr,
                    gmix_ptr, r_ptr, coef_ptr, w_ptr, part_ptr,
                    T, H, rms_eps, w_eps, sk_eps, post_mult, repeat,
                    N: tl.constexpr, N3: tl.constexpr, N3P: tl.constexpr, NP: tl.constexpr,
                    HEAD: tl.constexpr, BM: tl.constexpr, BH: tl.constexpr):
    """Stage 1 of pre/head backward for tokens ``[pid*BM, pid*BM + BM)`` (see the module doc).

    ``res`` (T, N, H); ``fn`` (N3, N*H); ``gout`` (T, H) the layer_input / head gradient;
    ``gpm`` (T, N), ``gcm`` (T, N, N) (pre only); ``scale`` (3,) or (1,); ``base`` (N3,).
    Writes ``gmix`` (T, N3), ``r`` (T,), ``coef`` (T,), ``w`` (T, N) and ``part`` (blocks, N3+3).
    """
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BM + tl.arange(0, BM)  # int64: rows * K passes 2**31 at large T
    rmask = rows < T
    cols = tl.arange(0, N3P)
    cmask = cols < N3
    K = N * H
    acc = tl.zeros((BM, N3P), dtype=tl.float32)
    ssq = tl.zeros((BM,), dtype=tl.float32)
    gw = tl.zeros((BM, NP), dtype=tl.float32)
    streams = tl.arange(0, NP)[None, :]
    for i in tl.static_range(N):
        h0 = 0
        while h0 < H:  # while, not range: the interpreter cannot take a run-time range bound
            hs = h0 + tl.arange(0, BH)
            hmask = hs < H
            m2 = rmask[:, None] & hmask[None, :]
            x = tl.load(res_ptr + rows[:, None] * K + i * H + hs[None, :], mask=m2, other=0.0).to(tl.float32)
            w = tl.load(fn_ptr + cols[None, :] * K + i * H + hs[:, None], mask=cmask[None, :] & hmask[:, None],
                        other=0.0).to(tl.float32)
            go = tl.load(gout_ptr + rows[:, None] * H + hs[None, :], mask=m2, other=0.0).to(tl.float32)
            acc = tl.dot(x, w, acc, input_precision="ieee")
            ssq += tl.sum(x * x, axis=1)
            gw += tl.where(streams == i, tl.sum(x * go, axis=1)[:, None], 0.0)
            h0 += BH
    r = _rms_factor(ssq, K, rms_eps)
    mixes = acc * r[:, None]
    # per-column scale: hc_scale[0] for the first N columns, [1] for the next N, [2] for comb
    group = tl.where(cols < N, 0, tl.where(cols < 2 * N, 1, 2))
    if HEAD:
        group = group * 0
    s_col = tl.load(scale_ptr + group).to(tl.float32)
    base = tl.load(base_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    a = _logit(acc, r[:, None], s_col[None, :], base[None, :])
    sig = tl.sigmoid(a)
    dsig = sig * (1.0 - sig)
    # the collapse weights' gradient, spread onto the first N columns
    colx = cols[None, :, None]
    gw_cols = tl.sum(tl.where(colx == tl.arange(0, NP)[None, None, :], gw[:, None, :], 0.0), axis=2)
    g_a = tl.where(cols[None, :] < N, gw_cols * dsig, 0.0)
    # pre's / head's collapse weights, on the first N columns
    wts = _pre_weight(acc, r[:, None], s_col[None, :], base[None, :], w_eps)
    if not HEAD:
        pcols = cols - N
        pmask = (cols >= N) & (cols < 2 * N)
        gpm = tl.load(gpm_ptr + rows[:, None] * N + pcols[None, :], mask=rmask[:, None] & pmask[None, :],
                      other=0.0).to(tl.float32)
        g_a += tl.where(pmask[None, :], gpm * post_mult * dsig, 0.0)
        # comb: column 2N + i*N + j <-> entry i*NP + j of Sinkhorn's tuple form (kernels._elems)
        a_col = _elems(a, BM, N3P)
        c = ()
        gc = ()
        for i in tl.static_range(NP):
            for j in tl.static_range(NP):
                if (i < N) & (j < N):
                    c = c + (a_col[2 * N + i * N + j],)
                    gc = gc + (tl.load(gcm_ptr + rows * (N * N) + i * N + j, mask=rmask, other=0.0).to(tl.float32),)
                else:  # padding: passes through
                    c = c + (a_col[0],)
                    gc = gc + (a_col[0],)
        gl = _sinkhorn_bwd(c, gc, repeat, sk_eps, N, NP)
        for i in tl.static_range(N):
            for j in tl.static_range(N):
                g_a += tl.where(cols[None, :] == 2 * N + i * N + j, gl[i * NP + j][:, None], 0.0)
    g_a = tl.where(rmask[:, None] & cmask[None, :], g_a, 0.0)
    g_mix = g_a * s_col[None, :]
    coef = tl.sum(g_mix * mixes, axis=1) * r * r / K
    tl.store(gmix_ptr + rows[:, None] * N3 + cols[None, :], g_mix, mask=rmask[:, None] & cmask[None, :])
    tl.store(r_ptr + rows, r, mask=rmask)
    tl.store(coef_ptr + rows, coef, mask=rmask)
    tl.store(w_ptr + rows[:, None] * N + cols[None, :], wts, mask=rmask[:, None] & (cols[None, :] < N))
    # partial sums: dL/dbase per column, then dL/dscale per group
    tl.store(part_ptr + pid * (N3 + 3) + cols, tl.sum(g_a, axis=0), mask=cmask)
    ga_m = tl.sum(g_a * mixes, axis=0)
    for k in tl.static_range(3):
        tl.store(part_ptr + pid * (N3 + 3) + N3 + k, tl.sum(tl.where(group == k, ga_m, 0.0), axis=0))


@triton.jit
def _res_bwd_kernel(res_ptr, fn_ptr, gout_ptr, gmix_ptr, r_ptr, coef_ptr, w_ptr, gres_ptr, gfn_ptr,
                    T, H, N: tl.constexpr, N3: tl.constexpr, N3P: tl.constexpr,
                    NEED_RES: tl.constexpr, NEED_FN: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr):
    """Stage 2 for stream ``i`` and hidden slice ``[hb*BK, hb*BK + BK)`` (program ``i*cdiv(H, BK) + hb``),
    looping over every token: writes ``gres`` (T, N, H) there and ``gfn[:, i*H + slice]``."""
    pid = tl.program_id(0)
    nhb = tl.cdiv(H, BK)
    i = pid // nhb
    hs = (pid % nhb) * BK + tl.arange(0, BK)
    hmask = hs < H
    K = N * H
    cols = tl.arange(0, N3P)
    cmask = cols < N3
    fn_blk = tl.load(fn_ptr + cols[:, None] * K + i * H + hs[None, :], mask=cmask[:, None] & hmask[None, :],
                     other=0.0).to(tl.float32)
    gfn = tl.zeros((N3P, BK), dtype=tl.float32)
    t0 = tl.zeros((), dtype=tl.int64)  # int64: rows * K passes 2**31 at large T
    while t0 < T:
        rows = t0 + tl.arange(0, BM)
        rmask = rows < T
        m2 = rmask[:, None] & hmask[None, :]
        x = tl.load(res_ptr + rows[:, None] * K + i * H + hs[None, :], mask=m2, other=0.0).to(tl.float32)
        gm = tl.load(gmix_ptr + rows[:, None] * N3 + cols[None, :], mask=rmask[:, None] & cmask[None, :],
                     other=0.0).to(tl.float32)
        r = tl.load(r_ptr + rows, mask=rmask, other=0.0)
        gz = gm * r[:, None]
        if NEED_FN:
            gfn = tl.dot(tl.trans(gz), x, gfn, input_precision="ieee")
        if NEED_RES:
            go = tl.load(gout_ptr + rows[:, None] * H + hs[None, :], mask=m2, other=0.0).to(tl.float32)
            wi = tl.load(w_ptr + rows * N + i, mask=rmask, other=0.0)
            coef = tl.load(coef_ptr + rows, mask=rmask, other=0.0)
            gx = wi[:, None] * go + tl.dot(gz, fn_blk, input_precision="ieee") - coef[:, None] * x
            tl.store(gres_ptr + rows[:, None] * K + i * H + hs[None, :], gx.to(gres_ptr.dtype.element_ty), mask=m2)
        t0 += BM
    if NEED_FN:
        tl.store(gfn_ptr + cols[:, None] * K + i * H + hs[None, :], gfn, mask=cmask[:, None] & hmask[None, :])


# --- post backward -------------------------------------------------------------------------------------


@triton.jit
def _post_bwd_kernel(g_ptr, x_ptr, res_ptr, pm_ptr, cm_ptr, gx_ptr, gres_ptr, gpm_ptr, gcm_ptr, H,
                     N: tl.constexpr, NP: tl.constexpr, NEED_X: tl.constexpr, NEED_RES: tl.constexpr,
                     NEED_PM: tl.constexpr, NEED_CM: tl.constexpr, BH: tl.constexpr):
    """Token ``t = program_id(0)``: ``grad_x = sum_j pm[j] g[j]``, ``grad_residual[i] = sum_j cm[i, j] g[j]``,
    ``grad_post_mix[j] = g[j] . x``, ``grad_comb_mix[i, j] = residual[i] . g[j]``."""
    t = tl.program_id(0).to(tl.int64)
    st = tl.arange(0, NP)
    smask = st < N
    if NEED_X:
        pm = tl.load(pm_ptr + t * N + st, mask=smask, other=0.0).to(tl.float32)
    if NEED_RES:
        cm = tl.load(cm_ptr + t * N * N + st[:, None] * N + st[None, :], mask=smask[:, None] & smask[None, :],
                     other=0.0).to(tl.float32)
    acc_pm = tl.zeros((NP,), dtype=tl.float32)
    acc_cm = tl.zeros((NP, NP), dtype=tl.float32)
    h0 = 0
    while h0 < H:
        hs = h0 + tl.arange(0, BH)
        hmask = hs < H
        m2 = smask[:, None] & hmask[None, :]
        g = tl.load(g_ptr + t * N * H + st[:, None] * H + hs[None, :], mask=m2, other=0.0).to(tl.float32)
        if NEED_X:
            tl.store(gx_ptr + t * H + hs, tl.sum(pm[:, None] * g, axis=0).to(gx_ptr.dtype.element_ty), mask=hmask)
        if NEED_RES:
            gr = tl.sum(cm[:, :, None] * g[None, :, :], axis=1)
            tl.store(gres_ptr + t * N * H + st[:, None] * H + hs[None, :], gr.to(gres_ptr.dtype.element_ty), mask=m2)
        if NEED_PM:
            x = tl.load(x_ptr + t * H + hs, mask=hmask, other=0.0).to(tl.float32)
            acc_pm += tl.sum(g * x[None, :], axis=1)
        if NEED_CM:
            r = tl.load(res_ptr + t * N * H + st[:, None] * H + hs[None, :], mask=m2, other=0.0).to(tl.float32)
            acc_cm += tl.sum(r[:, None, :] * g[None, :, :], axis=2)
        h0 += BH
    if NEED_PM:
        tl.store(gpm_ptr + t * N + st, acc_pm, mask=smask)
    if NEED_CM:
        tl.store(gcm_ptr + t * N * N + st[:, None] * N + st[None, :], acc_cm, mask=smask[:, None] & smask[None, :])


# --- launchers -----------------------------------------------------------------------------------------


def configs(n: int, H: int, T: int) -> dict:
    """Launch parameters (the one heuristic of this module). ``bm``: tokens per stage-1 program and
    per stage-2 step (>= 16, the tl.dot minimum); ``bh``: stage-1 hidden step; ``bk``: stage-2
    hidden slice per program (n*H/bk programs, each looping over T); ``post_bh``: post's step.
    Not tuned on hardware yet: sizes that keep every register tile under ~16K fp32 elements."""
    return dict(bm=16 if T <= 1024 else 32, bh=64, bk=64, post_bh=256 if H >= 256 else 64,
                num_warps=4)


def mix_specializations(n: int, H: int, T: int, head: bool, need_res: bool = True,
                        need_fn: bool = True) -> tuple[dict, dict, int]:
    """Compile-time constants of ``_mix_bwd_kernel`` and of ``_res_bwd_kernel`` for pre
    (``head`` False) or head backward with n streams, hidden size H, T tokens, and their
    ``num_warps``: what the launcher passes and what ``aot.py`` builds."""
    cfg = configs(n, H, T)
    m = n if head else 2 * n + n * n
    n3p = max(16, triton.next_power_of_2(m))
    mix = dict(N=n, N3=m, N3P=n3p, NP=max(2, triton.next_power_of_2(n)), HEAD=head, BM=cfg["bm"], BH=cfg["bh"])
    res = dict(N=n, N3=m, N3P=n3p, NEED_RES=need_res, NEED_FN=need_fn, BM=cfg["bm"], BK=cfg["bk"])
    return mix, res, cfg["num_warps"]


def post_specialization(n: int, H: int, T: int, output_mask=(True, True, True, True)) -> tuple[dict, int]:
    """Compile-time constants of ``_post_bwd_kernel`` for n streams, hidden size H, T tokens and
    the gradients asked for (``output_mask``: x, residual, post_mix, comb_mix), and its ``num_warps``."""
    cfg = configs(n, H, T)
    need_x, need_res, need_pm, need_cm = (bool(b) for b in output_mask)
    return dict(N=n, NP=max(2, triton.next_power_of_2(n)), NEED_X=need_x, NEED_RES=need_res, NEED_PM=need_pm,
                NEED_CM=need_cm, BH=cfg["post_bh"]), cfg["num_warps"]


def _mix_backward(g_pm, g_cm, g_out, residual, fn, hc_scale, hc_base, rms_eps, w_eps, sk_eps, post_mult,
                  repeat, mask, head):
    T, n, H = residual.shape
    m = fn.shape[0]
    dev = residual.device
    need_res, need_fn, need_scale, need_base = mask
    mix_spec, res_spec, warps = mix_specializations(n, H, T, head, bool(need_res), bool(need_fn))
    bm = mix_spec["BM"]
    blocks = triton.cdiv(T, bm)
    f32 = torch.float32
    gmix, r, coef = empty((T, m), f32, dev), empty((T,), f32, dev), empty((T,), f32, dev)
    w, part = empty((T, n), f32, dev), empty((blocks, m + 3), f32, dev)
    g_res = empty((T, n, H), residual.dtype, dev) if need_res else None
    g_fn = empty(fn.shape, f32, dev) if need_fn else None
    with device_guard(dev):
        _mix_bwd_kernel[(blocks,)](
            residual, fn, g_out, g_out if head else g_pm, g_out if head else g_cm, hc_scale, hc_base,
            gmix, r, coef, w, part, T, H, rms_eps, w_eps, sk_eps, post_mult, repeat,
            num_warps=warps, **mix_spec, **COMPILE_OPTIONS)
        if need_res or need_fn:
            _res_bwd_kernel[(n * triton.cdiv(H, res_spec["BK"]),)](
                residual, fn, g_out, gmix, r, coef, w, g_res if need_res else gmix, g_fn if need_fn else gmix,
                T, H, num_warps=warps, **res_spec, **COMPILE_OPTIONS)
        sums = part.sum(0)
    g_base = sums[:m].clone() if need_base else None
    g_scale = sums[m:m + hc_scale.shape[0]].clone() if need_scale else None
    return g_res, g_fn, g_scale, g_base


def pre_backward(grad_post_mix, grad_comb_mix, grad_layer_input, residual, fn, hc_scale, hc_base, rms_eps,
                 hc_pre_eps, hc_sinkhorn_eps, hc_post_mult_value, sinkhorn_repeat, output_mask):
    """As ``mhc.backward.pre_backward`` (shapes and dtypes there), in two Triton kernels."""
    return _mix_backward(grad_post_mix, grad_comb_mix, grad_layer_input, residual, fn, hc_scale, hc_base,
                         rms_eps, hc_pre_eps, hc_sinkhorn_eps, hc_post_mult_value, sinkhorn_repeat, output_mask,
                         head=False)


def head_backward(grad_out, residual, fn, hc_scale, hc_base, rms_eps, hc_eps, output_mask):
    """As ``mhc.backward.head_backward`` (shapes and dtypes there), in two Triton kernels."""
    return _mix_backward(None, None, grad_out, residual, fn, hc_scale, hc_base, rms_eps, hc_eps, 0.0, 0.0, 1,
                         output_mask, head=True)


def post_backward(grad_out, x, residual, post_mix, comb_mix, output_mask):
    """As ``mhc.backward.post_backward`` (shapes, dtypes and which input each gradient needs
    there), in one Triton kernel."""
    T, n, H = grad_out.shape
    dev = grad_out.device
    need_x, need_res, need_pm, need_cm = (bool(b) for b in output_mask)
    g_x = empty((T, H), grad_out.dtype, dev) if need_x else None
    g_res = empty((T, n, H), grad_out.dtype, dev) if need_res else None
    g_pm = empty((T, n, 1), torch.float32, dev) if need_pm else None
    g_cm = empty((T, n, n), torch.float32, dev) if need_cm else None
    spec, warps = post_specialization(n, H, T, output_mask)

    def ptr(t):  # absent tensors are never touched (their NEED_* is false): pass any pointer
        return grad_out if t is None else t

    with device_guard(dev):
        _post_bwd_kernel[(T,)](
            grad_out, ptr(x), ptr(residual), ptr(post_mix), ptr(comb_mix), ptr(g_x), ptr(g_res), ptr(g_pm),
            ptr(g_cm), H, num_warps=warps, **spec, **COMPILE_OPTIONS)
    return g_x, g_res, g_pm, g_cm
