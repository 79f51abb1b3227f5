"""Triton kernels for the mHC ops (the math is ``mhc/reference.py``; shapes are flattened to T tokens).

Two kernels:

``mix_kernel`` serves ``pre``, ``head`` and ``fused_post_pre``. The grid is (token blocks, splits of
H). Program (m, s) takes BLOCK_M tokens and the hidden slice ``[s*h_per_split, (s+1)*h_per_split)``
of every stream, and accumulates the prenorm GEMM ``x . fn^T`` and the sum of squares over it
(:func:`_prenorm_tile`). It writes those partials to a workspace and bumps a per-token-block
counter; the program that brings the counter to ``n_splits`` (the last one of its block) sums the
partials, applies the RMS scale, the activations and Sinkhorn (:func:`_pre_activations`,
:func:`_head_activations`), resets the counter, and collapses the streams into ``layer_input``
(:func:`_collapse`). The collapse re-reads the token block's residual right after the splits read
it, so it hits L2: only a few token blocks are in flight at once, a few MB, far under the 50 MB L2.
In ``fused_post_pre`` the residual each split reads is computed on the fly as ``post`` of the
previous sublayer, rounded to the residual dtype, stored once, and fed to the GEMM from registers.

``post_kernel``: elementwise plus an n x n mix, one token and BLOCK_H hidden elements per program.

Every load is cast to fp32 right after ``tl.load`` (the interpreter mishandles bf16 in reductions).
GEMM precision: the residual values are exact in bf16 (fp16 residuals are split into two bf16
terms, exactly) and ``fn`` is split into bf16 hi + lo, so the bf16 tensor-core products carry
about 16 mantissa bits of ``fn`` with fp32 accumulation: IEEE-like accuracy (mixes ~1e-5 relative
error), no TF32 anywhere. Under the interpreter the dot runs in fp32 directly (``DOT_F32``).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _to_act(v, ty: tl.constexpr, EMULATE_RNE: tl.constexpr):
    """fp32 ``v`` rounded to the activation dtype ``ty``, to nearest even. ``EMULATE_RNE``: the
    interpreter truncates fp32 -> bf16, so round in integer arithmetic first (then exact)."""
    if EMULATE_RNE and ty == tl.bfloat16:
        b = v.to(tl.uint32, bitcast=True)
        b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
        v = b.to(tl.float32, bitcast=True)
    return v.to(ty)


@triton.jit
def _prenorm_tile(acc, ssq, x, w, DOT_F32: tl.constexpr, EXACT_BF16: tl.constexpr):
    """One K-step of the prenorm GEMM: ``acc += x @ w``, ``ssq += sum(x*x, 1)``.

    ``acc`` [BM, N3P] fp32; ``ssq`` [BM] fp32; ``x`` [BM, K] fp32 holding residual-dtype values;
    ``w`` [K, N3P] fp32 (``fn`` transposed). ``EXACT_BF16``: x is exactly representable in bf16
    (a bf16 residual); otherwise (fp16) x is split into two bf16 terms.
    """
    ssq += tl.sum(x * x, axis=1)
    if DOT_F32:
        acc += tl.dot(x, w, input_precision="ieee")
    else:
        w_hi = w.to(tl.bfloat16)
        w_lo = (w - w_hi.to(tl.float32)).to(tl.bfloat16)
        x_hi = x.to(tl.bfloat16)
        acc = tl.dot(x_hi, w_hi, acc)
        acc = tl.dot(x_hi, w_lo, acc)
        if not EXACT_BF16:
            x_lo = (x - x_hi.to(tl.float32)).to(tl.bfloat16)
            acc = tl.dot(x_lo, w_hi, acc)
    return acc, ssq


@triton.jit
def _sinkhorn(c, repeat, eps, N: tl.constexpr, NP: tl.constexpr):
    """Sinkhorn on comb logits ``c`` [BM, NP, NP] fp32 (axis 1: source i, axis 2: destination j).

    Padding (i or j >= N) comes out 0. Softmax over j plus eps, divide by column sums + eps, then
    ``repeat - 1`` times row then column normalisation, as ``mhc.reference.sinkhorn``.
    """
    i = tl.arange(0, NP)[None, :, None]
    j = tl.arange(0, NP)[None, None, :]
    valid = (i < N) & (j < N)
    c = tl.where(j < N, c, float("-inf"))
    c = tl.exp(c - tl.max(c, axis=2)[:, :, None])
    c = c / tl.sum(c, axis=2)[:, :, None] + eps
    c = tl.where(valid, c, 0.0)
    c = c / (tl.sum(c, axis=1)[:, None, :] + eps)
    # while, not range: the interpreter cannot take a run-time range bound (newer numpy).
    it = 1
    while it < repeat:
        c = c / (tl.sum(c, axis=2)[:, :, None] + eps)
        c = c / (tl.sum(c, axis=1)[:, None, :] + eps)
        it += 1
    return c


@triton.jit
def _rms(mix_ptr, rows, n_rows, K, rms_eps, N3: tl.constexpr, N3P: tl.constexpr):
    """Per-token RMS factor [BM] from the reduced sum of squares (column N3 of the mix scratch;
    rows past ``n_rows`` were never reduced and read as 0)."""
    ssq = tl.load(mix_ptr + rows * N3P + N3, mask=rows < n_rows, other=0.0)
    return 1.0 / tl.sqrt(ssq / K + rms_eps)


@triton.jit
def _pre_activations(mix_ptr, scale_ptr, base_ptr, post_ptr, comb_ptr, n_rows, K,
                     rms_eps, pre_eps, sk_eps, post_mult, sk_repeat,
                     N: tl.constexpr, NP: tl.constexpr, N3: tl.constexpr, N3P: tl.constexpr,
                     BM: tl.constexpr):
    """``pre``'s activations for one token block; returns the collapse weights [BM, NP] fp32.

    Reads the block's reduced logits (``mix_ptr`` [BM, N3P] fp32, sum of squares in column N3);
    writes the block's ``post_mix`` rows ([n_rows, N] at ``post_ptr``) and Sinkhorn-normalised
    ``comb_mix`` rows ([n_rows, N, N] at ``comb_ptr``), fp32.
    """
    rows = tl.arange(0, BM)
    ok = rows < n_rows
    rms = _rms(mix_ptr, rows, n_rows, K, rms_eps, N3, N3P)
    c = tl.arange(0, NP)
    cm = c < N
    s0 = tl.load(scale_ptr)
    s1 = tl.load(scale_ptr + 1)
    s2 = tl.load(scale_ptr + 2)

    m_pre = tl.load(mix_ptr + rows[:, None] * N3P + c[None, :], mask=ok[:, None] & cm[None, :], other=0.0)
    b_pre = tl.load(base_ptr + c, mask=cm, other=0.0)
    w_pre = tl.sigmoid(m_pre * rms[:, None] * s0 + b_pre[None, :]) + pre_eps

    m_post = tl.load(mix_ptr + rows[:, None] * N3P + N + c[None, :], mask=ok[:, None] & cm[None, :],
                     other=0.0)
    b_post = tl.load(base_ptr + N + c, mask=cm, other=0.0)
    w_post = tl.sigmoid(m_post * rms[:, None] * s1 + b_post[None, :]) * post_mult
    tl.store(post_ptr + rows[:, None] * N + c[None, :], w_post, mask=ok[:, None] & cm[None, :])

    i3 = tl.arange(0, NP)[None, :, None]
    j3 = tl.arange(0, NP)[None, None, :]
    ij = i3 * N + j3
    m3 = (i3 < N) & (j3 < N)
    m_comb = tl.load(mix_ptr + rows[:, None, None] * N3P + 2 * N + ij, mask=ok[:, None, None] & m3,
                     other=0.0)
    b_comb = tl.load(base_ptr + 2 * N + ij, mask=m3, other=0.0)
    comb = _sinkhorn(m_comb * rms[:, None, None] * s2 + b_comb, sk_repeat, sk_eps, N, NP)
    tl.store(comb_ptr + rows[:, None, None] * (N * N) + ij, comb,
             mask=ok[:, None, None] & m3)
    return tl.where(cm[None, :], w_pre, 0.0)


@triton.jit
def _head_activations(mix_ptr, scale_ptr, base_ptr, n_rows, K, rms_eps, hc_eps,
                      N: tl.constexpr, NP: tl.constexpr, N3: tl.constexpr, N3P: tl.constexpr,
                      BM: tl.constexpr):
    """``head``'s collapse weights [BM, NP] fp32: ``sigmoid(mixes * scale[0] + base) + hc_eps``."""
    rows = tl.arange(0, BM)
    rms = _rms(mix_ptr, rows, n_rows, K, rms_eps, N3, N3P)
    c = tl.arange(0, NP)
    cm = c < N
    m = tl.load(mix_ptr + rows[:, None] * N3P + c[None, :], mask=(rows < n_rows)[:, None] & cm[None, :],
                other=0.0)
    b = tl.load(base_ptr + c, mask=cm, other=0.0)
    w = tl.sigmoid(m * rms[:, None] * tl.load(scale_ptr) + b[None, :]) + hc_eps
    return tl.where(cm[None, :], w, 0.0)


@triton.jit
def _collapse(src_ptr, out_ptr, w, n_rows, H,
              N: tl.constexpr, NP: tl.constexpr, BM: tl.constexpr, BC: tl.constexpr,
              ROWWISE: tl.constexpr, EMULATE_RNE: tl.constexpr):
    """``out[t, h] = sum_i w[t, i] * src[t, i, h]`` for one token block of ``n_rows`` valid rows;
    ``w`` [BM, NP] fp32, ``src`` [BM, N, H] and ``out`` [BM, H] in the residual dtype, fp32
    accumulation.

    ``ROWWISE``: one valid row at a time with [NP, BC] tiles (short blocks, e.g. T=1: a wide tile
    keeps many loads in flight and skips the padding rows); else [BM, NP, BC] tiles.
    """
    i = tl.arange(0, NP)
    if ROWWISE:
        rows = tl.arange(0, BM)
        r = 0
        while (r < n_rows) & (r < BM):
            wr = tl.sum(tl.where(rows[:, None] == r, w, 0.0), axis=0)
            h0 = 0
            while h0 < H:
                h = h0 + tl.arange(0, BC)
                x = tl.load(src_ptr + r * (N * H) + i[:, None] * H + h[None, :],
                            mask=(i < N)[:, None] & (h < H)[None, :], other=0.0)
                y = tl.sum(x.to(tl.float32) * wr[:, None], axis=0)
                tl.store(out_ptr + r * H + h, _to_act(y, out_ptr.dtype.element_ty, EMULATE_RNE), mask=h < H)
                h0 += BC
            r += 1
    else:
        rows = tl.arange(0, BM)
        base_mask = (rows < n_rows)[:, None, None] & (i < N)[None, :, None]
        src = src_ptr + rows[:, None, None] * (N * H) + i[None, :, None] * H
        h0 = 0
        while h0 < H:
            h = h0 + tl.arange(0, BC)
            x = tl.load(src + h[None, None, :], mask=base_mask & (h < H)[None, None, :], other=0.0)
            y = tl.sum(x.to(tl.float32) * w[:, :, None], axis=1)
            tl.store(out_ptr + rows[:, None] * H + h[None, :], _to_act(y, out_ptr.dtype.element_ty, EMULATE_RNE),
                     mask=(rows < n_rows)[:, None] & (h < H)[None, :])
            h0 += BC


@triton.jit
def mix_kernel(
    res_ptr, x_ptr, pm_in_ptr, cm_in_ptr, new_ptr,
    fn_ptr, scale_ptr, base_ptr,
    post_ptr, comb_ptr, out_ptr,
    part_ptr, mix_ptr, cnt_ptr,
    T, H, n_splits,
    rms_eps, pre_eps, sk_eps, post_mult, sk_repeat,
    N: tl.constexpr, NP: tl.constexpr, N3: tl.constexpr, N3P: tl.constexpr,
    HEAD: tl.constexpr, FUSED: tl.constexpr,
    BM: tl.constexpr, BH: tl.constexpr, STEPS: tl.constexpr, SP: tl.constexpr, RC: tl.constexpr, BC: tl.constexpr,
    ROWWISE: tl.constexpr,
    DOT_F32: tl.constexpr, EXACT_BF16: tl.constexpr,
):
    """``pre`` (HEAD=False, FUSED=False), ``head`` (HEAD=True) or ``fused_post_pre`` (FUSED=True).

    Inputs: ``res_ptr`` (T, N, H) residual (for FUSED: the residual before ``post``); FUSED only:
    ``x_ptr`` (T, H) sublayer output, ``pm_in_ptr`` (T, N) and ``cm_in_ptr`` (T, N, N) fp32 mixes,
    ``new_ptr`` (T, N, H) output new residual. ``fn_ptr`` (N3, N*H) fp32, ``scale_ptr`` (3,) or
    (1,), ``base_ptr`` (N3,) fp32. Outputs: ``post_ptr`` (T, N) and ``comb_ptr`` (T, N, N) fp32
    (not for HEAD), ``out_ptr`` (T, H) in the residual dtype. Workspace: ``part_ptr``
    (num_m, n_splits, BM, N3P) fp32 partials, ``mix_ptr`` (num_m, BM, N3P) fp32 reduced logits,
    ``cnt_ptr`` (num_m,) int32 counters that are zero on entry and left zero on exit.
    ``DOT_F32``: interpreter mode (fp32 GEMM, bf16 rounding emulated, see :func:`_to_act`).
    Grid: (cdiv(T, BM), n_splits); split s takes hidden elements [s, s+1) * STEPS*BH;
    ``n_splits <= SP``; ``RC`` divides BM*N3P.
    """
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    row0 = pid_m * BM
    n_rows = T - row0
    K = N * H
    # Pointers to this token block: the block offset in int64 (T*N*H may pass 2**31), the offsets
    # inside the block in int32.
    blk = row0.to(tl.int64)
    res_ptr += blk * K
    new_ptr += blk * K
    x_ptr += blk * H
    out_ptr += blk * H
    pm_in_ptr += blk * N
    post_ptr += blk * N
    cm_in_ptr += blk * (N * N)
    comb_ptr += blk * (N * N)
    rows = tl.arange(0, BM)
    row_ok = rows < n_rows
    i = tl.arange(0, NP)
    i_ok = i < N
    col = tl.arange(0, N3P)
    col_ok = col < N3
    kk = tl.arange(0, NP * BH)

    # Phase 1: this split's slice of the prenorm GEMM and of the sum of squares.
    acc = tl.zeros([BM, N3P], dtype=tl.float32)
    ssq = tl.zeros([BM], dtype=tl.float32)
    h_lo = pid_s * (STEPS * BH)
    h_hi = h_lo + STEPS * BH  # may pass H in the last split: masked
    if FUSED:
        pm = tl.load(pm_in_ptr + rows[:, None] * N + i[None, :],
                     mask=row_ok[:, None] & i_ok[None, :], other=0.0)
    # A compile-time trip count (h_per_split = STEPS * BH) keeps this an scf.for that Triton
    # pipelines; the interpreter also cannot take a run-time range bound (newer numpy).
    for step in range(0, STEPS):
        h0 = h_lo + step * BH
        h = h0 + tl.arange(0, BH)
        h_ok = (h < H) & (h < h_hi)
        # Tile column k is stream k // BH, hidden index h0 + k % BH.
        hk = h0 + kk % BH
        k_ok = (kk // BH < N) & (hk < H) & (hk < h_hi)
        if FUSED:
            m3 = row_ok[:, None, None] & i_ok[None, :, None] & h_ok[None, None, :]
            off3 = rows[:, None, None] * K + i[None, :, None] * H + h[None, None, :]
            m2 = row_ok[:, None] & h_ok[None, :]
            xin = tl.load(x_ptr + rows[:, None] * H + h[None, :], mask=m2, other=0.0).to(tl.float32)
            v = pm[:, :, None] * xin[:, None, :]
            for src in tl.static_range(N):
                r = tl.load(res_ptr + rows[:, None] * K + src * H + h[None, :], mask=m2,
                            other=0.0).to(tl.float32)
                cw = tl.load(cm_in_ptr + rows[:, None] * (N * N) + src * N + i[None, :],
                             mask=row_ok[:, None] & i_ok[None, :], other=0.0)
                v += cw[:, :, None] * r[:, None, :]
            v = _to_act(v, new_ptr.dtype.element_ty, DOT_F32)
            tl.store(new_ptr + off3, v, mask=m3)
            # pre reads the new residual as stored: rounded to the residual dtype.
            x = tl.reshape(tl.where(m3, v.to(tl.float32), 0.0), [BM, NP * BH])
        else:
            x = tl.load(res_ptr + rows[:, None] * K + ((kk // BH) * H + hk)[None, :],
                        mask=row_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        w = tl.load(fn_ptr + col[None, :] * K + ((kk // BH) * H + hk)[:, None],
                    mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc, ssq = _prenorm_tile(acc, ssq, x, w, DOT_F32, EXACT_BF16)

    # The sum of squares rides in column N3 of the partials, which the GEMM leaves at 0.
    acc = tl.where(col[None, :] == N3, ssq[:, None], acc)
    part_blk = part_ptr + pid_m.to(tl.int64) * n_splits * (BM * N3P)
    tl.store(part_blk + pid_s * (BM * N3P) + rows[:, None] * N3P + col[None, :], acc,
             mask=row_ok[:, None])
    # Release this program's partials (and new-residual stores) before counting in; the last
    # program of the token block acquires them all.
    tl.debug_barrier()
    done = tl.atomic_add(cnt_ptr + pid_m, 1, sem="acq_rel", scope="gpu")
    if done == n_splits - 1:
        tl.debug_barrier()
        # Phase 2 (last program of the block): reduce the splits of the valid rows into the mix
        # scratch (a short token block, T=1 say, takes one step, not BM*N3P/RC).
        mix = mix_ptr + pid_m.to(tl.int64) * (BM * N3P)
        s = tl.arange(0, SP)
        n_valid = n_rows * N3P
        for e0 in tl.static_range(0, BM * N3P, RC):
            if e0 < n_valid:
                e = e0 + tl.arange(0, RC)
                p = tl.load(part_blk + s[:, None] * (BM * N3P) + e[None, :],
                            mask=(s < n_splits)[:, None] & (e < n_valid)[None, :], other=0.0,
                            cache_modifier=".cg")
                tl.store(mix + e, tl.sum(p, axis=0), mask=e < n_valid)
        tl.atomic_xchg(cnt_ptr + pid_m, 0)
        tl.debug_barrier()
        # Phase 3: activations, then the collapse (its residual re-read hits L2).
        if HEAD:
            wts = _head_activations(mix, scale_ptr, base_ptr, n_rows, K, rms_eps, pre_eps, N, NP, N3, N3P, BM)
        else:
            wts = _pre_activations(mix, scale_ptr, base_ptr, post_ptr, comb_ptr, n_rows, K,
                                   rms_eps, pre_eps, sk_eps, post_mult, sk_repeat, N, NP, N3, N3P, BM)
        if FUSED:
            _collapse(new_ptr, out_ptr, wts, n_rows, H, N, NP, BM, BC, ROWWISE, DOT_F32)
        else:
            _collapse(res_ptr, out_ptr, wts, n_rows, H, N, NP, BM, BC, ROWWISE, DOT_F32)


@triton.jit
def post_kernel(x_ptr, res_ptr, pm_ptr, cm_ptr, out_ptr, T, H,
                N: tl.constexpr, NP: tl.constexpr, BH: tl.constexpr, EMULATE_RNE: tl.constexpr):
    """``out[t, j, h] = pm[t, j] * x[t, h] + sum_i cm[t, i, j] * res[t, i, h]`` (fp32 math).

    ``x`` (T, H), ``res`` and ``out`` (T, N, H) in the residual dtype; ``pm`` (T, N), ``cm``
    (T, N, N) fp32. Grid: (T, cdiv(H, BH)). ``EMULATE_RNE``: under the interpreter (see
    :func:`_to_act`).
    """
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BH + tl.arange(0, BH)
    h_ok = h < H
    j = tl.arange(0, NP)
    j_ok = j < N
    x = tl.load(x_ptr + t * H + h, mask=h_ok, other=0.0).to(tl.float32)
    pm = tl.load(pm_ptr + t * N + j, mask=j_ok, other=0.0)
    acc = pm[:, None] * x[None, :]
    for i in tl.static_range(N):
        r = tl.load(res_ptr + (t * N + i) * H + h, mask=h_ok, other=0.0).to(tl.float32)
        cw = tl.load(cm_ptr + (t * N + i) * N + j, mask=j_ok, other=0.0)
        acc += cw[:, None] * r[None, :]
    tl.store(out_ptr + (t * N + j[:, None]) * H + h[None, :], _to_act(acc, out_ptr.dtype.element_ty, EMULATE_RNE),
             mask=j_ok[:, None] & h_ok[None, :])
