"""Triton backward kernels for ``pre``, ``head``, ``post`` and ``fused_post_pre`` (the math:
``mhc/backward.py``), and their launchers, with the signatures of the torch backend's backward
functions (flattened, contiguous, T >= 1; see ``mhc/autograd.py``).

``pre_backward`` / ``head_backward`` (and ``fused_post_pre_backward``) read the residual three
times: the weight gradients of the collapse need a full pass over it before ``grad_residual`` can
be written, and ``grad_fn`` has a pass of its own. Five launches (fused_post_pre six: its
grad_residual pass adds the new residual's own upstream gradient, then ``post_backward`` runs on
that sum):

1. ``kernels.prep_kernel`` splits ``fn`` into bf16 hi and lo rows, as the forward does.
2. :func:`_bwd_stats_kernel`, per (block of BM tokens, split of the hidden axis), every stream:
   the prenorm GEMM (the mixes, recomputed), the sum of squares, the collapse's weight gradient
   ``c_i = g . x_i`` (``g`` the upstream gradient, times the norm weight with the fused RMSNorm)
   and, with the fused RMSNorm, the Gram matrix ``x_i . x_j`` of the streams (what the norm's
   backward needs of the collapse ``y = sum_i w_i x_i`` before the weights w are known:
   ``|y|^2 = w^T G w``, ``y . x_i = (G w)_i``). Written as fp32 partials per split.
3. :func:`_bwd_tail_kernel`, per BT tokens: reduces the partials in a fixed order, applies the
   activations' backward (sigmoid derivatives; for pre also Sinkhorn's backward) and writes per
   token ``gz = dL/dmixes * r`` (the rsqrt factor r), split in bf16 hi and lo parts side by side
   (the dot operands of stages 4 and 5 as they load them), the collapse weights, the RMS coefficient
   and the norm's two factors; and per-block sums for ``grad_hc_base`` / ``grad_hc_scale``.
4. :func:`_bwd_gres_kernel`, one tile of tokens x hidden columns a program:
   ``grad_residual_i = w_i g_y + gz @ fn_i - coef x_i``, and ``grad_norm_weight``'s partial.
5. :func:`_bwd_gfn_kernel`: ``grad_fn = gz^T x`` per chunk of tokens, a pipelined GEMM whose
   gz operand comes pre-split from stage 3: one bf16 dot a step of the stacked [hi | lo] rows.

Why a pass of its own for grad_fn: one looping pass did both (4) and (5) once, its grad_fn
accumulators holding it at one CTA an SM with too few bytes in flight; a looping pass per stream
(accumulators of one stream) was slower still. fused_post_pre's post backward once ran in that
pass's registers too, so that the new residual's gradient never went through memory; the round
trip and ``post_backward`` cost less. Figures: docs/tuning/triton.md, "Backward".

The launchers take their config and kernels from a launch plan (:func:`backward_plan`, in
:data:`mhc.plans.PLANS`) and launch through :class:`~mhc.backends.triton.direct.DirectKernel`'s
keyed launch, as the forward's do: a warm call derives no config and skips ``JITFunction.run``.

Every reduction over tokens is deterministic: partials per split, block or chunk, summed in a
fixed order (by the tail kernel, or ``torch.sum`` over the partials' first axis), no atomics.

Precision: the GEMMs run on bf16 tensor cores with fp32 accumulation, each fp32 operand split in
bf16 hi + lo (about 16 mantissa bits; the residual is exact in bf16, an fp16 one is split too),
as the forward's prenorm GEMM: no TF32. ``grad_fn`` sums T products of such operands in fp32.

Sinkhorn's backward *recomputes* the iterations from the recomputed logits, in registers: to
step back through normalisation k it replays the forward from the softmax up to step k
(O(repeat^2) n x n steps a token: about 800 at repeat=20, nothing next to the GEMM), with the
forward's own steps (``kernels._sk_softmax``, ``kernels._sk_norm``) on the same in-thread tuple
form. Storing the iterates instead would need a (T, 2*repeat, n, n) scratch buffer or dynamic
register indexing, which Triton lacks.

``post_backward``: one tile of a token's hidden block a program: ``grad_x`` and ``grad_residual``
are elementwise plus an n x n mix; ``grad_post_mix``/``grad_comb_mix`` are written as per-block
partials and summed by torch in a fixed order (no atomics).

Every load is cast to fp32 before arithmetic; ``INTERPRET`` (Triton's interpreter, which
mishandles bf16 dots) runs each split GEMM as one fp32 dot of the re-assembled operands.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from mhc.backends import device_guard, empty
from mhc.backends.triton.kernels import (_elems, _grid_order, _logit, _rms_factor, _sk_norm, _sk_scale,
                                         _sk_softmax, _sk_sums, _to_act, prep_kernel)
from mhc.backends.triton import configs as _configs
from mhc.backends.triton.direct import DirectKernel, int_spec
from mhc.backends.triton.launch import INTERPRETED, _cdiv, _kernel, device_shared_memory, prep_block
from mhc.plans import PLANS, t_bucket
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


# --- shared pieces ------------------------------------------------------------------------------------


@triton.jit
def _col(tile, col, k):
    """Column ``k`` of a [B, W] tile as a [B] vector (``col``: ``tl.arange(0, W)``)."""
    return tl.sum(tl.where(col[None, :] == k, tile, 0.0), axis=1)


@triton.jit
def _put(tile, col, k, v):
    """The [B, W] tile with column ``k`` replaced by the [B] vector ``v``."""
    return tl.where(col[None, :] == k, v[:, None], tile)


@triton.jit
def _split(v, INTERPRET: tl.constexpr):
    """An fp32 tile as bf16 ``(hi, lo)``, ``lo = bf16(v - hi)``: ~16 mantissa bits together."""
    hi = _to_act(v, tl.bfloat16, INTERPRET)
    return hi, _to_act(v - hi.to(tl.float32), tl.bfloat16, INTERPRET)


@triton.jit
def _dot_hl(a_hi, a_lo, b_hi, b_lo, acc, A_LO: tl.constexpr, B_LO: tl.constexpr, INTERPRET: tl.constexpr):
    """``acc + (a_hi + a_lo) @ (b_hi + b_lo)`` on bf16 tensor cores, without the lo x lo term;
    ``A_LO``/``B_LO`` false: that operand is exact in bf16 and its lo part is not read."""
    if INTERPRET:
        a = a_hi.to(tl.float32)
        if A_LO:
            a += a_lo.to(tl.float32)
        b = b_hi.to(tl.float32)
        if B_LO:
            b += b_lo.to(tl.float32)
        return acc + tl.dot(a, b, input_precision="ieee")
    acc = tl.dot(a_hi, b_hi, acc)
    if B_LO:
        acc = tl.dot(a_hi, b_lo, acc)
    if A_LO:
        acc = tl.dot(a_lo, b_hi, acc)
    return acc


@triton.jit
def _dot_bf(a, b, acc, INTERPRET: tl.constexpr):
    """``acc + a @ b`` for bf16 ``a`` and ``b`` on tensor cores (fp32 accumulation)."""
    if INTERPRET:
        return acc + tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _gram(i, j, N: tl.constexpr):
    """Index of the pair i <= j among the upper triangle of an N x N matrix, row by row."""
    return i * N - (i * (i - 1)) // 2 + (j - i)


# --- pre / head backward ------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["T"])
def _bwd_stats_kernel(res_ptr, fnp_ptr, gout_ptr, nw_ptr, part_ptr, T, H,
                      N: tl.constexpr, NP: tl.constexpr, N3: tl.constexpr, SP: tl.constexpr, GP: tl.constexpr,
                      NORM: tl.constexpr, BM: tl.constexpr, BH: tl.constexpr, STEPS: tl.constexpr,
                      EXACT_BF16: tl.constexpr, INTERPRET: tl.constexpr):
    """Stage 2 (module doc) for tokens [tb*BM, tb*BM + BM) and hidden columns
    [s*STEPS*BH, (s+1)*STEPS*BH) of every stream (program ``tb * n_splits + s``).

    ``res`` (T, N, H); ``fnp`` (2*SP, N*H) bf16 fn hi rows then lo rows (``prep_kernel``; rows
    past N3 zero); ``gout`` (T, H) the upstream gradient of the collapse; ``nw`` (H,) the norm
    weight (``NORM``). Writes ``part[s, t, :]`` (SP fp32): columns [0, N3) ``x . fn_c``; then
    without NORM ``N3``: the sum of squares, ``N3+1+i``: ``g . x_i``; with NORM ``N3+i``:
    ``(g*nw) . x_i`` and ``N3+N+_gram(i, j)``: ``x_i . x_j`` (i <= j).
    """
    n_s = tl.cdiv(H, STEPS * BH)
    pid = tl.program_id(0)
    tb = pid // n_s
    s = pid % n_s
    rows = tb * BM + tl.arange(0, BM)
    r_ok = rows < T
    rows = rows.to(tl.int64)  # rows * K passes 2**31 at large T
    K = N * H
    col = tl.arange(0, SP)
    sc = tl.arange(0, NP)
    gc = tl.arange(0, GP)
    acc = tl.zeros([BM, SP], dtype=tl.float32)
    ssq = tl.zeros([BM], dtype=tl.float32)
    cg = tl.zeros([BM, NP], dtype=tl.float32)
    gram = tl.zeros([BM, GP], dtype=tl.float32)
    for step in range(0, STEPS):
        h = (s * STEPS + step) * BH + tl.arange(0, BH)
        h_ok = h < H
        m2 = r_ok[:, None] & h_ok[None, :]
        g = tl.load(gout_ptr + rows[:, None] * H + h[None, :], mask=m2, other=0.0).to(tl.float32)
        if NORM:
            g = g * tl.load(nw_ptr + h, mask=h_ok, other=0.0).to(tl.float32)[None, :]
        xs = ()
        for i in tl.static_range(N):
            x = tl.load(res_ptr + rows[:, None] * K + i * H + h[None, :], mask=m2, other=0.0)
            xf = x.to(tl.float32)
            x_hi, x_lo = _split(xf, INTERPRET)
            w_off = col[None, :] * K + i * H + h[:, None]
            w_hi = tl.load(fnp_ptr + w_off, mask=h_ok[:, None], other=0.0)
            w_lo = tl.load(fnp_ptr + SP * K + w_off, mask=h_ok[:, None], other=0.0)
            acc = _dot_hl(x_hi, x_lo, w_hi, w_lo, acc, not EXACT_BF16, True, INTERPRET)
            cg += tl.where(sc[None, :] == i, tl.sum(xf * g, axis=1)[:, None], 0.0)
            if NORM:
                xs = xs + (xf,)
            else:
                ssq += tl.sum(xf * xf, axis=1)
        if NORM:
            for i in tl.static_range(N):
                for j in tl.static_range(i, N):
                    gram += tl.where(gc[None, :] == _gram(i, j, N), tl.sum(xs[i] * xs[j], axis=1)[:, None], 0.0)
    # fn's rows past N3 are zero: acc's columns there are free for the per-token sums
    if NORM:
        for i in tl.static_range(N):
            acc = _put(acc, col, N3 + i, _col(cg, sc, i))
        for q in tl.static_range(N * (N + 1) // 2):
            acc = _put(acc, col, N3 + N + q, _col(gram, gc, q))
    else:
        acc = _put(acc, col, N3, ssq)
        for i in tl.static_range(N):
            acc = _put(acc, col, N3 + 1 + i, _col(cg, sc, i))
    tl.store(part_ptr + s.to(tl.int64) * T * SP + rows[:, None] * SP + col[None, :], acc, mask=r_ok[:, None])


@triton.jit(do_not_specialize=["T", "n_splits"])
def _bwd_tail_kernel(part_ptr, n_splits, gpm_ptr, gcm_ptr, scale_ptr, base_ptr, gz_ptr, tok_ptr, sums_ptr,
                     T, H, rms_eps, w_eps, sk_eps, post_mult, repeat, norm_eps,
                     N: tl.constexpr, NP: tl.constexpr, N3: tl.constexpr, N3P: tl.constexpr, SP: tl.constexpr,
                     STW: tl.constexpr, TW: tl.constexpr, HEAD: tl.constexpr, NORM: tl.constexpr, BT: tl.constexpr,
                     INTERPRET: tl.constexpr):
    """Stage 3 (module doc) for tokens [pid*BT, pid*BT + BT): sums the ``n_splits`` partials of
    :func:`_bwd_stats_kernel` in order (the mix columns as a [BT, N3P] tile, the per-token sums
    after them as a [BT, STW] one), then the activations' backward.

    ``gpm`` (T, N), ``gcm`` (T, N, N) fp32: the upstream gradients of post_mix and comb_mix
    (pre only); ``scale`` (3,) or (1,), ``base`` (N3,). Writes ``gz`` (T, 2*N3P) bf16:
    ``dL/dmixes * r`` (zero past N3) split in hi (columns [0, N3P)) and lo (columns [N3P, 2*N3P))
    parts, the dot operands of stages 4 and 5 as they load them; ``tok`` (T, TW):
    the collapse weights w_i at [0, N), the RMS coefficient ``(dL/dmixes . mixes) r^2 / K`` at N,
    and with NORM the norm's ``alpha = r_y`` at N+1 and ``beta = r_y^3 (g_u . y) / H`` at N+2
    (``g_y = alpha * g * nw - beta * y``); ``sums`` (blocks, N3+3): this block's sums of
    ``dL/d(logit)`` per column, then of ``dL/d(logit) * mixes`` per hc_scale group.
    """
    pid = tl.program_id(0)
    rows = pid * BT + tl.arange(0, BT)
    r_ok = rows < T
    rows = rows.to(tl.int64)
    K = N * H
    col = tl.arange(0, N3P)
    cm = col < N3
    scol = tl.arange(0, STW)
    p = tl.zeros([BT, N3P], dtype=tl.float32)
    q = tl.zeros([BT, STW], dtype=tl.float32)
    s = tl.zeros((), dtype=tl.int64)
    while s < n_splits:  # while, not range: the interpreter cannot take a run-time range bound
        blk = part_ptr + s * T * SP + rows[:, None] * SP
        p += tl.load(blk + col[None, :], mask=r_ok[:, None] & cm[None, :], other=0.0)
        q += tl.load(blk + N3 + scol[None, :], mask=r_ok[:, None] & (N3 + scol < SP)[None, :], other=0.0)
        s += 1
    if NORM:  # q: c_i at i, the Gram matrix at N + _gram(i, j)
        ssq = _col(q, scol, N)
        for i in tl.static_range(1, N):
            ssq += _col(q, scol, N + _gram(i, i, N))
    else:  # q: the sum of squares at 0, c_i at 1 + i
        ssq = _col(q, scol, 0)
    r = _rms_factor(ssq, K, rms_eps)
    # per-column scale: hc_scale[0] for the first N columns, [1] for the next N, [2] for comb
    group = tl.where(col < N, 0, tl.where(col < 2 * N, 1, 2))
    if HEAD:
        group = group * 0
    s_col = tl.load(scale_ptr + group, mask=cm, other=0.0).to(tl.float32)
    base = tl.load(base_ptr + col, mask=cm, other=0.0).to(tl.float32)
    mixes = p * r[:, None]
    a = _logit(p, r[:, None], s_col[None, :], base[None, :])
    sig = tl.sigmoid(a)
    dsig = sig * (1.0 - sig)
    tcol = tl.arange(0, TW)
    tok = tl.zeros([BT, TW], dtype=tl.float32)
    ws = ()
    for i in tl.static_range(N):
        ws = ws + (_col(sig, col, i) + w_eps,)
        tok = _put(tok, tcol, i, ws[i])
    gw = tl.zeros([BT, N3P], dtype=tl.float32)
    if NORM:
        # y = sum_i w_i x_i: |y|^2 = w^T G w, y . x_i = (G w)_i; g_u = g * nw, c_i = g_u . x_i
        ds = ()
        for i in tl.static_range(N):
            d = tl.zeros([BT], dtype=tl.float32)
            for j in tl.static_range(N):
                d += ws[j] * _col(q, scol, N + (_gram(i, j, N) if i <= j else _gram(j, i, N)))
            ds = ds + (d,)
        ysq = ws[0] * ds[0]
        gu_y = ws[0] * _col(q, scol, 0)
        for i in tl.static_range(1, N):
            ysq += ws[i] * ds[i]
            gu_y += ws[i] * _col(q, scol, i)
        ry = 1.0 / tl.sqrt(ysq / H + norm_eps)
        beta = ry * ry * ry * gu_y / H  # r_y^2 (g_u . u) / H with u = r_y y
        for i in tl.static_range(N):
            gw = _put(gw, col, i, ry * _col(q, scol, i) - beta * ds[i])
        tok = _put(tok, tcol, N + 1, ry)
        tok = _put(tok, tcol, N + 2, beta)
    else:
        for i in tl.static_range(N):
            gw = _put(gw, col, i, _col(q, scol, 1 + i))
    g_a = tl.where(col[None, :] < N, gw * dsig, 0.0)
    if not HEAD:
        pcols = col - N
        pmask = (col >= N) & (col < 2 * N)
        gpm = tl.load(gpm_ptr + rows[:, None] * N + pcols[None, :], mask=r_ok[:, None] & pmask[None, :],
                      other=0.0).to(tl.float32)
        g_a += tl.where(pmask[None, :], gpm * post_mult * dsig, 0.0)
        # comb: column 2N + i*N + j <-> entry i*NP + j of Sinkhorn's tuple form (kernels._elems)
        a_col = _elems(a, BT, N3P)
        c = ()
        gc = ()
        for i in tl.static_range(NP):
            for j in tl.static_range(NP):
                if (i < N) & (j < N):
                    c = c + (a_col[2 * N + i * N + j],)
                    gc = gc + (tl.load(gcm_ptr + rows * (N * N) + i * N + j, mask=r_ok, other=0.0).to(tl.float32),)
                else:  # padding: passes through
                    c = c + (a_col[0],)
                    gc = gc + (a_col[0],)
        gl = _sinkhorn_bwd(c, gc, repeat, sk_eps, N, NP)
        for i in tl.static_range(N):
            for j in tl.static_range(N):
                g_a = _put(g_a, col, 2 * N + i * N + j, gl[i * NP + j])
    g_a = tl.where(r_ok[:, None] & cm[None, :], g_a, 0.0)
    g_mix = g_a * s_col[None, :]
    tok = _put(tok, tcol, N, tl.sum(g_mix * mixes, axis=1) * r * r / K)
    gz_hi, gz_lo = _split(g_mix * r[:, None], INTERPRET)
    tl.store(gz_ptr + rows[:, None] * (2 * N3P) + col[None, :], gz_hi, mask=r_ok[:, None])
    tl.store(gz_ptr + rows[:, None] * (2 * N3P) + N3P + col[None, :], gz_lo, mask=r_ok[:, None])
    tl.store(tok_ptr + rows[:, None] * TW + tcol[None, :], tok, mask=r_ok[:, None])
    tl.store(sums_ptr + pid * (N3 + 3) + col, tl.sum(g_a, axis=0), mask=cm)
    ga_m = tl.sum(g_a * mixes, axis=0)
    for k in tl.static_range(3):
        tl.store(sums_ptr + pid * (N3 + 3) + N3 + k, tl.sum(tl.where(group == k, ga_m, 0.0), axis=0))


@triton.jit(do_not_specialize=["T"])
def _bwd_gres_kernel(res_ptr, fnp_ptr, gout_ptr, nw_ptr, gz_ptr, tok_ptr, gext_ptr, gres_ptr, gnw_ptr, T, H,
                     N: tl.constexpr, N3P: tl.constexpr, SP: tl.constexpr, TW: tl.constexpr, NORM: tl.constexpr,
                     NEED_RES: tl.constexpr, NEED_NW: tl.constexpr, EXT: tl.constexpr, BM: tl.constexpr,
                     BH: tl.constexpr, INTERPRET: tl.constexpr):
    """Stage 4 (module doc): ``grad_residual`` for tokens [tb*BM, tb*BM + BM) x hidden columns
    [hb*BH, hb*BH + BH) of every stream, one tile a program (program ``tb * cdiv(H, BH) + hb``).

    Reads ``res`` (T, N, H), ``fnp`` (as :func:`_bwd_stats_kernel`), ``gout`` (T, H), ``nw`` (H,)
    (NORM), ``gz`` (T, 2*N3P) bf16 and ``tok`` (T, TW) (:func:`_bwd_tail_kernel`); with ``EXT``
    (fused_post_pre: ``res`` is the new residual) adds ``gext`` (T, N, H), the new residual's own
    upstream gradient. Writes ``gres`` (T, N, H) (NEED_RES) and the block's ``gnw[tb]`` (H,) fp32
    (NEED_NW: ``grad_norm_weight``'s partial)."""
    n_hb = tl.cdiv(H, BH)
    pid = tl.program_id(0)
    tb = pid // n_hb
    hb = pid % n_hb
    # 64-bit scalar bases, 32-bit offsets inside the tile: [BM, BH] tiles of 64-bit pointers
    # cost two registers an element
    rows = tl.arange(0, BM)
    r_ok = tb * BM + rows < T
    row0 = (tb * BM).to(tl.int64)
    res_ptr += row0 * (N * H)
    gext_ptr += row0 * (N * H)
    gres_ptr += row0 * (N * H)
    gout_ptr += row0 * H
    gz_ptr += row0 * (2 * N3P)
    tok_ptr += row0 * TW
    h = hb * BH + tl.arange(0, BH)
    h_ok = h < H
    m2 = r_ok[:, None] & h_ok[None, :]
    K = N * H
    zc = tl.arange(0, N3P)
    tcol = tl.arange(0, TW)
    tok = tl.load(tok_ptr + rows[:, None] * TW + tcol[None, :], mask=r_ok[:, None], other=0.0)
    g = tl.load(gout_ptr + rows[:, None] * H + h[None, :], mask=m2, other=0.0).to(tl.float32)
    if NORM:
        nw = tl.load(nw_ptr + h, mask=h_ok, other=0.0).to(tl.float32)
        y = tl.zeros([BM, BH], dtype=tl.float32)
        for i in tl.range(0, N, loop_unroll_factor=1):
            x = tl.load(res_ptr + rows[:, None] * K + i * H + h[None, :], mask=m2, other=0.0).to(tl.float32)
            y += _col(tok, tcol, i)[:, None] * x
        ry = _col(tok, tcol, N + 1)[:, None]
        if NEED_NW:
            tl.store(gnw_ptr + tb.to(tl.int64) * H + h, tl.sum(g * ry * y, axis=0), mask=h_ok)
        gy = ry * g * nw[None, :] - _col(tok, tcol, N + 2)[:, None] * y
    else:
        gy = g
    if NEED_RES:
        coef = _col(tok, tcol, N)[:, None]
        gz_hi = tl.load(gz_ptr + rows[:, None] * (2 * N3P) + zc[None, :], mask=r_ok[:, None], other=0.0)
        gz_lo = tl.load(gz_ptr + rows[:, None] * (2 * N3P) + N3P + zc[None, :], mask=r_ok[:, None], other=0.0)
        # A loop over the streams, not unrolled: unrolled, every stream's tiles were loaded up front,
        # and the registers they held cost the second CTA an SM
        for i in tl.range(0, N, loop_unroll_factor=1):
            x = tl.load(res_ptr + rows[:, None] * K + i * H + h[None, :], mask=m2, other=0.0).to(tl.float32)
            gx = _col(tok, tcol, i)[:, None] * gy - coef * x
            f_off = zc[:, None] * K + i * H + h[None, :]
            f_hi = tl.load(fnp_ptr + f_off, mask=h_ok[None, :], other=0.0)
            f_lo = tl.load(fnp_ptr + SP * K + f_off, mask=h_ok[None, :], other=0.0)
            gx = _dot_hl(gz_hi, gz_lo, f_hi, f_lo, gx, True, True, INTERPRET)
            if EXT:
                gx += tl.load(gext_ptr + rows[:, None] * K + i * H + h[None, :], mask=m2, other=0.0).to(tl.float32)
            tl.store(gres_ptr + rows[:, None] * K + i * H + h[None, :],
                     _to_act(gx, gres_ptr.dtype.element_ty, INTERPRET), mask=m2)


@triton.jit(do_not_specialize=["T"])
def _bwd_gfn_kernel(res_ptr, gz_ptr, gfn_ptr, T, K, N3: tl.constexpr, N3P: tl.constexpr, BT: tl.constexpr,
                    BK: tl.constexpr, STEPS: tl.constexpr, EXACT_BF16: tl.constexpr, INTERPRET: tl.constexpr):
    """Stage 5 (module doc): ``gfn[c] = gz^T x`` (N3, K) fp32 over the chunk of tokens
    [c*STEPS*BT, (c+1)*STEPS*BT) and columns [kb*BK, kb*BK + BK) of the residual viewed as (T, K)
    (program ``c * cdiv(K, BK) + kb``): a GEMM whose operands feed the dot straight from their
    loads (``gz``'s bf16 hi and lo parts stacked, 2*N3P rows: one dot a step), so that
    Triton's pipeliner keeps ``num_stages`` steps of loads in flight."""
    n_kb = tl.cdiv(K, BK)
    pid = tl.program_id(0)
    c = pid // n_kb
    kb = pid % n_kb
    k = kb * BK + tl.arange(0, BK)
    k_ok = k < K
    zc = tl.arange(0, N3P)
    z2 = tl.arange(0, 2 * N3P)
    acc = tl.zeros([2 * N3P, BK], dtype=tl.float32)
    acc_lo = tl.zeros([N3P, BK], dtype=tl.float32)  # hi x (the residual's lo part): not bf16 only
    for step in range(0, STEPS):
        rows = (c * STEPS + step) * BT + tl.arange(0, BT)
        r_ok = rows < T
        rows = rows.to(tl.int64)
        gzt = tl.trans(tl.load(gz_ptr + rows[:, None] * (2 * N3P) + z2[None, :], mask=r_ok[:, None], other=0.0))
        x = tl.load(res_ptr + rows[:, None] * K + k[None, :], mask=r_ok[:, None] & k_ok[None, :], other=0.0)
        if EXACT_BF16:
            acc = _dot_bf(gzt, x, acc, INTERPRET)
        else:
            x_hi, x_lo = _split(x.to(tl.float32), INTERPRET)
            acc = _dot_bf(gzt, x_hi, acc, INTERPRET)
            gzt_hi = tl.trans(tl.load(gz_ptr + rows[:, None] * (2 * N3P) + zc[None, :], mask=r_ok[:, None],
                                      other=0.0))
            acc_lo = _dot_bf(gzt_hi, x_lo, acc_lo, INTERPRET)
    # rows [0, N3P) hold hi's products, [N3P, 2*N3P) lo's: their sum is gz^T x
    gfn = tl.sum(tl.reshape(acc, [2, N3P, BK]), axis=0) + acc_lo
    tl.store(gfn_ptr + c.to(tl.int64) * (N3 * K) + zc[:, None] * K + k[None, :], gfn,
             mask=(zc < N3)[:, None] & k_ok[None, :])


# --- post backward -------------------------------------------------------------------------------------
@triton.jit
def _post_bwd_kernel(g_ptr, x_ptr, res_ptr, pm_ptr, cm_ptr, gx_ptr, gres_ptr, part_ptr, T, H,
                     N: tl.constexpr, NP: tl.constexpr, NEED_X: tl.constexpr, NEED_RES: tl.constexpr,
                     NEED_PM: tl.constexpr, NEED_CM: tl.constexpr, BH: tl.constexpr, INTERPRET: tl.constexpr):
    """Token ``t`` x hidden block ``hb`` (grid ``T * cdiv(H, BH)``, the blocks of a token on
    consecutive programs): ``grad_x = sum_j pm[j] g[j]``, ``grad_residual[i] = sum_j cm[i, j] g[j]``
    over the block's columns, and the block's partial ``grad_post_mix[j] = g[j] . x``,
    ``grad_comb_mix[i, j] = residual[i] . g[j]`` at ``part[hb, t * N + j]`` and
    ``part[hb, T * N + (t * N + i) * N + j]`` (summed over hb by the launcher).

    One tile a program and no loop over H, as the forward ``kernels.post_kernel``: the bytes in
    flight come from many small programs, not from a loop that Triton does not pipeline."""
    tb, hb = _grid_order(tl.program_id(0), T, tl.cdiv(H, BH), True)
    t = tb.to(tl.int64)
    h = hb * BH + tl.arange(0, BH)
    hm = h < H
    j = tl.arange(0, NP)
    jm = j < N
    m2 = jm[:, None] & hm[None, :]
    g = tl.load(g_ptr + (t * N + j[:, None]) * H + h[None, :], mask=m2, other=0.0).to(tl.float32)
    part = part_ptr + hb.to(tl.int64) * T * (N + N * N)
    if NEED_X:
        pm = tl.load(pm_ptr + t * N + j, mask=jm, other=0.0).to(tl.float32)
        tl.store(gx_ptr + t * H + h, _to_act(tl.sum(pm[:, None] * g, axis=0), gx_ptr.dtype.element_ty, INTERPRET),
                 mask=hm)
    if NEED_PM:
        x = tl.load(x_ptr + t * H + h, mask=hm, other=0.0).to(tl.float32)
        tl.store(part + t * N + j, tl.sum(g * x[None, :], axis=1), mask=jm)
    for i in tl.static_range(N):
        if NEED_RES:
            cw = tl.load(cm_ptr + (t * N + i) * N + j, mask=jm, other=0.0).to(tl.float32)
            tl.store(gres_ptr + (t * N + i) * H + h,
                     _to_act(tl.sum(cw[:, None] * g, axis=0), gres_ptr.dtype.element_ty, INTERPRET), mask=hm)
        if NEED_CM:
            r = tl.load(res_ptr + (t * N + i) * H + h, mask=hm, other=0.0).to(tl.float32)
            tl.store(part + T * N + (t * N + i) * N + j, tl.sum(g * r[None, :], axis=1), mask=jm)


# --- launchers -----------------------------------------------------------------------------------------

def specializations(n: int, H: int, T: int, dtype: torch.dtype, head: bool, norm: bool = False,
                    fused: bool = False, need_res: bool = True, need_nw: bool = False,
                    amd: bool = False) -> tuple[dict, ...]:
    """Compile-time constants, ``num_warps`` and ``num_stages`` of the four backward kernels (stats,
    tail, gres, gfn) and the config (:func:`configs.backward_config`): what the launcher passes and
    what ``aot.py`` builds. ``fused``: fused_post_pre's (the grad_residual pass adds the new
    residual's own gradient)."""
    cfg = _configs.backward_config(n, H, T, head, norm, fused, amd)
    common = dict(N=n, N3P=cfg["n3p"])
    stats = dict(N=n, NP=cfg["np"], N3=cfg["m"], SP=cfg["sp"], GP=cfg["gp"], NORM=norm, BM=cfg["bm"],
                 BH=cfg["bh"], STEPS=cfg["stats_steps"], EXACT_BF16=dtype == torch.bfloat16, INTERPRET=INTERPRETED,
                 num_warps=cfg["stats_warps"], num_stages=cfg["stats_stages"])
    tail = dict(common, NP=cfg["np"], N3=cfg["m"], SP=cfg["sp"], STW=cfg["stw"], TW=cfg["tw"], HEAD=head,
                NORM=norm, BT=cfg["bt"], INTERPRET=INTERPRETED, num_warps=cfg["tail_warps"], num_stages=1)
    gres = dict(common, SP=cfg["sp"], TW=cfg["tw"], NORM=norm, NEED_RES=need_res, NEED_NW=need_nw, EXT=fused,
                BM=cfg["gres_bm"], BH=cfg["gres_bh"], INTERPRET=INTERPRETED, num_warps=cfg["gres_warps"],
                num_stages=1)
    gfn = dict(N3=cfg["m"], N3P=cfg["n3p"], BT=cfg["gfn_bt"], BK=cfg["gfn_bk"], STEPS=cfg["gfn_steps"],
               EXACT_BF16=dtype == torch.bfloat16, INTERPRET=INTERPRETED, num_warps=cfg["gfn_warps"],
               num_stages=cfg["gfn_stages"])
    return stats, tail, gres, gfn, cfg


@dataclasses.dataclass(frozen=True)
class BackwardPlan:
    """The launch plan of pre's, head's or fused_post_pre's backward for one kind of call
    (:func:`backward_plan`): the config (:func:`configs.backward_config`) and the five kernels
    with their constants."""

    cfg: dict
    prep: DirectKernel
    stats: DirectKernel
    tail: DirectKernel
    gres: DirectKernel
    gfn: DirectKernel


def _direct(fn, spec: dict) -> DirectKernel:
    """``fn`` as :func:`launch._kernel` makes it, from a :func:`specializations` entry (its
    constexprs with ``num_warps`` and ``num_stages``)."""
    spec = dict(spec)
    return _kernel(fn, spec, num_warps=spec.pop("num_warps"), num_stages=spec.pop("num_stages"))


def backward_plan(n: int, H: int, T: int, dtype: torch.dtype, device: torch.device, head: bool, norm: bool,
                  fused: bool, need_res: bool, need_nw: bool) -> BackwardPlan:
    """The :class:`BackwardPlan` for these arguments (:func:`specializations`'), kept in
    :data:`mhc.plans.PLANS` under the T bucket and the two step counts that T sets
    (:func:`configs.backward_steps`): what the config depends on, so a warm call costs a dict
    lookup and a few integer operations, and the plans stay few however T varies."""
    amd = device_shared_memory(device).amd
    steps = _configs.backward_steps(_configs.backward_row(head, fused, amd, T), n, H, T)
    key = ("triton", "backward", n, H, t_bucket(T), steps, dtype, device, head, norm, fused, need_res, need_nw)
    p = PLANS.find(key)  # the warm call: one dict lookup, no closure made
    if p is None:
        p = PLANS.get(key, lambda: _backward_plan(n, H, T, dtype, head, norm, fused, need_res, need_nw, amd))
    return p


def _backward_plan(n, H, T, dtype, head, norm, fused, need_res, need_nw, amd) -> BackwardPlan:
    stats, tail, gres, gfn, cfg = specializations(n, H, T, dtype, head, norm, fused, need_res, need_nw, amd)
    sp = cfg["sp"]
    prep = _kernel(prep_kernel, dict(N3=cfg["m"], N3P=sp, BK=prep_block(sp), INTERPRET=INTERPRETED), num_warps=4)
    return BackwardPlan(cfg, prep, _direct(_bwd_stats_kernel, stats), _direct(_bwd_tail_kernel, tail),
                        _direct(_bwd_gres_kernel, gres), _direct(_bwd_gfn_kernel, gfn))


def _mix_backward(g_pm, g_cm, g_out, residual, fn, hc_scale, hc_base, rms_eps, w_eps, sk_eps, post_mult,
                  repeat, mask, head, norm=(), ext=None):
    """pre's (``head`` False) or head's backward; ``norm``: () or (norm_weight, norm_eps,
    norm_weight_grad); ``ext``: None, or fused_post_pre's upstream gradient of the new residual,
    which the grad_residual pass adds."""
    T, n, H = residual.shape
    K = n * H
    m = fn.shape[0]
    dev = residual.device
    need_res, need_fn, need_scale, need_base = (bool(b) for b in mask)
    nw, norm_eps, need_nw = norm if norm else (None, 0.0, False)
    p = backward_plan(n, H, T, residual.dtype, dev, head, bool(norm), ext is not None, need_res, bool(need_nw))
    cfg = p.cfg
    f32 = torch.float32
    sp, n3p, tw = cfg["sp"], cfg["n3p"], cfg["tw"]
    n_tb = _cdiv(T, cfg["bm"])
    splits = _cdiv(H, cfg["bh"] * cfg["stats_steps"])
    tail_blocks = _cdiv(T, cfg["bt"])
    g_blocks = _cdiv(T, cfg["gres_bm"])
    k_blocks = _cdiv(K, cfg["gfn_bk"])
    chunks = _cdiv(T, cfg["gfn_bt"] * cfg["gfn_steps"])
    fnp = empty((2 * sp, K), torch.bfloat16, dev)
    part = empty((splits, T, sp), f32, dev)
    gz = empty((T, 2 * n3p), torch.bfloat16, dev)
    tok, sums = empty((T, tw), f32, dev), empty((tail_blocks, m + 3), f32, dev)
    gfn = empty((chunks, m, K), f32, dev) if need_fn else None
    gnw = empty((g_blocks, H), f32, dev) if need_nw else None
    g_res = empty((T, n, H), residual.dtype, dev) if need_res else None

    def ptr(t):  # absent tensors are never touched (their flag is false): pass any pointer
        return residual if t is None else t

    # The launch keys (DirectKernel.launch): the dtypes of the tensors the launcher was given and
    # the ints that vary between calls of one plan (T, sinkhorn_repeat); the rest the plan fixes.
    ik = (residual.dtype, fn.dtype, hc_scale.dtype, hc_base.dtype, g_out.dtype,
          None if head else (g_pm.dtype, g_cm.dtype), None if nw is None else nw.dtype,
          None if ext is None else ext.dtype)
    key = (ik, int_spec(T))
    with device_guard(dev):
        p.prep.launch((_cdiv(K, prep_block(sp)), 1, 1), ik, fn, fnp, K)
        p.stats.launch((n_tb * splits, 1, 1), key, residual, fnp, g_out, ptr(nw), part, T, H)
        p.tail.launch((tail_blocks, 1, 1), (key, int_spec(repeat)), part, splits, g_out if head else g_pm,
                      g_out if head else g_cm, hc_scale, hc_base, gz, tok, sums, T, H, rms_eps, w_eps, sk_eps,
                      post_mult, repeat, norm_eps)
        if need_res or need_nw:
            p.gres.launch((g_blocks * _cdiv(H, cfg["gres_bh"]), 1, 1), key, residual, fnp, g_out, ptr(nw), gz, tok,
                          ptr(ext), ptr(g_res), ptr(gnw), T, H)
        if need_fn:
            p.gfn.launch((chunks * k_blocks, 1, 1), key, residual, gz, gfn, T, K)
        # the reductions over token blocks and chunks: torch.sum over the first axis, a fixed order
        totals = sums.sum(0)
        g_fn = None if gfn is None else (gfn[0] if chunks == 1 else gfn.sum(0))
        g_nw = None if gnw is None else (gnw[0] if g_blocks == 1 else gnw.sum(0)).to(nw.dtype)
    g_base = totals[:m] if need_base else None
    g_scale = totals[m:m + hc_scale.shape[0]] if need_scale else None
    return (g_res, g_fn, g_scale, g_base), g_nw


def pre_backward(grad_post_mix, grad_comb_mix, grad_layer_input, residual, fn, hc_scale, hc_base, rms_eps,
                 hc_pre_eps, hc_sinkhorn_eps, hc_post_mult_value, sinkhorn_repeat, output_mask, *norm):
    """As ``mhc.backward.pre_backward`` (shapes and dtypes there, the fused RMSNorm's ``norm``
    too), in five Triton launches."""
    grads, g_nw = _mix_backward(grad_post_mix, grad_comb_mix, grad_layer_input, residual, fn, hc_scale, hc_base,
                                rms_eps, hc_pre_eps, hc_sinkhorn_eps, hc_post_mult_value, sinkhorn_repeat,
                                output_mask, False, norm)
    return (*grads, g_nw) if norm else grads


def head_backward(grad_out, residual, fn, hc_scale, hc_base, rms_eps, hc_eps, output_mask):
    """As ``mhc.backward.head_backward`` (shapes and dtypes there), in five Triton launches."""
    return _mix_backward(None, None, grad_out, residual, fn, hc_scale, hc_base, rms_eps, hc_eps, 0.0, 0.0, 1,
                         output_mask, True)[0]


def fused_post_pre_backward(grad_new_residual, grad_post_mix, grad_comb_mix, grad_layer_input, new_residual, x,
                            residual, post_mix, comb_mix, fn, hc_scale, hc_base, rms_eps, hc_pre_eps,
                            hc_sinkhorn_eps, hc_post_mult_value, sinkhorn_repeat, output_mask, *norm):
    """As ``mhc.backward.fused_post_pre_backward`` (shapes, dtypes and the mask there): pre's
    backward on the new residual, whose streaming pass adds the new residual's own upstream
    gradient and writes the sum (in the residual's dtype, as autograd of the unfused pair holds
    it), then post's backward on that sum (six launches)."""
    post_mask = tuple(bool(b) for b in output_mask[:4])
    (g_new, *params), g_nw = _mix_backward(grad_post_mix, grad_comb_mix, grad_layer_input, new_residual, fn,
                                           hc_scale, hc_base, rms_eps, hc_pre_eps, hc_sinkhorn_eps,
                                           hc_post_mult_value, sinkhorn_repeat, (any(post_mask), *output_mask[4:7]),
                                           False, norm, ext=grad_new_residual)
    post_grads = post_backward(g_new, x, residual, post_mix, comb_mix, post_mask) if any(post_mask) else (None,) * 4
    return (*post_grads, *params) + ((g_nw,) if norm else ())


def post_backward(grad_out, x, residual, post_mix, comb_mix, output_mask):
    """As ``mhc.backward.post_backward`` (shapes, dtypes and which input each gradient needs
    there): one Triton kernel, and a ``torch.sum`` of its per-block partials of ``grad_post_mix``
    and ``grad_comb_mix`` where H spans more than one block (a fixed order: deterministic)."""
    T, n, H = grad_out.shape
    dev = grad_out.device
    need_x, need_res, need_pm, need_cm = (bool(b) for b in output_mask)
    mask = (need_x, need_res, need_pm, need_cm)
    key = ("triton", "post_backward", n, H, t_bucket(T), grad_out.dtype, dev, mask)
    p = PLANS.find(key)  # the warm call: one dict lookup, no closure made
    if p is None:
        p = PLANS.get(key, lambda: _post_backward_plan(n, H, T, mask))
    blocks = _cdiv(H, p.constexprs["BH"])
    g_x = empty((T, H), grad_out.dtype, dev) if need_x else None
    g_res = empty((T, n, H), grad_out.dtype, dev) if need_res else None
    part = empty((blocks, T * (n + n * n)), torch.float32, dev) if need_pm or need_cm else None

    def ptr(t):  # absent tensors are never touched (their NEED_* is false): pass any pointer
        return grad_out if t is None else t

    with device_guard(dev):
        # the launch key: the given tensors' dtypes (x, residual, the mixes: None where absent) and T
        ik = tuple(None if t is None else t.dtype for t in (grad_out, x, residual, post_mix, comb_mix))
        p.launch((T * blocks, 1, 1), (ik, int_spec(T)), grad_out, ptr(x), ptr(residual), ptr(post_mix),
                 ptr(comb_mix), ptr(g_x), ptr(g_res), ptr(part), T, H)
    g_pm = g_cm = None
    if part is not None:
        sums = part[0] if blocks == 1 else part.sum(0)
        # Both views of one buffer, each contiguous: the unwanted one is dropped.
        g_pm = sums[:T * n].view(T, n, 1) if need_pm else None
        g_cm = sums[T * n:].view(T, n, n) if need_cm else None
    return g_x, g_res, g_pm, g_cm


def _post_backward_plan(n: int, H: int, T: int, mask: tuple) -> DirectKernel:
    """post's backward plan (kept in :data:`mhc.plans.PLANS` by :func:`post_backward`): its
    kernel, whose ``constexprs["BH"]`` is the hidden block."""
    spec, warps = post_specialization(n, H, T, mask)
    return _kernel(_post_bwd_kernel, spec, num_warps=warps)


def post_specialization(n: int, H: int, T: int, output_mask=(True, True, True, True)) -> tuple[dict, int]:
    """Compile-time constants of ``_post_bwd_kernel`` for n streams, hidden size H, T tokens and
    the gradients asked for (``output_mask``: x, residual, post_mix, comb_mix), and its ``num_warps``."""
    need_x, need_res, need_pm, need_cm = (bool(b) for b in output_mask)
    block_h, warps = _configs.post_backward_config(H, T)
    return dict(N=n, NP=max(2, triton.next_power_of_2(n)), NEED_X=need_x, NEED_RES=need_res, NEED_PM=need_pm,
                NEED_CM=need_cm, BH=block_h, INTERPRET=INTERPRETED), warps
