"""Triton kernels for the mHC ops (the math is ``mhc/reference.py``; shapes are flattened to T tokens).

The mixes' math is written once, in the helpers under "the mixes' math" below, and every kernel
(``backward.py``'s too) calls them: :func:`_rms_factor`, :func:`_logit`, :func:`_pre_weight`,
:func:`_post_weight` and Sinkhorn (:func:`_sinkhorn`; its steps :func:`_sk_softmax` and
:func:`_sk_norm`, on the tuple form that :func:`_elems` makes from a tile).

Above ``launch.SMALL_T`` tokens, ``pre``, ``head`` and ``fused_post_pre`` take two passes
(``launch.plan``): :func:`prep_kernel` splits fn into bf16 hi/lo; :func:`prenorm_kernel` does the
prenorm GEMM and the sum of squares, nothing else, split over K into partials; then
:func:`finalize_kernel` reduces the partials, writes ``post_mix``/``comb_mix`` (Sinkhorn) and
collapses the streams into ``layer_input``, re-reading the residual. ``fused_post_pre`` runs
:func:`post_kernel` first and feeds the new residual to the two passes.

At or below ``SMALL_T`` (``launch.configs``), latency decides:

``mix_kernel`` (T = 1): the grid is (token blocks, splits of H); each program accumulates its
slice of the GEMM and the sum of squares (:func:`_gemm_slice`), writes the partials and bumps a
per-token-block counter; the program that brings the counter to ``n_splits`` reduces the
partials in registers, applies the activations and Sinkhorn in-thread, resets the counter and
collapses (:func:`_tail`). In ``fused_post_pre`` the residual each split reads is computed on the
fly as ``post`` of the previous sublayer, stored once and fed to the GEMM from registers.

``chunk_kernel`` (T <= SMALL_T): one launch per token chunk plus one, each running phase B
(finish + collapse) of chunk c-1 beside phase A (the GEMM slices) of chunk c. No counters.

``post_kernel``: elementwise plus an n x n mix, one token and BH hidden elements per program, the
hidden blocks of a token on consecutive programs (above T = 1; see its docstring).

Every load is cast to fp32 right after ``tl.load`` (the interpreter mishandles bf16 in reductions).
GEMM precision: the residual values are exact in bf16 (fp16 residuals are split into two bf16
terms, exactly) and ``fn`` is split into bf16 hi + lo, so the bf16 tensor-core products carry
about 16 mantissa bits of ``fn`` with fp32 accumulation: the GEMM's partials are within about
1e-7 (relative) of fp64 (benchmarks/prenorm_dev.py measures it), no TF32 anywhere.

``INTERPRET`` (a constexpr of every kernel; ``launch.INTERPRETED``): the kernel runs under Triton's
interpreter, which mishandles bf16: the GEMM then runs one fp32 dot, bf16 rounding is done in
integer arithmetic (:func:`_to_act`), and tiles that a GPU casts at their use are cast right after
their load.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _to_act(v, ty: tl.constexpr, INTERPRET: tl.constexpr):
    """fp32 ``v`` rounded to the activation dtype ``ty``, to nearest even. ``INTERPRET`` (every
    kernel's flag for Triton's interpreter): it truncates fp32 -> bf16, so round in integer
    arithmetic first (then exact)."""
    if INTERPRET and ty == tl.bfloat16:
        b = v.to(tl.uint32, bitcast=True)
        b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
        v = b.to(tl.float32, bitcast=True)
    return v.to(ty)


@triton.jit
def _prenorm_tile(acc, ssq, x, w, INTERPRET: tl.constexpr, EXACT_BF16: tl.constexpr):
    """One K-step of the small-T kernels' prenorm GEMM: ``acc += x @ w``, ``ssq += sum(x*x, 1)``.

    ``acc`` [BM, N3P] fp32; ``ssq`` [BM] fp32; ``x`` [BM, K] fp32 holding residual-dtype values;
    ``w`` [K, N3P] fp32 (``fn`` transposed), split here into bf16 hi + lo. ``EXACT_BF16``: x is
    exactly representable in bf16 (a bf16 residual); otherwise (fp16) x is split into two bf16
    terms. ``INTERPRET``: one fp32 dot (the interpreter mishandles bf16 dots).
    """
    ssq += tl.sum(x * x, axis=1)
    if INTERPRET:
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
def prep_kernel(fn_ptr, out_ptr, K, N3: tl.constexpr, N3P: tl.constexpr, BK: tl.constexpr,
                INTERPRET: tl.constexpr):
    """``fn`` (N3, K) fp32 -> ``out`` (2*N3P, K) bf16: rows [0, N3) the bf16 hi parts
    (round-to-nearest-even), rows [N3P, N3P+N3) the lo parts ``bf16(fn - hi)``, the padding rows
    0. Run once per call before ``prenorm_kernel``: hi + lo carries ~16 mantissa bits of fn.
    Grid: (cdiv(K, BK),)."""
    r = tl.arange(0, N3P)
    k = tl.program_id(0).to(tl.int64) * BK + tl.arange(0, BK)
    k_ok = k < K
    w = tl.load(fn_ptr + r[:, None] * K + k[None, :], mask=(r < N3)[:, None] & k_ok[None, :], other=0.0)
    hi = _to_act(w, tl.bfloat16, INTERPRET)
    lo = _to_act(w - hi.to(tl.float32), tl.bfloat16, INTERPRET)
    tl.store(out_ptr + r[:, None] * K + k[None, :], hi, mask=k_ok[None, :])
    tl.store(out_ptr + (N3P + r[:, None]) * K + k[None, :], lo, mask=k_ok[None, :])


# --- the mixes' math, written once: every kernel here and in backward.py calls these ---------------


@triton.jit
def _rms_factor(ssq, K, rms_eps):
    """The RMS factor ``rsqrt(ssq / K + rms_eps)`` from a token's fp32 sum of squares ``ssq``, but
    NaN where ``ssq`` overflowed to +inf (rsqrt would give 0, and every mix of the token a
    finite wrong value): ``mhc.reference.rms_factor``'s rule, for every kernel that scales mixes."""
    r = 1.0 / tl.sqrt(ssq / K + rms_eps)
    return tl.where(ssq == float("inf"), float("nan"), r)


@triton.jit
def _logit(m, rms, scale, base):
    """A mix's pre-activation from its GEMM value ``m`` (``x . fn_row``, before the RMS factor):
    ``m * rms * scale + base`` (``rms``: the token's :func:`_rms_factor`; ``scale``/``base``: the
    mix's hc_scale and hc_base entries). Sinkhorn's input for comb. Elementwise: tensors or
    scalars of any broadcastable shapes."""
    return m * rms * scale + base


@triton.jit
def _pre_weight(m, rms, scale, base, eps):
    """``pre``'s (and ``head``'s) collapse weight: ``sigmoid(logit) + eps`` (:func:`_logit`)."""
    return tl.sigmoid(_logit(m, rms, scale, base)) + eps


@triton.jit
def _post_weight(m, rms, scale, base, mult):
    """``post_mix``: ``sigmoid(logit) * mult`` (:func:`_logit`; ``mult``: hc_post_mult_value)."""
    return tl.sigmoid(_logit(m, rms, scale, base)) * mult


@triton.jit
def _elems(x, BM: tl.constexpr, W: tl.constexpr):
    """[BM, W] -> a tuple of W tensors [BM], the columns in order (W a power of two, <= 128).

    Built by halving the last axis with ``tl.split``, which makes the compiler keep each row's W
    values in one thread: whatever is computed on the results needs no cross-thread step. The
    layout adapter from tiles to Sinkhorn's tuple form."""
    if W == 1:
        t = (tl.reshape(x, [BM]),)
    else:
        t = (x,)
        for lv in tl.static_range(7):
            if (1 << lv) < W:
                new = ()
                for k in tl.static_range(1 << lv):
                    if (W >> lv) == 2:
                        a, b = tl.split(t[k])
                    else:
                        a, b = tl.split(tl.permute(tl.reshape(t[k], [BM, 2, W >> (lv + 1)]), [0, 2, 1]))
                    new = new + (a, b)
                t = new
    return t


@triton.jit
def _rcp(x):
    """1 / x for x > 0 as rsqrt(x)**2: two instructions on sm90 (MUFU.RSQ, FMUL), where ``1.0 / x``
    (the approximate fp32 division) adds six range fix-ups; ~3e-7 relative error. The Sinkhorn
    loop is a chain of 40 such steps, so this is its latency."""
    r = tl.math.rsqrt(x)
    return r * r


# Sinkhorn works on the *tuple form* of a batch of n x n matrices: a tuple of NP*NP tensors of one
# shape, entry ``i*NP + j`` = (source i, destination j), NP = next_pow2(N); entries with i or j >= N
# are padding that every step passes through untouched. A tile of logits becomes that form through
# :func:`_elems`, which leaves whole matrices in each thread: every step below is in-thread adds and
# one reciprocal per row or column (:func:`_rcp`), no shuffles, no shared memory.


@triton.jit
def _sk_sums(c, ROWS: tl.constexpr, N: tl.constexpr, NP: tl.constexpr):
    """The N row sums (``ROWS``) or column sums of the tuple form ``c``, in index order."""
    s = ()
    for a in tl.static_range(N):
        if ROWS:
            v = c[a * NP]
            for b in tl.static_range(1, N):
                v = v + c[a * NP + b]
        else:
            v = c[a]
            for b in tl.static_range(1, N):
                v = v + c[b * NP + a]
        s = s + (v,)
    return s


@triton.jit
def _sk_scale(c, f, ROWS: tl.constexpr, N: tl.constexpr, NP: tl.constexpr):
    """Entry (i, j) of the tuple form ``c`` times ``f[i]`` (``ROWS``) or ``f[j]``; padding passes."""
    out = ()
    for i in tl.static_range(NP):
        for j in tl.static_range(NP):
            if (i < N) & (j < N):
                out = out + (c[i * NP + j] * (f[i] if ROWS else f[j]),)
            else:
                out = out + (c[i * NP + j],)
    return out


@triton.jit
def _sk_norm(c, eps, ROWS: tl.constexpr, N: tl.constexpr, NP: tl.constexpr):
    """One Sinkhorn normalisation of the tuple form: each row (``ROWS``) or column divided by its
    sum + eps (times :func:`_rcp` of it). Returns the result and the N factors (for the backward)."""
    s = _sk_sums(c, ROWS, N, NP)
    r = ()
    for a in tl.static_range(N):
        r = r + (_rcp(s[a] + eps),)
    return _sk_scale(c, r, ROWS, N, NP), r


@triton.jit
def _sk_softmax(c, eps, N: tl.constexpr, NP: tl.constexpr):
    """Sinkhorn's first step on the tuple form: the softmax of each row over j (``p``), and
    ``p + eps``. Returns ``(p, p + eps)``."""
    p = ()
    a = ()
    for i in tl.static_range(NP):
        if i < N:
            mx = c[i * NP]
            for j in tl.static_range(1, N):
                mx = tl.maximum(mx, c[i * NP + j])
            ex = ()
            tot = 0.0
            for j in tl.static_range(N):
                v = tl.exp(c[i * NP + j] - mx)
                ex = ex + (v,)
                tot = tot + v
            r = _rcp(tot)
            for j in tl.static_range(NP):
                if j < N:
                    p = p + (ex[j] * r,)
                    a = a + (ex[j] * r + eps,)
                else:
                    p = p + (c[i * NP + j],)
                    a = a + (c[i * NP + j],)
        else:
            for j in tl.static_range(NP):
                p = p + (c[i * NP + j],)
                a = a + (c[i * NP + j],)
    return p, a


@triton.jit
def _sinkhorn(c, repeat, eps, N: tl.constexpr, NP: tl.constexpr):
    """Sinkhorn on comb logits in the tuple form (see above), as ``mhc.reference.sinkhorn``:
    softmax over j plus eps, divide by column sums + eps, then ``repeat - 1`` times row then
    column normalisation. Normalisation k (0-based) is a column step at even k, a row step at
    odd k: ``backward._sinkhorn_bwd`` replays it in that order."""
    _, c = _sk_softmax(c, eps, N, NP)
    c, _ = _sk_norm(c, eps, False, N, NP)
    # while, not range: the interpreter cannot take a run-time range bound (newer numpy).
    it = 1
    while it < repeat:
        c, _ = _sk_norm(c, eps, True, N, NP)
        c, _ = _sk_norm(c, eps, False, N, NP)
        it += 1
    return c


@triton.jit
def _ld(ptr, offs, mask, sstride, n_splits, SP: tl.constexpr):
    """``sum_{s < n_splits} ptr[s * sstride + offs]`` (fp32; ``SP`` >= n_splits, a power of two;
    unrolled so that every split's load is in flight at once). SP=1 is a plain load."""
    v = tl.load(ptr + offs, mask=mask, other=0.0)
    for s in tl.static_range(1, SP):
        # (offs * 0 + n_splits): a tensor, because Triton 3.9's interpreter turns tensor & scalar-bool
        # masks into int32 and rejects them.
        v += tl.load(ptr + s * sstride + offs, mask=mask & ((offs * 0 + n_splits) > s), other=0.0)
    return v


@triton.jit
def _rms(mix_ptr, rows, n_rows, K, rms_eps, sstride, n_splits,
         N3: tl.constexpr, N3P: tl.constexpr, SP: tl.constexpr):
    """Per-token RMS factor [BM] from the sum of squares (column N3 of the logits; rows past
    ``n_rows`` read as 0)."""
    ssq = _ld(mix_ptr, rows * N3P + N3, rows < n_rows, sstride, n_splits, SP)
    return _rms_factor(ssq, K, rms_eps)


@triton.jit
def _pre_weights(mix_ptr, scale_ptr, base_ptr, n_rows, K, rms_eps, pre_eps, sstride, n_splits,
                 N: tl.constexpr, NP: tl.constexpr, N3: tl.constexpr, N3P: tl.constexpr,
                 BM: tl.constexpr, SP: tl.constexpr):
    """Collapse weights [BM, NP] fp32 of one token block: ``sigmoid(mixes[:, :N] * rms * scale[0]
    + base[:N]) + pre_eps`` (:func:`_pre_weight`; ``head`` is the same with its own eps), 0 in
    the padding.

    The logits of block row r, column c are ``sum_{s < n_splits} mix_ptr[s * sstride + r * N3P + c]``
    (fp32; the sum of squares in column N3): the reduced scratch (n_splits = 1) or the per-split
    partials (the chunked path reduces them here, in every program that needs them).
    """
    rows = tl.arange(0, BM)
    ok = rows < n_rows
    rms = _rms(mix_ptr, rows, n_rows, K, rms_eps, sstride, n_splits, N3, N3P, SP)
    c = tl.arange(0, NP)
    cm = c < N
    m = _ld(mix_ptr, rows[:, None] * N3P + c[None, :], ok[:, None] & cm[None, :], sstride, n_splits, SP)
    b = tl.load(base_ptr + c, mask=cm, other=0.0)
    w = _pre_weight(m, rms[:, None], tl.load(scale_ptr), b[None, :], pre_eps)
    return tl.where(cm[None, :], w, 0.0)


@triton.jit
def _post_comb(mix_ptr, scale_ptr, base_ptr, post_ptr, comb_ptr, n_rows, K,
               rms_eps, sk_eps, post_mult, sk_repeat, sstride, n_splits,
               N: tl.constexpr, NP: tl.constexpr, N3: tl.constexpr, N3P: tl.constexpr,
               BM: tl.constexpr, SP: tl.constexpr):
    """``pre``'s other outputs for one token block (logits as in :func:`_pre_weights`): writes the
    ``post_mix`` rows ([n_rows, N] at ``post_ptr``) and the Sinkhorn-normalised ``comb_mix`` rows
    ([n_rows, N, N] at ``comb_ptr``), fp32; Sinkhorn in-thread (:func:`_sinkhorn`)."""
    rows = tl.arange(0, BM)
    ok = rows < n_rows
    rms = _rms(mix_ptr, rows, n_rows, K, rms_eps, sstride, n_splits, N3, N3P, SP)
    c = tl.arange(0, NP)
    cm = c < N
    s1 = tl.load(scale_ptr + 1)
    s2 = tl.load(scale_ptr + 2)
    m_post = _ld(mix_ptr, rows[:, None] * N3P + N + c[None, :], ok[:, None] & cm[None, :],
                 sstride, n_splits, SP)
    b_post = tl.load(base_ptr + N + c, mask=cm, other=0.0)
    w_post = _post_weight(m_post, rms[:, None], s1, b_post[None, :], post_mult)
    tl.store(post_ptr + rows[:, None] * N + c[None, :], w_post, mask=ok[:, None] & cm[None, :])

    # [BM, NP*NP] logits (k = i*NP + j), then the tuple form (one tensor per entry).
    k = tl.arange(0, NP * NP)
    ij = (k // NP) * N + k % NP
    km = (k // NP < N) & (k % NP < N)
    m_comb = _ld(mix_ptr, rows[:, None] * N3P + 2 * N + ij[None, :], ok[:, None] & km[None, :],
                 sstride, n_splits, SP)
    b_comb = tl.load(base_ptr + 2 * N + ij, mask=km, other=0.0)
    comb = _sinkhorn(_elems(_logit(m_comb, rms[:, None], s2, b_comb[None, :]), BM, NP * NP),
                     sk_repeat, sk_eps, N, NP)
    for i in tl.static_range(N):
        for j in tl.static_range(N):
            tl.store(comb_ptr + rows * (N * N) + (i * N + j), comb[i * NP + j], mask=ok)


@triton.jit
def _gemm_slice(res_ptr, x_ptr, pm_in_ptr, cm_in_ptr, new_ptr, fn_ptr, n_rows, H, h_lo,
                N: tl.constexpr, NP: tl.constexpr, N3: tl.constexpr, N3P: tl.constexpr,
                FUSED: tl.constexpr, BM: tl.constexpr, BH: tl.constexpr, STEPS: tl.constexpr,
                INTERPRET: tl.constexpr, EXACT_BF16: tl.constexpr):
    """One program's slice of the prenorm GEMM: rows [0, n_rows) of a token block (pointers
    already offset to the block), hidden elements [h_lo, h_lo + STEPS*BH) of every stream.
    Returns [BM, N3P] fp32: ``x . fn^T`` in columns < N3, the sum of squares in column N3.
    FUSED: the residual is ``post`` of the previous sublayer, computed here, rounded, stored to
    ``new_ptr`` and fed to the GEMM from registers."""
    K = N * H
    rows = tl.arange(0, BM)
    row_ok = rows < n_rows
    i = tl.arange(0, NP)
    i_ok = i < N
    col = tl.arange(0, N3P)
    col_ok = col < N3
    kk = tl.arange(0, NP * BH)
    acc = tl.zeros([BM, N3P], dtype=tl.float32)
    ssq = tl.zeros([BM], dtype=tl.float32)
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
            v = _to_act(v, new_ptr.dtype.element_ty, INTERPRET)
            tl.store(new_ptr + off3, v, mask=m3)
            # pre reads the new residual as stored: rounded to the residual dtype.
            x = tl.reshape(tl.where(m3, v.to(tl.float32), 0.0), [BM, NP * BH])
        else:
            x = tl.load(res_ptr + rows[:, None] * K + ((kk // BH) * H + hk)[None, :],
                        mask=row_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        w = tl.load(fn_ptr + col[None, :] * K + ((kk // BH) * H + hk)[:, None],
                    mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc, ssq = _prenorm_tile(acc, ssq, x, w, INTERPRET, EXACT_BF16)
    # The sum of squares rides in column N3 of the partials, which the GEMM leaves at 0.
    return tl.where(col[None, :] == N3, ssq[:, None], acc)


@triton.jit
def _tail_prefetch(src_ptr, n_rows, H, N: tl.constexpr, RB: tl.constexpr, BC: tl.constexpr, PF: tl.constexpr,
                   INTERPRET: tl.constexpr):
    """The first PF hidden chunks (BC wide) of every stream of the first RB rows of ``src_ptr``
    (T, N, H): a tuple of PF*N tiles [RB, BC], entry c*N + i = chunk c of stream i. Issued before
    the mixes are known, so that :func:`_tail`'s collapse does not wait for them afterwards."""
    r = tl.arange(0, RB)
    hh = tl.arange(0, BC)
    xs = ()
    for c in tl.static_range(PF):
        h = c * BC + hh
        m = (r < n_rows)[:, None] & (h < H)[None, :]
        for i in tl.static_range(N):
            x = tl.load(src_ptr + r[:, None] * (N * H) + i * H + h[None, :], mask=m, other=0.0)
            if INTERPRET:  # the interpreter: fp32 right after the load
                x = x.to(tl.float32)
            xs = xs + (x,)
    return xs


@triton.jit
def _tail_params(scale_ptr, base_ptr, N3: tl.constexpr, HEAD: tl.constexpr):
    """hc_scale then hc_base as scalars, (s0, b_0..b_{N3-1}) for HEAD, else (s0, s1, s2, b_0..):
    loaded before the last program is known, so that :func:`_tail` does not wait for them after
    its reductions (a barrier stops the compiler from hoisting them)."""
    if HEAD:
        p = (tl.load(scale_ptr),)
    else:
        p = (tl.load(scale_ptr), tl.load(scale_ptr + 1), tl.load(scale_ptr + 2))
    for k in tl.static_range(N3):
        p = p + (tl.load(base_ptr + k),)
    return p


@triton.jit
def _tail(part_blk, n_splits, src_ptr, out_ptr, post_ptr, comb_ptr, prm, xs, n_rows, H,
          rms_eps, pre_eps, sk_eps, post_mult, sk_repeat,
          N: tl.constexpr, NP: tl.constexpr, N3: tl.constexpr, N3P: tl.constexpr, HEAD: tl.constexpr,
          BM: tl.constexpr, SP: tl.constexpr, RB: tl.constexpr, BC: tl.constexpr, PF: tl.constexpr,
          INTERPRET: tl.constexpr, nw_ptr=None, norm_eps=0.0, NORM: tl.constexpr = False,
          NCH: tl.constexpr = 1):
    """The last program's work in ``mix_kernel`` (blocks of at most RB valid rows):
    sums the splits' partials straight into registers, one tensor [RB] per mixes column
    (:func:`_elems`; no scratch round trip); ``prm``: :func:`_tail_params`; collapses into ``out_ptr`` from the prefetched tiles
    ``xs`` (:func:`_tail_prefetch`, then the chunks past PF), and writes ``post_mix`` and the
    in-thread Sinkhorn's ``comb_mix`` last, so that the collapse's stores drain meanwhile.
    ``NORM``: the collapse covers the row in NCH chunks of BC held in registers (fp32), then the
    fused RMSNorm with ``nw_ptr``/``norm_eps`` (:func:`_norm_store`)."""
    K = N * H
    r = tl.arange(0, RB)
    r_ok = r < n_rows
    s = tl.arange(0, SP)
    e = tl.arange(0, RB * N3P)
    p = tl.load(part_blk + s[:, None] * (BM * N3P) + e[None, :],
                mask=(s < n_splits)[:, None] & (e < n_rows * N3P)[None, :], other=0.0, cache_modifier=".cg")
    m = _elems(tl.reshape(tl.sum(p, axis=0), [RB, N3P]), RB, N3P)
    rms = _rms_factor(m[N3], K, rms_eps)
    B: tl.constexpr = 1 if HEAD else 3  # prm: scales, then hc_base from index B
    w = ()
    for i in tl.static_range(N):
        w = w + (_pre_weight(m[i], rms, prm[0], prm[B + i], pre_eps),)
    hh = tl.arange(0, BC)
    if NORM:
        ys = ()
        ssq = tl.zeros([RB], dtype=tl.float32)
        for c in tl.static_range(NCH):
            h = c * BC + hh
            if c < PF:
                y = w[0][:, None] * xs[c * N].to(tl.float32)
                for i in tl.static_range(1, N):
                    y += w[i][:, None] * xs[c * N + i].to(tl.float32)
            else:
                msk = r_ok[:, None] & (h < H)[None, :]
                y = tl.zeros([RB, BC], dtype=tl.float32)
                for i in tl.static_range(N):
                    x = tl.load(src_ptr + r[:, None] * K + i * H + h[None, :], mask=msk, other=0.0).to(tl.float32)
                    y += w[i][:, None] * x
            ssq += tl.sum(y * y, axis=1)
            ys = ys + (y,)
        _norm_store(out_ptr, ys, ssq, nw_ptr, r, r_ok, H, norm_eps, BC, NCH, INTERPRET)
    else:
        for c in tl.static_range(PF):
            h = c * BC + hh
            y = w[0][:, None] * xs[c * N].to(tl.float32)
            for i in tl.static_range(1, N):
                y += w[i][:, None] * xs[c * N + i].to(tl.float32)
            tl.store(out_ptr + r[:, None] * H + h[None, :], _to_act(y, out_ptr.dtype.element_ty, INTERPRET),
                     mask=r_ok[:, None] & (h < H)[None, :])
    h0 = H if NORM else PF * BC
    while h0 < H:
        h = h0 + hh
        msk = r_ok[:, None] & (h < H)[None, :]
        y = tl.zeros([RB, BC], dtype=tl.float32)
        for i in tl.static_range(N):
            x = tl.load(src_ptr + r[:, None] * K + i * H + h[None, :], mask=msk, other=0.0).to(tl.float32)
            y += w[i][:, None] * x
        tl.store(out_ptr + r[:, None] * H + h[None, :], _to_act(y, out_ptr.dtype.element_ty, INTERPRET), mask=msk)
        h0 += BC
    if not HEAD:
        for j in tl.static_range(N):
            tl.store(post_ptr + r * N + j, _post_weight(m[N + j], rms, prm[1], prm[B + N + j], post_mult),
                     mask=r_ok)
        cc = ()
        for i in tl.static_range(NP):
            for j in tl.static_range(NP):
                if i < N:
                    if j < N:
                        cc = cc + (_logit(m[2 * N + i * N + j], rms, prm[2], prm[B + 2 * N + i * N + j]),)
                    else:
                        cc = cc + (rms,)  # padding: passes through
                else:
                    cc = cc + (rms,)
        cc = _sinkhorn(cc, sk_repeat, sk_eps, N, NP)
        for i in tl.static_range(N):
            for j in tl.static_range(N):
                tl.store(comb_ptr + r * (N * N) + (i * N + j), cc[i * NP + j], mask=r_ok)


@triton.jit
def mix_kernel(
    res_ptr, x_ptr, pm_in_ptr, cm_in_ptr, new_ptr,
    fn_ptr, scale_ptr, base_ptr,
    post_ptr, comb_ptr, out_ptr,
    part_ptr, cnt_ptr,
    T, H, n_splits,
    rms_eps, pre_eps, sk_eps, post_mult, sk_repeat, nw_ptr, norm_eps,
    N: tl.constexpr, NP: tl.constexpr, N3: tl.constexpr, N3P: tl.constexpr,
    HEAD: tl.constexpr, FUSED: tl.constexpr,
    BM: tl.constexpr, BH: tl.constexpr, STEPS: tl.constexpr, SP: tl.constexpr, BC: tl.constexpr,
    INTERPRET: tl.constexpr, EXACT_BF16: tl.constexpr,
    RB: tl.constexpr = 1, PF: tl.constexpr = 0,
    NORM: tl.constexpr = False, NCH: tl.constexpr = 1,
):
    """``pre`` (HEAD=False, FUSED=False), ``head`` (HEAD=True) or ``fused_post_pre`` (FUSED=True).

    Inputs: ``res_ptr`` (T, N, H) residual (for FUSED: the residual before ``post``); FUSED only:
    ``x_ptr`` (T, H) sublayer output, ``pm_in_ptr`` (T, N) and ``cm_in_ptr`` (T, N, N) fp32 mixes,
    ``new_ptr`` (T, N, H) output new residual. ``fn_ptr`` (N3, N*H) fp32, ``scale_ptr`` (3,) or
    (1,), ``base_ptr`` (N3,) fp32. Outputs: ``post_ptr`` (T, N) and ``comb_ptr`` (T, N, N) fp32
    (not for HEAD), ``out_ptr`` (T, H) in the residual dtype. Workspace: ``part_ptr``
    (num_m, n_splits, BM, N3P) fp32 partials, ``cnt_ptr`` (num_m,) int32 counters that are zero on
    entry and left zero on exit.
    ``INTERPRET``: interpreter mode (fp32 GEMM, bf16 rounding emulated, see :func:`_to_act`).
    Blocks of at most RB valid rows (T <= RB): the last program of a block runs :func:`_tail`
    (partials reduced in registers, collapse from PF prefetched chunks of BC, Sinkhorn in-thread,
    written last).
    Grid: (cdiv(T, BM), n_splits); split s takes hidden elements [s, s+1) * STEPS*BH;
    ``n_splits <= SP``.
    ``NORM`` (not HEAD): ``layer_input`` gets the fused RMSNorm with ``nw_ptr`` (H,) and
    ``norm_eps``, the tail holding the row's collapse in NCH chunks of BC (NCH * BC >= H).
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
    col = tl.arange(0, N3P)

    # Phase 1: this split's slice of the prenorm GEMM and of the sum of squares.
    acc = _gemm_slice(res_ptr, x_ptr, pm_in_ptr, cm_in_ptr, new_ptr, fn_ptr, n_rows, H, pid_s * (STEPS * BH),
                      N, NP, N3, N3P, FUSED, BM, BH, STEPS, INTERPRET, EXACT_BF16)
    prm = _tail_params(scale_ptr, base_ptr, N3, HEAD)
    part_blk = part_ptr + pid_m.to(tl.int64) * n_splits * (BM * N3P)
    tl.store(part_blk + pid_s * (BM * N3P) + rows[:, None] * N3P + col[None, :], acc,
             mask=row_ok[:, None])
    # Release this program's partials (and new-residual stores) before counting in; the last
    # program of the token block acquires them all.
    tl.debug_barrier()
    done = tl.atomic_add(cnt_ptr + pid_m, 1, sem="acq_rel", scope="gpu")
    if done == n_splits - 1:
        tl.debug_barrier()
        if FUSED:
            src = new_ptr
        else:
            src = res_ptr
        xs = _tail_prefetch(src, n_rows, H, N, RB, BC, PF, INTERPRET)
        _tail(part_blk, n_splits, src, out_ptr, post_ptr, comb_ptr, prm, xs, n_rows, H,
              rms_eps, pre_eps, sk_eps, post_mult, sk_repeat, N, NP, N3, N3P, HEAD, BM, SP, RB, BC, PF, INTERPRET,
              nw_ptr, norm_eps, NORM, NCH)
        tl.atomic_xchg(cnt_ptr + pid_m, 0)


@triton.jit
def _collapse_range(src_ptr, out_ptr, w, n_rows, H, h_lo,
                    N: tl.constexpr, NP: tl.constexpr, BM: tl.constexpr, BC: tl.constexpr,
                    CSTEPS: tl.constexpr, INTERPRET: tl.constexpr):
    """:func:`_collapse` over the hidden range [h_lo, h_lo + CSTEPS*BC) only, in [BM, NP, BC]
    tiles; a compile-time trip count, so that Triton pipelines the loads."""
    rows = tl.arange(0, BM)
    i = tl.arange(0, NP)
    row_ok = rows < n_rows
    base_mask = row_ok[:, None, None] & (i < N)[None, :, None]
    src = src_ptr + rows[:, None, None] * (N * H) + i[None, :, None] * H
    for st in range(0, CSTEPS):
        h = h_lo + st * BC + tl.arange(0, BC)
        x = tl.load(src + h[None, None, :], mask=base_mask & (h < H)[None, None, :], other=0.0)
        y = tl.sum(x.to(tl.float32) * w[:, :, None], axis=1)
        tl.store(out_ptr + rows[:, None] * H + h[None, :], _to_act(y, out_ptr.dtype.element_ty, INTERPRET),
                 mask=row_ok[:, None] & (h < H)[None, :])


@triton.jit
def _norm_store(out_ptr, ys, ssq, nw_ptr, rows, r_ok, H, norm_eps, BC: tl.constexpr, NCH: tl.constexpr,
                INTERPRET: tl.constexpr):
    """The fused RMSNorm's end: ``out[r, h] = act(ys[c][r, h'] * rms[r] * nw[h])`` for the NCH
    chunks ``ys`` (a tuple of [R, BC] fp32 tiles, chunk c = hidden [c*BC, (c+1)*BC)) of the
    unrounded collapse of rows ``rows`` (those with ``r_ok``), ``ssq`` [R] their fp32 sums of
    squares (0 past H), ``rms = _rms_factor(ssq, H, norm_eps)`` (one RMS rule for every factor),
    ``nw_ptr`` (H,) the norm weight (any float dtype, taken in fp32). One rounding per element."""
    rms = _rms_factor(ssq, H, norm_eps)
    hh = tl.arange(0, BC)
    for c in tl.static_range(NCH):
        h = c * BC + hh
        nw = tl.load(nw_ptr + h, mask=h < H, other=0.0).to(tl.float32)
        z = ys[c] * rms[:, None] * nw[None, :]
        tl.store(out_ptr + rows[:, None] * H + h[None, :], _to_act(z, out_ptr.dtype.element_ty, INTERPRET),
                 mask=r_ok[:, None] & (h < H)[None, :])


@triton.jit
def _collapse_norm(src_ptr, out_ptr, w, nw_ptr, n_rows, H, norm_eps,
                   N: tl.constexpr, NP: tl.constexpr, BM: tl.constexpr, BC: tl.constexpr, NCH: tl.constexpr,
                   INTERPRET: tl.constexpr):
    """:func:`_collapse_range` over whole rows, RMS-normalised (``pre`` with ``norm_weight``):
    rows [0, n_rows) of ``src_ptr`` (T, N, H) collapsed with weights ``w`` [BM, NP] in NCH
    chunks of BC (NCH * BC >= H) that stay in registers in fp32, so that the residual is read once
    and the norm sees the unrounded sum; then :func:`_norm_store`."""
    rows = tl.arange(0, BM)
    i = tl.arange(0, NP)
    row_ok = rows < n_rows
    base_mask = row_ok[:, None, None] & (i < N)[None, :, None]
    src = src_ptr + rows[:, None, None] * (N * H) + i[None, :, None] * H
    ys = ()
    ssq = tl.zeros([BM], dtype=tl.float32)
    for c in tl.static_range(NCH):
        h = c * BC + tl.arange(0, BC)
        x = tl.load(src + h[None, None, :], mask=base_mask & (h < H)[None, None, :], other=0.0).to(tl.float32)
        y = tl.sum(x * w[:, :, None], axis=1)
        ssq += tl.sum(y * y, axis=1)
        ys = ys + (y,)
    _norm_store(out_ptr, ys, ssq, nw_ptr, rows, row_ok, H, norm_eps, BC, NCH, INTERPRET)


@triton.jit
def _b_collapse(src, out, mix, scale_ptr, base_ptr, n_rows, H, hc, rms_eps, pre_eps, sstride, n_splits,
                N: tl.constexpr, NP: tl.constexpr, N3: tl.constexpr, N3P: tl.constexpr, BMB: tl.constexpr,
                SP: tl.constexpr, BC: tl.constexpr, CSTEPS: tl.constexpr, INTERPRET: tl.constexpr):
    """A phase B collapse program of ``chunk_kernel`` with BSPLIT: weights from the partials, then
    hidden chunk ``hc``. With CSTEPS == 1 the residual tile is loaded first, so that its load
    does not wait for the partials'."""
    K = N * H
    if CSTEPS == 1:
        rows = tl.arange(0, BMB)
        i = tl.arange(0, NP)
        h = hc * BC + tl.arange(0, BC)
        row_ok = rows < n_rows
        x = tl.load(src + rows[:, None, None] * K + i[None, :, None] * H + h[None, None, :],
                    mask=row_ok[:, None, None] & (i < N)[None, :, None] & (h < H)[None, None, :], other=0.0)
        if INTERPRET:  # the interpreter: fp32 right after the load (on GPUs at the use, not to wait)
            x = x.to(tl.float32)
        wts = _pre_weights(mix, scale_ptr, base_ptr, n_rows, K, rms_eps, pre_eps, sstride, n_splits,
                           N, NP, N3, N3P, BMB, SP)
        y = tl.sum(x.to(tl.float32) * wts[:, :, None], axis=1)
        tl.store(out + rows[:, None] * H + h[None, :], _to_act(y, out.dtype.element_ty, INTERPRET),
                 mask=row_ok[:, None] & (h < H)[None, :])
    else:
        wts = _pre_weights(mix, scale_ptr, base_ptr, n_rows, K, rms_eps, pre_eps, sstride, n_splits,
                           N, NP, N3, N3P, BMB, SP)
        _collapse_range(src, out, wts, n_rows, H, hc * (CSTEPS * BC), N, NP, BMB, BC, CSTEPS, INTERPRET)


@triton.jit(do_not_specialize=["T", "c_a", "c_b", "n_b"])
def chunk_kernel(
    res_ptr, x_ptr, pm_in_ptr, cm_in_ptr, new_ptr,
    fn_ptr, scale_ptr, base_ptr,
    post_ptr, comb_ptr, out_ptr, part_ptr,
    T, H, n_splits, c_a, c_b, n_b,
    rms_eps, pre_eps, sk_eps, post_mult, sk_repeat, nw_ptr, norm_eps,
    N: tl.constexpr, NP: tl.constexpr, N3: tl.constexpr, N3P: tl.constexpr,
    HEAD: tl.constexpr, FUSED: tl.constexpr, CHUNK: tl.constexpr,
    BM: tl.constexpr, BH: tl.constexpr, STEPS: tl.constexpr, SP: tl.constexpr,
    BMB: tl.constexpr, BC: tl.constexpr, CSTEPS: tl.constexpr,
    INTERPRET: tl.constexpr, EXACT_BF16: tl.constexpr,
    BSPLIT: tl.constexpr = False,
    NORM: tl.constexpr = False, NCH: tl.constexpr = 1,
):
    """The chunked two-role form of ``mix_kernel``: tokens go in chunks of CHUNK, and each launch
    runs phase B of chunk ``c_b`` (programs [0, n_b)) beside phase A of chunk ``c_a`` (the rest),
    so that B's re-read of chunk c_b's residual comes from L2 while A streams chunk c_a from HBM.
    The launcher runs chunks 0..C-1 as launches (A 0), (A 1, B 0), ..., (B C-1); a negative
    ``c_a`` or ``n_b`` = 0 leaves a role out.

    Phase A, program (m, s) (m-major): token block m (BM tokens) of chunk c_a, hidden split s
    (STEPS*BH elements of every stream): the prenorm GEMM slice and sum of squares
    (:func:`_gemm_slice`) -> ``part_ptr`` [n_splits, T, N3P] fp32 at [s, token]. FUSED: it also
    writes the new residual.
    Phase B, program (m, c) (m-major): token block m (BMB tokens) of chunk c_b, hidden chunk c
    (CSTEPS*BC elements): reduces the partials of its tokens (every program of the block does,
    redundantly: a few hundred bytes per token), computes the collapse weights and collapses its
    hidden chunk into ``out_ptr``; hidden chunk 0 also writes ``post_mix`` and ``comb_mix``
    (Sinkhorn). Pointers and scalars as in ``mix_kernel``. CHUNK is a multiple of BM and BMB.
    ``BSPLIT`` (not HEAD): each token
    block has one more phase B program, hidden chunk ``n_hc``, that writes ``post_mix`` and
    ``comb_mix`` alone, beside the collapse programs instead of before hidden chunk 0's collapse;
    with CSTEPS == 1 a collapse program also loads its residual tile before the partials.
    ``NORM`` (not HEAD): the fused RMSNorm (``nw_ptr`` (H,), ``norm_eps``); a collapse program
    then owns whole rows (one hidden chunk per token block, NCH chunks of BC held in registers,
    :func:`_collapse_norm`), since the norm needs the row's sum of squares before any store.
    """
    pid = tl.program_id(0)
    K = N * H
    if pid < n_b:
        if NORM:
            n_hc = 1
        else:
            n_hc = tl.cdiv(H, CSTEPS * BC)
        n_hc_e = n_hc
        if BSPLIT:
            if not HEAD:
                n_hc_e = n_hc + 1
        mb = pid // n_hc_e
        hc = pid % n_hc_e
        row0 = c_b * CHUNK + mb * BMB
        n_rows = T - row0
        blk = row0.to(tl.int64)
        mix = part_ptr + blk * N3P
        sstride = T.to(tl.int64) * N3P
        if FUSED:
            src = new_ptr + blk * K
        else:
            src = res_ptr + blk * K
        if BSPLIT:
            if HEAD:
                _b_collapse(src, out_ptr + blk * H, mix, scale_ptr, base_ptr, n_rows, H, hc, rms_eps, pre_eps,
                            sstride, n_splits, N, NP, N3, N3P, BMB, SP, BC, CSTEPS, INTERPRET)
            elif hc == n_hc:
                _post_comb(mix, scale_ptr, base_ptr, post_ptr + blk * N, comb_ptr + blk * (N * N), n_rows, K,
                           rms_eps, sk_eps, post_mult, sk_repeat, sstride, n_splits, N, NP, N3, N3P, BMB, SP)
            elif NORM:
                wts = _pre_weights(mix, scale_ptr, base_ptr, n_rows, K, rms_eps, pre_eps, sstride, n_splits,
                                   N, NP, N3, N3P, BMB, SP)
                _collapse_norm(src, out_ptr + blk * H, wts, nw_ptr, n_rows, H, norm_eps, N, NP, BMB, BC, NCH,
                               INTERPRET)
            else:
                _b_collapse(src, out_ptr + blk * H, mix, scale_ptr, base_ptr, n_rows, H, hc, rms_eps, pre_eps,
                            sstride, n_splits, N, NP, N3, N3P, BMB, SP, BC, CSTEPS, INTERPRET)
        else:
            if not HEAD:
                if hc == 0:
                    _post_comb(mix, scale_ptr, base_ptr, post_ptr + blk * N, comb_ptr + blk * (N * N), n_rows, K,
                               rms_eps, sk_eps, post_mult, sk_repeat, sstride, n_splits, N, NP, N3, N3P, BMB, SP)
            wts = _pre_weights(mix, scale_ptr, base_ptr, n_rows, K, rms_eps, pre_eps, sstride, n_splits,
                               N, NP, N3, N3P, BMB, SP)
            if NORM:
                _collapse_norm(src, out_ptr + blk * H, wts, nw_ptr, n_rows, H, norm_eps, N, NP, BMB, BC, NCH,
                               INTERPRET)
            else:
                _collapse_range(src, out_ptr + blk * H, wts, n_rows, H, hc * (CSTEPS * BC),
                                N, NP, BMB, BC, CSTEPS, INTERPRET)
    else:
        p = pid - n_b
        m = p // n_splits
        s = p % n_splits
        row0 = c_a * CHUNK + m * BM
        n_rows = T - row0
        blk = row0.to(tl.int64)
        acc = _gemm_slice(res_ptr + blk * K, x_ptr + blk * H, pm_in_ptr + blk * N, cm_in_ptr + blk * (N * N),
                          new_ptr + blk * K, fn_ptr, n_rows, H, s * (STEPS * BH),
                          N, NP, N3, N3P, FUSED, BM, BH, STEPS, INTERPRET, EXACT_BF16)
        rows = tl.arange(0, BM)
        col = tl.arange(0, N3P)
        tl.store(part_ptr + s.to(tl.int64) * T * N3P + (blk + rows[:, None]) * N3P + col[None, :], acc,
                 mask=(rows < n_rows)[:, None])


@triton.jit
def _grid_order(pid, n_a, n_b, B_FAST: tl.constexpr):
    """(a, b) of program ``pid`` on an ``n_a`` x ``n_b`` grid flattened to one axis: b fastest
    (consecutive programs share a) if ``B_FAST``, else a fastest."""
    if B_FAST:
        return pid // n_b, pid % n_b
    else:
        return pid % n_a, pid // n_a


@triton.jit
def _prenorm_block(x_ptr, w_ptr, part_ptr, row0, s, T, K, sstride,
                   N3: tl.constexpr, N3P: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
                   STEPS: tl.constexpr, PREC: tl.constexpr, EXACT_BF16: tl.constexpr, EVEN_K: tl.constexpr):
    """Rows [row0, row0 + BM) (those < T) x split s of the K axis of the prenorm GEMM and sum of
    squares, stored as partials (see :func:`prenorm_kernel`, which documents the arguments)."""
    rows = row0 + tl.arange(0, BM)
    r_ok = rows < T
    col = tl.arange(0, N3P)
    kk = tl.arange(0, BK)
    k0 = s * (STEPS * BK)
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * K
    acc = tl.zeros([BM, N3P], dtype=tl.float32)
    ssq = tl.zeros([BM], dtype=tl.float32)
    for step in range(0, STEPS):
        k = k0 + step * BK + kk
        if EVEN_K:
            k_ok = kk < BK
        else:
            k_ok = k < K
        xt = tl.load(x_rows + k[None, :], mask=r_ok[:, None] & k_ok[None, :], other=0.0)
        xf = xt.to(tl.float32)
        ssq += tl.sum(xf * xf, axis=1)
        if PREC == "hilo":
            w_off = col[None, :] * K + k[:, None]
            w_hi = tl.load(w_ptr + w_off, mask=k_ok[:, None], other=0.0)
            w_lo = tl.load(w_ptr + N3P * K + w_off, mask=k_ok[:, None], other=0.0)
            x_hi = xt.to(tl.bfloat16)
            acc = tl.dot(x_hi, w_hi, acc)
            acc = tl.dot(x_hi, w_lo, acc)
            if not EXACT_BF16:
                acc = tl.dot((xf - x_hi.to(tl.float32)).to(tl.bfloat16), w_hi, acc)
        else:
            w = tl.load(w_ptr + col[None, :] * K + k[:, None], mask=k_ok[:, None] & (col < N3)[None, :],
                        other=0.0)
            acc = tl.dot(xf, w, acc, input_precision=PREC)
    out = tl.where(col[None, :] == N3, ssq[:, None], acc)
    tl.store(part_ptr + s * sstride + rows[:, None] * N3P + col[None, :], out, mask=r_ok[:, None])


@triton.jit(do_not_specialize=["T"])
def prenorm_kernel(x_ptr, w_ptr, part_ptr, T, K, sstride,
                   N3: tl.constexpr, N3P: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
                   STEPS: tl.constexpr, PREC: tl.constexpr, EXACT_BF16: tl.constexpr,
                   EVEN_K: tl.constexpr, SPLIT_FAST: tl.constexpr):
    """The prenorm GEMM with its sum of squares, and nothing else (the first of the two passes).

    ``x_ptr`` (T, K) residual rows (K = n*H, the residual's dtype); split s of the K axis
    (``STEPS*BK`` columns) writes ``part[s, t, c] = sum_k x[t, k] * fn[c, k]`` for c < N3 and
    ``part[s, t, N3] = sum_k x[t, k]**2`` (fp32; ``part_ptr + s*sstride + t*N3P + c``; the
    columns past N3 are 0). ``w_ptr``: ``PREC == "hilo"``: fn split by :func:`prep_kernel`,
    (2*N3P, K) bf16 hi then lo rows, two bf16 dots per step (~16 mantissa bits of fn; the
    residual is exact in bf16, an fp16 one is split in two bf16 terms unless ``EXACT_BF16``);
    ``"tf32"``/``"ieee"``: fn itself, (N3, K) fp32, one dot of that input precision ("ieee"
    under the interpreter). ``EVEN_K``: K is a multiple of STEPS*BK (no K mask).
    Grid: (cdiv(T, BM) * n_splits,), n_splits = cdiv(K, STEPS*BK); ``SPLIT_FAST``: the splits
    of one token block on consecutive programs (else the token blocks of one split).
    """
    m, s = _grid_order(tl.program_id(0), tl.cdiv(T, BM), tl.cdiv(K, STEPS * BK), SPLIT_FAST)
    _prenorm_block(x_ptr, w_ptr, part_ptr, m * BM, s, T, K, sstride,
                   N3, N3P, BM, BK, STEPS, PREC, EXACT_BF16, EVEN_K)


@triton.jit(do_not_specialize=["T", "n_pc"])
def finalize_kernel(src_ptr, out_ptr, part_ptr, scale_ptr, base_ptr, post_ptr, comb_ptr,
                    T, H, n_splits, sstride, n_pc,
                    rms_eps, pre_eps, sk_eps, post_mult, sk_repeat, nw_ptr, norm_eps,
                    N: tl.constexpr, NP: tl.constexpr, N3: tl.constexpr, N3P: tl.constexpr,
                    SP: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, BMB: tl.constexpr,
                    HEAD: tl.constexpr, INTERPRET: tl.constexpr,
                    NORM: tl.constexpr = False, NCH: tl.constexpr = 1):
    """The second pass of ``pre``/``head``/``fused_post_pre`` over T tokens whose partials
    :func:`prenorm_kernel` wrote (``part_ptr``, split stride ``sstride``, ``n_splits`` of them).

    Programs [0, n_pc) (not ``HEAD``; n_pc = 0 for ``head``): BMB tokens each, reduce their partials and write
    ``post_mix`` (T, N) and the Sinkhorn-normalised ``comb_mix`` (T, N, N) fp32. The rest: BT
    tokens x BC hidden columns each, hidden blocks of a token on consecutive programs (as
    ``post_kernel``): the residual tile ``src_ptr`` (T, N, H) is loaded first, then the collapse
    weights from the partials (:func:`_pre_weights`, every program reducing its own tokens'
    partials), then ``out_ptr`` (T, H) in the residual's dtype. The residual is read a second time
    here, from memory (L2-sized token chunks did not pay: docs/tuning/triton.md).
    ``NORM`` (not HEAD): the fused RMSNorm (``nw_ptr`` (H,), ``norm_eps``); a collapse program
    then owns BT whole rows (NCH chunks of BC in registers, :func:`_collapse_norm`): the norm needs
    the row's sum of squares before its first store, and this keeps the residual read once.
    """
    pid = tl.program_id(0)
    K = N * H
    if pid < n_pc:
        if not HEAD:
            row0 = pid * BMB
            blk = row0.to(tl.int64)
            _post_comb(part_ptr + blk * N3P, scale_ptr, base_ptr, post_ptr + blk * N, comb_ptr + blk * (N * N),
                       T - row0, K, rms_eps, sk_eps, post_mult, sk_repeat, sstride, n_splits,
                       N, NP, N3, N3P, BMB, SP)
    elif NORM:
        row0 = (pid - n_pc) * BT
        blk = row0.to(tl.int64)
        wts = _pre_weights(part_ptr + blk * N3P, scale_ptr, base_ptr, T - row0, K, rms_eps, pre_eps, sstride,
                           n_splits, N, NP, N3, N3P, BT, SP)
        _collapse_norm(src_ptr + blk * K, out_ptr + blk * H, wts, nw_ptr, T - row0, H, norm_eps,
                       N, NP, BT, BC, NCH, INTERPRET)
    else:
        p = pid - n_pc
        n_hb = tl.cdiv(H, BC)
        tb = p // n_hb
        hb = p % n_hb
        row0 = tb * BT
        blk = row0.to(tl.int64)
        _b_collapse(src_ptr + blk * K, out_ptr + blk * H, part_ptr + blk * N3P, scale_ptr, base_ptr,
                    T - row0, H, hb, rms_eps, pre_eps, sstride, n_splits,
                    N, NP, N3, N3P, BT, SP, BC, 1, INTERPRET)


@triton.jit
def post_kernel(x_ptr, res_ptr, pm_ptr, cm_ptr, out_ptr, T, H,
                N: tl.constexpr, NP: tl.constexpr, BH: tl.constexpr, INTERPRET: tl.constexpr,
                H_FAST: tl.constexpr = True):
    """``out[t, j, h] = pm[t, j] * x[t, h] + sum_i cm[t, i, j] * res[t, i, h]`` (fp32 math).

    ``x`` (T, H), ``res`` and ``out`` (T, N, H) in the residual dtype; ``pm`` (T, N), ``cm``
    (T, N, N) fp32. Grid: (T * cdiv(H, BH),), one program per token x BH hidden columns of every
    stream. ``H_FAST``: consecutive programs take consecutive hidden blocks of the same token, so
    that the programs in flight at once read and write contiguous memory (else consecutive tokens
    of one hidden block, 2*N*H bytes apart). ``INTERPRET``: under the interpreter (see
    :func:`_to_act`).
    """
    tb, hb = _grid_order(tl.program_id(0), T, tl.cdiv(H, BH), H_FAST)
    # A (1, BH) tile of token tb: the tile shape the measured kernel ran with.
    t = tb.to(tl.int64) + tl.arange(0, 1)
    h = hb * BH + tl.arange(0, BH)
    ok = (t < T)[:, None] & (h < H)[None, :]
    j = tl.arange(0, NP)
    jm = (t < T)[:, None] & (j < N)[None, :]
    x = tl.load(x_ptr + t[:, None] * H + h[None, :], mask=ok, other=0.0).to(tl.float32)
    pm = tl.load(pm_ptr + t[:, None] * N + j[None, :], mask=jm, other=0.0)
    acc = pm[:, :, None] * x[:, None, :]
    for i in tl.static_range(N):
        r = tl.load(res_ptr + (t[:, None] * N + i) * H + h[None, :], mask=ok, other=0.0).to(tl.float32)
        cw = tl.load(cm_ptr + (t[:, None] * N + i) * N + j[None, :], mask=jm, other=0.0)
        acc += cw[:, :, None] * r[:, None, :]
    tl.store(out_ptr + (t[:, None, None] * N + j[None, :, None]) * H + h[None, None, :],
             _to_act(acc, out_ptr.dtype.element_ty, INTERPRET),
             mask=jm[:, :, None] & (h < H)[None, None, :])
