"""TileLang kernels for mHC (imported only on first use: importing tilelang imports tvm and z3).

Two kernel families, each built by a function of compile-time facts (n, H, launch config) and
compiled once per key by ``mhc.backends.tilelang.launch.KERNELS``. The mixes' math is written
once, in the helpers that the kernels call: :func:`_rms_factor`, :func:`_logit`,
:func:`_pre_weight`, :func:`_post_weight` and the Sinkhorn macro (:func:`_sinkhorn`).

``post``  (:func:`build_post`)
    Elementwise over (T, H-block): each thread loads 8 consecutive bf16 of ``x`` and of every
    residual stream (16-byte loads), forms ``out[t, j, h] = post_mix[t, j] * x[t, h] +
    sum_i comb_mix[t, i, j] * residual[t, i, h]`` in fp32, stores bf16. One pass: the floor.

``mix``   (:func:`build_mix`, modes ``pre``, ``head``, ``fused``)
    One CTA owns a tile of ``BM`` tokens x one slice of ``HC`` hidden columns in *every* stream
    (k = i*H + h for all i, h in the slice), held in shared memory for the whole kernel, so the
    residual is read from HBM exactly once:

    1. load the tile (``fused``: form the new residual from x, the old residual and the previous
       mixes, write it out, and keep the bf16-rounded copy), accumulating sum of squares;
    2. partial mix logits ``tile @ fn_slice.T`` on the tensor cores. ``fn`` is fp32; each fp32
       weight is split into bf16 ``hi + lo`` (16 significant bits) and both halves go into one
       GEMM with 2m output columns, so a bf16 MMA with fp32 accumulation reproduces the fp32
       product to ~1e-5 relative (the residual itself is exact in bf16);
    3. store the partial logits and sum of squares (one row of ``MP`` floats per token) to a
       workspace slot of its own, then a release-increment of the block's arrival counter;
    4. spin (one thread, acquire loads) until all ``S`` slices of the token block have arrived;
       each CTA then sums its 1/S share of the block's partials over the S slots in slice order
       (deterministic: fp32 atomics would make the result vary run to run), publishes it, and
       waits on a second counter for the other shares;
    5. RMS scale and sigmoid weights per token; slice 0 also writes ``post_mix`` and runs
       Sinkhorn (one thread per token, n x n in registers, runtime ``sinkhorn_repeat``; one
       reciprocal per row/column sum then multiplies: a chain of IEEE divides made this step
       the kernel's slowest);
    6. collapse ``layer_input[t, slice] = sum_i w_i * tile[i]`` from shared memory.

    Waiting in step 4 is safe because the S CTAs of one token block are adjacent in launch order
    (grid x = slice) and the launcher keeps S at most the number of SMs, so they are co-resident
    or earlier-dispatched (CTAs are dispatched in linear-index order). The counters (two
    per token block) come zeroed and the kernel leaves them zero: after the second wait each CTA
    adds a departure to the block's first counter, and the last to depart resets both (the
    argument is in the code). So the launcher takes them from a pool, zeroed once
    (:mod:`mhc.backends.workspaces`), with no memset per call; the kernel needs no host
    synchronisation and is CUDA-graph capturable; results are bitwise reproducible.

Shapes and dtypes (T = tokens, m = 2n + n*n for pre/fused, n for head):
    residual, new_residual (T, n, H) bf16; x, layer_input (T, H) bf16; fn (m, n*H) fp32;
    hc_scale (3,) or (1,) fp32; hc_base (m,) fp32; post_mix (T, n, 1) fp32; comb_mix (T, n, n) fp32;
    workspace: parts (NB, S, BM*MP) and fin (NB, BM*MP) fp32, flags (NC,) int32 with NC >= 2 * NB
    (block b counts at 2b and 2b + 1; zero on entry, left zero), with
    NB = ceil(T / BM), S = ceil(H / HC), MP = round_up(m + 1, 4).
"""

# No `from __future__ import annotations`: TileLang evaluates the signatures, which use closure variables.

import dataclasses
import os

import tilelang
import tilelang.language as T

__all__ = ["PostConfig", "MixConfig", "build_post", "build_mix", "mix_width", "compile_kernel"]


def _rms_factor(ssq, inv_k, rms_eps):
    """The RMS factor ``rsqrt(ssq / K + rms_eps)`` from a token's fp32 sum of squares, but NaN
    (rsqrt of -1) where ``ssq`` overflowed to +inf, not 0, which would make every mix of that token
    finite and wrong: ``mhc.reference.rms_factor``'s rule. A select, not arithmetic on inf
    (``ssq * 0``), which the TIR simplifier may fold away. ``ssq`` is used twice: pass a bound
    name (``ssq = load``), not a load expression, or the load is emitted twice."""
    return T.rsqrt(T.if_then_else(ssq < T.infinity("float32"), ssq * inv_k + rms_eps, T.float32(-1.0)))


def _logit(m, scale, base):
    """A mix's pre-activation from its RMS-scaled logit ``m`` (the mix's hc_scale and hc_base
    entries): ``m * scale + base``. Sinkhorn's input for comb."""
    return m * scale + base


def _pre_weight(m, scale, base, eps):
    """``pre``'s (and ``head``'s) collapse weight: ``sigmoid(logit) + eps`` (:func:`_logit`)."""
    return T.sigmoid(_logit(m, scale, base)) + eps


def _post_weight(m, scale, base, mult):
    """``post_mix``: ``sigmoid(logit) * mult`` (:func:`_logit`; ``mult``: hc_post_mult_value)."""
    return T.sigmoid(_logit(m, scale, base)) * mult


def _sinkhorn(n: int):
    """The Sinkhorn macro for n x n matrices: ``sinkhorn(cm, rsum, repeat, sk_eps)`` normalises one
    token's comb logits ``cm`` (a local buffer of n*n fp32, row-major: source i, destination j) in
    place, in one thread, as ``mhc.reference.sinkhorn``: softmax over j plus eps, divide by column
    sums + eps, then ``repeat - 1`` times row then column normalisation; ``rsum`` is a local
    buffer of n fp32. One reciprocal per row or column sum, then multiplies: a chain of IEEE
    divides made this step the kernel's slowest (docs/tuning/tilelang.md)."""

    @T.macro
    def normalise(cm, rsum, sk_eps, line, step):
        # line a, element b at cm[a*line + b*step]: rows (n, 1), columns (1, n)
        for a in T.unroll(n):
            rsum[a] = 0.0
            for b in T.unroll(n):
                rsum[a] += cm[a * line + b * step]
            rsum[a] = 1.0 / (rsum[a] + sk_eps)
            for b in T.unroll(n):
                cm[a * line + b * step] = cm[a * line + b * step] * rsum[a]

    @T.macro
    def sinkhorn(cm, rsum, repeat, sk_eps):
        for i in T.unroll(n):  # softmax over the destination index j, then + eps
            mx = T.alloc_var(T.float32)
            mx = cm[i * n]
            for j in T.unroll(n):
                mx = T.max(mx, cm[i * n + j])
            rsum[i] = 0.0
            for j in T.unroll(n):
                cm[i * n + j] = T.exp(cm[i * n + j] - mx)
                rsum[i] += cm[i * n + j]
            rsum[i] = 1.0 / rsum[i]
            for j in T.unroll(n):
                cm[i * n + j] = cm[i * n + j] * rsum[i] + sk_eps
        normalise(cm, rsum, sk_eps, 1, n)  # column sums
        for _ in T.serial(repeat - 1):
            normalise(cm, rsum, sk_eps, n, 1)  # row sums
            normalise(cm, rsum, sk_eps, 1, n)  # column sums

    return sinkhorn


def _round_up(a: int, b: int) -> int:
    return (a + b - 1) // b * b


def mix_width(mode: str, n: int) -> int:
    """Number of mix logits per token: ``n`` for head, ``2n + n*n`` otherwise."""
    return n if mode == "head" else 2 * n + n * n


@dataclasses.dataclass(frozen=True)
class PostConfig:
    """``BH`` hidden columns per CTA, 8 per thread (at least one warp per CTA)."""

    BH: int

    @property
    def threads(self) -> int:
        return max(32, self.BH // 8)


@dataclasses.dataclass(frozen=True)
class MixConfig:
    """``BM`` tokens x ``HC`` hidden columns per CTA; ``threads`` per CTA; CTAs per SM."""

    BM: int
    HC: int
    threads: int = 256
    #: ``__launch_bounds__(threads, min_blocks)``: ptxas keeps registers low enough for this many
    #: CTAs per SM (otherwise it spends up to 255 and one 256-thread CTA fills the register file)
    min_blocks: int = 2

    def splits(self, H: int) -> int:
        return -(-H // self.HC)

    def shared_bytes(self, mode: str, n: int) -> int:
        """Shared memory the kernel needs (the tile, one B slice, a few small tables)."""
        m = mix_width(mode, n)
        NP = _round_up(2 * m, 64)
        tile = n * self.BM * self.HC * 2
        b_or_c = max(NP * self.HC * 2, self.BM * NP * 4)
        return tile + b_or_c + self.BM * (_round_up(m + 1, 4) + n + n * n + 2) * 4


def build_post(n: int, H: int, cfg: PostConfig, dtype: str = "bfloat16"):
    """``post`` as a TileLang PrimFunc; arguments ``(x, residual, post_mix, comb_mix, out)``."""
    BH, threads = cfg.BH, cfg.threads
    NT = T.dynamic("num_tokens")

    @T.prim_func
    def mhc_post(
        x: T.Tensor[(NT, H), dtype],
        residual: T.Tensor[(NT, n, H), dtype],
        post_mix: T.Tensor[(NT, n, 1), T.float32],
        comb_mix: T.Tensor[(NT, n, n), T.float32],
        out: T.Tensor[(NT, n, H), dtype],
    ):
        with T.Kernel(T.ceildiv(H, BH), NT, threads=threads) as (bh, t):
            c = T.alloc_fragment((n, n), T.float32)
            p = T.alloc_fragment((n,), T.float32)
            rf = T.alloc_fragment((n, BH), dtype)
            xf = T.alloc_fragment((BH,), dtype)
            of = T.alloc_fragment((n, BH), dtype)
            for i, j in T.Parallel(n, n):
                c[i, j] = comb_mix[t, i, j]
            for j in T.Parallel(n):
                p[j] = post_mix[t, j, 0]
            # Out-of-range columns (H % BH != 0) are guarded by T.copy: loads give 0, stores skip.
            T.copy(residual[t, 0:n, bh * BH : bh * BH + BH], rf)
            T.copy(x[t, bh * BH : bh * BH + BH], xf)
            for j, hh in T.Parallel(n, BH):
                acc = T.alloc_var(T.float32)
                acc = p[j] * T.cast(xf[hh], T.float32)
                for i in T.unroll(n):
                    acc += c[i, j] * T.cast(rf[i, hh], T.float32)
                of[j, hh] = T.cast(acc, dtype)
            T.copy(of, out[t, 0:n, bh * BH : bh * BH + BH])

    return mhc_post


def build_mix(mode: str, n: int, H: int, cfg: MixConfig, dtype: str = "bfloat16"):
    """The fused GEMM + RMS + activations + collapse kernel for ``mode`` in pre/head/fused.

    Arguments, in order:
      pre:   residual, fn, hc_scale, hc_base, post_mix, comb_mix, layer_input, parts, fin, flags,
             rms_eps, hc_pre_eps, hc_sinkhorn_eps, hc_post_mult_value, sinkhorn_repeat
      head:  residual, fn, hc_scale, hc_base, layer_input, parts, fin, flags, rms_eps, hc_eps
      fused: x, residual, post_mix_in, comb_mix_in, fn, hc_scale, hc_base, new_residual,
             post_mix, comb_mix, layer_input, parts, fin, flags, <pre's five scalars>
    """
    if mode not in ("pre", "head", "fused"):
        raise ValueError(f"mode must be pre, head or fused, got {mode!r}")
    m = mix_width(mode, n)
    NP = _round_up(2 * m, 64)  # hi and lo halves, padded so the 4-warp GEMM tiles divide evenly
    MF = _round_up(m, 8)  # fn rows loaded per slice (rows past m read as 0): keeps tiles divisible
    MP = _round_up(m + 1, 4)  # partials row: m logits, the sum of squares, padding to 16 bytes
    E = cfg.BM * MP  # partials per CTA
    SH = -(-E // cfg.splits(H))  # the share of a token block's partials each of its CTAs reduces
    red_loop = T.unroll if cfg.splits(H) <= 64 else T.serial  # unrolled: the S loads overlap
    BM, HC, threads = cfg.BM, cfg.HC, cfg.threads
    S = cfg.splits(H)
    K = n * H
    inv_k = 1.0 / K
    NT = T.dynamic("num_tokens")
    NB = T.dynamic("num_blocks")
    NC = T.dynamic("num_counters")  # >= 2 * NB: the launcher passes its whole pooled counter buffer
    has_sinkhorn = mode != "head"
    sinkhorn = _sinkhorn(n)
    fused = mode == "fused"

    @T.macro
    def body(x, residual, pm_in, cm_in, fn, hc_scale, hc_base, new_residual, post_mix, comb_mix,
             layer_input, parts, fin, flags, rms_eps, w_eps, sk_eps, post_mult, repeat):
        with T.Kernel(S, NB, threads=threads) as (s, b):
            T.annotate_min_blocks_per_sm(cfg.min_blocks)
            h0 = s * HC
            t0 = b * BM
            tx = T.get_thread_binding()
            tile = T.alloc_shared((n, BM, HC), dtype)  # the CTA's residual (new residual if fused)
            bsh = T.alloc_shared((NP, HC), dtype)  # [fn_hi; fn_lo; 0] for one stream's columns
            part = T.alloc_shared((BM, MP), T.float32)  # partial logits + sum of squares
            mix = T.alloc_shared((BM, MP), T.float32)  # final RMS-scaled logits
            wsh = T.alloc_shared((BM, n), T.float32)  # collapse weights
            csh = T.alloc_shared((BM, NP), T.float32)  # the GEMM result, hi and lo columns
            sqsh = T.alloc_shared((BM,), T.float32)
            gemm_c = T.alloc_fragment((BM, NP), T.float32)
            sq = T.alloc_fragment((BM,), T.float32)
            sq_tile = T.alloc_fragment((BM, HC), T.float32)
            fnf = T.alloc_fragment((n, MF, HC), T.float32)
            out_f = T.alloc_fragment((BM, HC), dtype)

            # 0. this slice's fn columns for every stream -> registers, issued first so that
            #    their L2 round trip overlaps the tile's HBM loads (one round trip, not n).
            #    Columns past H belong to the next stream (past K: guarded to 0); the tile is 0
            #    there, so they add nothing.
            if not fused:
                for i in T.unroll(n):
                    T.copy(fn[0:MF, i * H + h0 : i * H + h0 + HC], fnf[i, :, :])

            # 1. the tile (every stream) -> shared memory; guarded copies give 0 past T and H.
            if fused:
                xf = T.alloc_fragment((BM, HC), dtype)
                rf = T.alloc_fragment((n, BM, HC), dtype)
                nf = T.alloc_fragment((BM, HC), dtype)  # one output stream at a time: fewer registers
                pmsh = T.alloc_shared((BM, n), T.float32)
                cmsh = T.alloc_shared((BM, n, n), T.float32)
                for r, j in T.Parallel(BM, n):
                    pmsh[r, j] = T.if_then_else(t0 + r < NT, pm_in[t0 + r, j, 0], 0.0)
                for r, i, j in T.Parallel(BM, n, n):
                    cmsh[r, i, j] = T.if_then_else(t0 + r < NT, cm_in[t0 + r, i, j], 0.0)
                T.copy(x[t0 : t0 + BM, h0 : h0 + HC], xf)
                for i in T.unroll(n):
                    T.copy(residual[t0 : t0 + BM, i, h0 : h0 + HC], rf[i, :, :])
                for j in T.unroll(n):
                    for r, h in T.Parallel(BM, HC):
                        v = T.alloc_var(T.float32)
                        v = pmsh[r, j] * T.cast(xf[r, h], T.float32)
                        for i in T.unroll(n):
                            v += cmsh[r, i, j] * T.cast(rf[i, r, h], T.float32)
                        nf[r, h] = T.cast(v, dtype)
                    T.copy(nf, new_residual[t0 : t0 + BM, j, h0 : h0 + HC])
                    T.copy(nf, tile[j, :, :])
                # fused: fn after the post step, so its registers are not live at the same time
                for i in T.unroll(n):
                    T.copy(fn[0:MF, i * H + h0 : i * H + h0 + HC], fnf[i, :, :])
            else:
                for i in T.unroll(n):
                    T.copy(residual[t0 : t0 + BM, i, h0 : h0 + HC], tile[i, :, :])

            T.clear(sq)
            for i in T.serial(n):
                for r, h in T.Parallel(BM, HC):
                    sq_tile[r, h] = T.cast(tile[i, r, h], T.float32) * T.cast(tile[i, r, h], T.float32)
                T.reduce_sum(sq_tile, sq, dim=1, clear=False)

            # 2. partial logits on the tensor cores, one stream's columns at a time.
            T.clear(gemm_c)
            for j, h in T.Parallel(NP - 2 * m, HC):
                bsh[2 * m + j, h] = T.cast(0.0, dtype)
            for i in T.unroll(n):
                for j, h in T.Parallel(MF, HC):
                    if j < m:
                        hi = T.cast(fnf[i, j, h], dtype)
                        bsh[j, h] = hi
                        bsh[m + j, h] = T.cast(fnf[i, j, h] - T.cast(hi, T.float32), dtype)
                T.gemm(tile[i, :, :], bsh, gemm_c, transpose_B=True)

            # 3. publish: partial logits (hi + lo) and sum of squares -> the block's accumulator.
            T.copy(gemm_c, csh)
            T.copy(sq, sqsh)
            for r, j in T.Parallel(BM, MP):
                part[r, j] = T.if_then_else(
                    j < m, csh[r, j] + csh[r, T.min(m + j, NP - 1)], T.if_then_else(j == m, sqsh[r], 0.0)
                )
            for r, j in T.Parallel(BM, MP):
                parts[b, s, r * MP + j] = part[r, j]
            T.call_extern("handle", "__threadfence")
            T.sync_threads()
            # 4. wait for every slice of this token block, then reduce this CTA's share of the
            #    block's partials, in slice order (deterministic), publish it and wait again.
            #    Relaxed atomic loads read L2 (never a stale L1 line).
            if tx == 0:
                T.atomic_add(flags[2 * b], 1, memory_order="release")
                while T.atomic_load(flags[2 * b], memory_order="acquire") < S:
                    T.call_extern("handle", "__nanosleep", 32)  # back off: fewer L2 polls
            T.sync_threads()
            for e in T.Parallel(SH):
                k = s * SH + e
                if k < E:
                    v = T.alloc_var(T.float32)
                    v = 0.0
                    for s2 in red_loop(S):
                        v += T.atomic_load(parts[b, s2, k], memory_order="relaxed")
                    fin[b, k] = v
            T.call_extern("handle", "__threadfence")
            T.sync_threads()
            if tx == 0:
                T.atomic_add(flags[2 * b + 1], 1, memory_order="release")
                while T.atomic_load(flags[2 * b + 1], memory_order="acquire") < S:
                    T.call_extern("handle", "__nanosleep", 32)
                # Departure: leave both counters of the block zero for the next launch (no memset
                # per call). Each CTA adds 1 to counter 0 (S after the arrivals) once it has
                # passed the second wait; the CTA whose add returns 2S - 1 departs last and
                # resets both. Safe: a CTA departs only after passing wait 2, and wait 2 passes
                # only once all S CTAs have arrived at counter 1, i.e. passed wait 1; so at the
                # last departure every CTA of the block is past both waits and nobody reads
                # either counter again in this launch (counter 0 exceeding S during departures
                # is read by no one). acq_rel: each departure releases its CTA's earlier polls,
                # and the last one acquires all of them, so the polls happen-before the reset
                # and cannot read it. The next launch on the stream (or graph replay) starts
                # after this one has finished, so it sees the zeros.
                prev = T.alloc_var(T.int32)
                prev = T.atomic_add(flags[2 * b], 1, memory_order="acq_rel", return_prev=True)
                if prev == 2 * S - 1:
                    T.atomic_store(flags[2 * b], 0, memory_order="relaxed")
                    T.atomic_store(flags[2 * b + 1], 0, memory_order="relaxed")
            T.sync_threads()

            # 5. RMS-scaled logits and collapse weights.
            for r, j in T.Parallel(BM, m):
                ssq = T.atomic_load(fin[b, r * MP + m], memory_order="relaxed")
                rs = _rms_factor(ssq, inv_k, rms_eps)
                mix[r, j] = T.atomic_load(fin[b, r * MP + j], memory_order="relaxed") * rs
            for r, i in T.Parallel(BM, n):
                wsh[r, i] = _pre_weight(mix[r, i], hc_scale[0], hc_base[i], w_eps)
            if has_sinkhorn:
                if s == 0 and tx < BM:
                    t = t0 + tx
                    if t < NT:
                        for j in T.unroll(n):
                            post_mix[t, j, 0] = _post_weight(mix[tx, n + j], hc_scale[1], hc_base[n + j], post_mult)
                        cm = T.alloc_local((n * n,), T.float32)
                        rsum = T.alloc_local((n,), T.float32)
                        for k in T.unroll(n * n):
                            cm[k] = _logit(mix[tx, 2 * n + k], hc_scale[2], hc_base[2 * n + k])
                        sinkhorn(cm, rsum, repeat, sk_eps)
                        for k in T.unroll(n * n):
                            comb_mix[t, k // n, k % n] = cm[k]

            # 6. collapse from shared memory.
            for r, h in T.Parallel(BM, HC):
                v = T.alloc_var(T.float32)
                v = 0.0
                for i in T.unroll(n):
                    v += wsh[r, i] * T.cast(tile[i, r, h], T.float32)
                out_f[r, h] = T.cast(v, dtype)
            T.copy(out_f, layer_input[t0 : t0 + BM, h0 : h0 + HC])

    if mode == "pre":

        @T.prim_func
        def mhc_pre(
            residual: T.Tensor[(NT, n, H), dtype],
            fn: T.Tensor[(m, K), T.float32],
            hc_scale: T.Tensor[(3,), T.float32],
            hc_base: T.Tensor[(m,), T.float32],
            post_mix: T.Tensor[(NT, n, 1), T.float32],
            comb_mix: T.Tensor[(NT, n, n), T.float32],
            layer_input: T.Tensor[(NT, H), dtype],
            parts: T.Tensor[(NB, S, E), T.float32],
            fin: T.Tensor[(NB, E), T.float32],
            flags: T.Tensor[(NC,), T.int32],
            rms_eps: T.float32,
            hc_pre_eps: T.float32,
            hc_sinkhorn_eps: T.float32,
            hc_post_mult_value: T.float32,
            sinkhorn_repeat: T.int32,
        ):
            body(None, residual, None, None, fn, hc_scale, hc_base, None, post_mix, comb_mix,
                 layer_input, parts, fin, flags, rms_eps, hc_pre_eps, hc_sinkhorn_eps, hc_post_mult_value,
                 sinkhorn_repeat)

        return mhc_pre

    if mode == "head":

        @T.prim_func
        def mhc_head(
            residual: T.Tensor[(NT, n, H), dtype],
            fn: T.Tensor[(m, K), T.float32],
            hc_scale: T.Tensor[(1,), T.float32],
            hc_base: T.Tensor[(m,), T.float32],
            layer_input: T.Tensor[(NT, H), dtype],
            parts: T.Tensor[(NB, S, E), T.float32],
            fin: T.Tensor[(NB, E), T.float32],
            flags: T.Tensor[(NC,), T.int32],
            rms_eps: T.float32,
            hc_eps: T.float32,
        ):
            body(None, residual, None, None, fn, hc_scale, hc_base, None, None, None,
                 layer_input, parts, fin, flags, rms_eps, hc_eps, None, None, None)

        return mhc_head

    @T.prim_func
    def mhc_fused_post_pre(
        x: T.Tensor[(NT, H), dtype],
        residual: T.Tensor[(NT, n, H), dtype],
        post_mix_in: T.Tensor[(NT, n, 1), T.float32],
        comb_mix_in: T.Tensor[(NT, n, n), T.float32],
        fn: T.Tensor[(m, K), T.float32],
        hc_scale: T.Tensor[(3,), T.float32],
        hc_base: T.Tensor[(m,), T.float32],
        new_residual: T.Tensor[(NT, n, H), dtype],
        post_mix: T.Tensor[(NT, n, 1), T.float32],
        comb_mix: T.Tensor[(NT, n, n), T.float32],
        layer_input: T.Tensor[(NT, H), dtype],
        parts: T.Tensor[(NB, S, E), T.float32],
        fin: T.Tensor[(NB, E), T.float32],
        flags: T.Tensor[(NC,), T.int32],
        rms_eps: T.float32,
        hc_pre_eps: T.float32,
        hc_sinkhorn_eps: T.float32,
        hc_post_mult_value: T.float32,
        sinkhorn_repeat: T.int32,
    ):
        body(x, residual, post_mix_in, comb_mix_in, fn, hc_scale, hc_base, new_residual, post_mix,
             comb_mix, layer_input, parts, fin, flags, rms_eps, hc_pre_eps, hc_sinkhorn_eps,
             hc_post_mult_value, sinkhorn_repeat)

    return mhc_fused_post_pre


def compile_kernel(func, target: dict):
    """Compile a PrimFunc for ``target`` (e.g. ``{"kind": "cuda", "arch": "sm_90a"}``).

    TileLang caches the result on disk under its cache directory keyed by the function's source
    and the target, so a kernel compiled ahead of time (``aot.py``) is loaded, not rebuilt. That
    directory is ``TILELANG_CACHE_DIR`` if the user set it, else ``cache_dir()``'s default, set
    through TileLang's own setting (it reads ``tilelang.env`` when it compiles or loads; the
    environment is left alone).
    """
    if not os.environ.get("TILELANG_CACHE_DIR"):
        from mhc.backends.tilelang import cache_dir

        tilelang.env.TILELANG_CACHE_DIR = cache_dir()
    return tilelang.compile(func, target=target, execution_backend="tvm_ffi")
