"""The Triton backend's launch configuration: one table, then one fitting step per kind of launch.

1. **The table.** One complete row per (op, T bucket, arch family): what was tuned, read as it
   stands, nothing applied on top. Four kinds of launch, one table each, all here:

   - :data:`SMALL_ROWS` (:class:`Row`): ``pre``, ``head``, ``fused_post_pre`` at T <= ``SMALL_T``,
     the latency-bound single-launch (``mix_kernel``) and chunked (``chunk_kernel``) kernels; the
     fused RMSNorm's variants are rows of their own (``"pre+norm"``, ``"fused_post_pre+norm"``).
   - :data:`TWO_PASS_ROWS` (:class:`TwoPassRow`): the same ops above ``SMALL_T``, two passes
     (``prep_kernel``, ``prenorm_kernel``, ``finalize_kernel``); the norm takes the same tiles
     (its finalize variant holds a token's row, one token per program).
   - :data:`POST_ROWS` (:class:`PostRow`): ``post_kernel`` (``post``, and ``fused_post_pre``'s first
     step above ``SMALL_T``).
   - :data:`BACKWARD_ROWS` (:class:`BackwardRow`, :class:`PostBackwardRow`): the backward kernels
     (``backward.py``), one row for every T (their step counts follow T in the fitting).

   A row serves the T of its bucket: the first row of its (op, arch) with ``T <= max_t`` (None:
   no bound). Every ``max_t`` is one of :data:`mhc.plans.T_BOUNDS`, so that a launch plan, keyed
   by :func:`mhc.plans.t_bucket`, never spans two rows. Arch families: :data:`NVIDIA` (sm90) and
   :data:`AMD` (gfx942, gfx950: ``SharedMemory.amd``).

2. **Fitting** (:func:`configs`, :func:`plan`, :func:`post_config`, :func:`backward_config`):
   the row sized for n, H, T and the GPU's shared memory (:class:`SharedMemory`): tiles capped
   by H, K tiles halved until :func:`shared_estimate` / :func:`gemm_shared` fit, splits and steps
   derived. ``configs(..., measure=...)`` then halves the K tile until the *compiled* kernel fits
   (the launcher on a GPU and ``aot.py`` pass a measure; this module compiles nothing).

The launchers (``launch.py``, ``backward.py``) and the AOT builder (``aot.py``) read the same
rows through the same functions, so what AOT builds is what runs. The figures that chose the
rows are in ``docs/tuning/triton.md``; the comments here say why each row is as it is.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import triton

__all__ = ["NVIDIA", "AMD", "SMALL_T", "Row", "TwoPassRow", "PostRow", "BackwardRow", "PostBackwardRow",
           "SMALL_ROWS", "TWO_PASS_ROWS", "POST_ROWS", "BACKWARD_ROWS", "SharedMemory", "SHARED_MEMORY",
           "Config", "TwoPass", "PostConfig", "family", "table_row", "configs", "fit_shared", "plan",
           "post_config", "backward_config", "backward_row", "backward_steps", "shared_estimate", "gemm_shared",
           "norm_chunks", "prep_block"]

NVIDIA, AMD = "nvidia", "amd"

#: Above this many tokens ``pre``, ``head`` and ``fused_post_pre`` take the two-pass path
#: (:data:`TWO_PASS_ROWS`); at or below it, :data:`SMALL_ROWS`.
SMALL_T = 128

#: Register budget of ``kernels._tail_prefetch`` (bytes of residual held per thread).
TAIL_PF_BYTES = 256


# --- 1. the table ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Row:
    """A row of :data:`SMALL_ROWS`: what was tuned, before :func:`fit_shared` sizes it for n, H
    and the device. Fields as :class:`Config`, except:

    - ``max_t``: the bucket's largest T.
    - ``chunk_mib``: 0 for the single-launch kernel; else the chunked kernel, with chunks of as
      many tokens as keep their residual (bf16/fp16) under ``chunk_mib`` MiB, in L2 when phase B
      re-reads it (:func:`fit_shared` derives ``Config.chunk``).
    - ``block_h``: the K tile to start from (:func:`fit_shared` caps it by H and halves it until
      the kernel fits the shared memory).
    - ``splits``: GEMM programs per token block wanted (``Config.splits``/``h_per_split`` follow
      from H and the K tile).

    What is compiled depends on the row and H only (never on T itself), so a model compiles at
    most one variant per bucket and op. ``block_m_b``, ``c_steps`` and ``b_split`` are read by
    the chunked kernel only, ``tail_rows`` by the single launch only.
    """

    max_t: int
    chunk_mib: float
    block_m: int
    block_h: int
    splits: int
    block_c: int
    block_m_b: int
    c_steps: int
    b_split: bool
    tail_rows: int
    num_warps: int
    num_stages: int
    min_cols: int = 0


#: The small-T rows, per (op, arch family). NVIDIA: tuned on the H100/H200, one set of rows for
#: the three ops. AMD: the same rows with the fewest changes that keep every build at n = 4,
#: H in {4096, 7168} within 256 VGPRs with no spill (on CDNA a spill goes to scratch memory, and
#: over 256 VGPRs leaves one wave per SIMD); chosen by the AOT builds' register counts, not timed:
#: - head: 16 GEMM columns instead of 8 (n + the sum of squares, padded): AMD's MFMA has no
#:   N = 8 form, and Triton 3.6 then falls back to an fp32 FMA dot whose operand layouts hold the
#:   K tile in registers;
#: - pre: K tiles of n x 32 (the GEMM's hi/lo operand tiles; 64 wide needs over 256 VGPRs);
#: - fused_post_pre: K tiles of n x 16 (its post step's [BM, n, block_h] tiles besides; 32 wide
#:   still needs over 256 VGPRs on gfx942).
#: The fused RMSNorm (``+norm``) changes the chunked rows only: a collapse program owns whole rows
#: (held in registers, ``NORM_MAX_H``), one token each, in chunks of up to 1024 columns (few, so
#: that the unrolled row stays short).
SMALL_ROWS: dict[tuple[str, str], tuple[Row, ...]] = {
    #                             max_t    chunk_mib block_m block_h splits block_c block_m_b c_steps b_split tail_rows warps stages min_cols
    ("pre", NVIDIA):             (Row(1,       0,        16,     64,     128,   1024,   16,       1,      False,  1,        4,    1,     0),
                                  Row(SMALL_T, 64,       16,     64,     64,    256,    4,        1,      True,   1,        4,    1,     0)),
    ("pre+norm", NVIDIA):        (Row(1,       0,        16,     64,     128,   1024,   16,       1,      False,  1,        4,    1,     0),
                                  Row(SMALL_T, 64,       16,     64,     64,    1024,   1,        1,      True,   1,        4,    1,     0)),
    ("head", NVIDIA):            (Row(1,       0,        16,     64,     128,   1024,   16,       1,      False,  1,        4,    1,     0),
                                  Row(SMALL_T, 64,       16,     64,     64,    256,    4,        1,      True,   1,        4,    1,     0)),
    ("fused_post_pre", NVIDIA):  (Row(1,       0,        16,     64,     128,   1024,   16,       1,      False,  1,        4,    1,     0),
                                  Row(SMALL_T, 64,       16,     64,     64,    256,    4,        1,      True,   1,        4,    1,     0)),
    ("fused_post_pre+norm", NVIDIA): (Row(1,   0,        16,     64,     128,   1024,   16,       1,      False,  1,        4,    1,     0),
                                  Row(SMALL_T, 64,       16,     64,     64,    1024,   1,        1,      True,   1,        4,    1,     0)),
    ("pre", AMD):                (Row(1,       0,        16,     32,     128,   1024,   16,       1,      False,  1,        4,    1,     0),
                                  Row(SMALL_T, 64,       16,     32,     64,    256,    4,        1,      True,   1,        4,    1,     0)),
    ("pre+norm", AMD):           (Row(1,       0,        16,     32,     128,   1024,   16,       1,      False,  1,        4,    1,     0),
                                  Row(SMALL_T, 64,       16,     32,     64,    1024,   1,        1,      True,   1,        4,    1,     0)),
    ("head", AMD):               (Row(1,       0,        16,     64,     128,   1024,   16,       1,      False,  1,        4,    1,     16),
                                  Row(SMALL_T, 64,       16,     64,     64,    256,    4,        1,      True,   1,        4,    1,     16)),
    ("fused_post_pre", AMD):     (Row(1,       0,        16,     16,     128,   1024,   16,       1,      False,  1,        4,    1,     0),
                                  Row(SMALL_T, 64,       16,     16,     64,    256,    4,        1,      True,   1,        4,    1,     0)),
    ("fused_post_pre+norm", AMD): (Row(1,      0,        16,     16,     128,   1024,   16,       1,      False,  1,        4,    1,     0),
                                  Row(SMALL_T, 64,       16,     16,     64,    1024,   1,        1,      True,   1,        4,    1,     0)),
}


@dataclasses.dataclass(frozen=True)
class TwoPassRow:
    """A row of :data:`TWO_PASS_ROWS`, before :func:`plan` fits it: GEMM tiles of ``block_m``
    tokens x ``block_k`` columns of K = n*H and ``stages`` to start from (:func:`plan` lowers
    them until :func:`gemm_shared` fits), ``splits`` GEMM programs per token block wanted
    (``TwoPass.steps`` follows from K); ``bc`` the collapse tile's cap (capped by H); the other
    fields as :class:`TwoPass`."""

    max_t: int | None
    block_m: int
    block_k: int
    splits: int
    warps: int
    stages: int
    prec: str = "hilo"
    split_fast: bool = False
    bt: int = 1
    bc: int = 1024
    bmb: int = 16
    fin_warps: int = 4
    min_cols: int = 16


#: The two-pass rows, per (op, arch family), from the H200 sweeps: GEMM tiles of 128 tokens x 64
#: columns, 4 warps (8 streamed a little faster, but Triton 3.6's pipelined dot at 8 warps and
#: N3P = 32 gave partials that differ from run to run), 4 stages (2 on AMD, whose pipeliner failed
#: to build some kernels at 4), K split 16 ways up to 1024 tokens (so that every SM has work),
#: 8 ways above. ``min_cols`` 16: head's 8 GEMM columns (n = 4) streamed the residual markedly
#: slower than 16.
TWO_PASS_ROWS: dict[tuple[str, str], tuple[TwoPassRow, ...]] = {
    (op, arch): (TwoPassRow(1024, 128, 64, 16, 4, stages),
                 TwoPassRow(None, 128, 64, 8, 4, stages))
    for op in ("pre", "head", "fused_post_pre") for arch, stages in ((NVIDIA, 4), (AMD, 2))
}


@dataclasses.dataclass(frozen=True)
class PostRow:
    """A row of :data:`POST_ROWS`: ``block_h`` hidden columns of every stream per program (capped
    by H), ``warps``, ``h_fast`` the program order (hidden blocks of a token on consecutive
    programs)."""

    max_t: int | None
    block_h: int
    warps: int
    h_fast: bool


#: ``post_kernel``'s rows, per arch family (the same on both: nothing was tuned on AMD). T = 1
#: runs token-major: one token has nothing to order, and that form needs no division to find its
#: block.
POST_ROWS: dict[tuple[str, str], tuple[PostRow, ...]] = {
    ("post", arch): (PostRow(1, 256, 1, False),
                     PostRow(SMALL_T, 512, 2, True),
                     PostRow(None, 1024, 4, True))
    for arch in (NVIDIA, AMD)
}


@dataclasses.dataclass(frozen=True)
class BackwardRow:
    """A row of :data:`BACKWARD_ROWS` for the pre/head/fused_post_pre backward (``backward.py``'s
    stages 2-5): stage 2 ``bm`` tokens x ``bh`` hidden columns per step, ``stats_warps``,
    ``stats_stages``; stage 3 ``bt`` tokens per program, ``tail_warps``; stage 4 one tile of
    ``gres_bm`` tokens x ``gres_bh`` columns a program, ``gres_warps``; stage 5 ``gfn_bt`` tokens x
    ``gfn_bk`` residual columns per step, ``gfn_warps``, ``gfn_stages``; ``programs``: programs
    wanted per launch of the looping stages 2 and 5 (:func:`backward_config` derives their
    splits, chunks and steps)."""

    max_t: int | None
    bm: int
    bh: int
    stats_warps: int
    stats_stages: int
    bt: int
    tail_warps: int
    gres_bm: int
    gres_bh: int
    gres_warps: int
    gfn_bt: int
    gfn_bk: int
    gfn_warps: int
    gfn_stages: int
    programs: int


@dataclasses.dataclass(frozen=True)
class PostBackwardRow:
    """The row of ``_post_bwd_kernel``: ``block_h`` hidden columns of every stream per program
    (capped by H), ``warps``."""

    max_t: int | None
    block_h: int
    warps: int


#: The backward rows, per (op, arch family), one for every T. ``programs``: two per SM of the
#: H200 (132 SMs), so that the split of the hidden axis (stage 2) and the token chunks (stage 5)
#: keep every SM busy. Stage 2 at two pipeline stages: 48 KB of shared memory, four CTAs an SM
#: (three stages took 80 KB and two CTAs, and streamed slower on the H200: docs/tuning/triton.md).
#: Stage 4 (grad_residual) runs one tile a program at 8 warps: about 100 registers on sm90, two
#: CTAs an SM. Stage 5 is a GEMM whose residual tiles the pipeliner keeps in flight (3 stages of
#: 16 KB). AMD (64 KB of LDS on gfx942; <= 256 VGPRs and no spill wanted):
#: two pipeline stages in stages 2 and 5, chosen by VGPR counts alone (nothing timed on AMD).
BACKWARD_ROWS: dict[tuple[str, str], tuple] = {
    **{(op, NVIDIA): (BackwardRow(None, 64, 32, 4, 2, 32, 2, 32, 128, 8, 64, 128, 4, 3, 264),)
       for op in ("pre_backward", "head_backward", "fused_post_pre_backward")},
    **{(op, AMD): (BackwardRow(None, 64, 32, 4, 2, 32, 2, 32, 128, 8, 64, 128, 4, 2, 264),)
       for op in ("pre_backward", "head_backward", "fused_post_pre_backward")},
    # post's backward moves the bytes of the forward's post_kernel and then some (two reads and
    # two writes of a stream's block): its largest tile, one program per token x block.
    **{("post_backward", arch): (PostBackwardRow(None, 1024, 4),) for arch in (NVIDIA, AMD)},
}

_TABLES = (SMALL_ROWS, TWO_PASS_ROWS, POST_ROWS, BACKWARD_ROWS)


def _row(table: dict, key: tuple[str, str], T: int):
    for row in table[key]:
        if row.max_t is None or T <= row.max_t:
            return row
    raise ValueError(f"no row of {key} serves T = {T} (its largest bucket ends at {table[key][-1].max_t})")


# --- shared memory -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SharedMemory:
    """What a GPU gives one program in shared memory (LDS on AMD): ``limit`` bytes (Triton's
    ``max_shared_mem``, which it checks when it loads a kernel) and whether its Triton backend is
    AMD's (whose pipeliner keeps ``num_stages - 1`` copies of a K step's tiles, NVIDIA's
    ``num_stages``)."""

    limit: int
    amd: bool = False


#: Per-block shared memory of the architectures that ``aot.py`` builds for: the H100's opt-in
#: 227 KB, MI300X's (gfx942) 64 KB and MI355X's (gfx950) 160 KB of LDS.
SHARED_MEMORY = {
    "sm90": SharedMemory(232448),
    "gfx942": SharedMemory(65536, amd=True),
    "gfx950": SharedMemory(163840, amd=True),
}


def family(smem: SharedMemory) -> str:
    """The arch family (:data:`NVIDIA` or :data:`AMD`) of a GPU with shared memory ``smem``."""
    return AMD if smem.amd else NVIDIA


#: Shared memory that the kernels' other phases (partial reductions, Sinkhorn, the collapse) may
#: take besides the GEMM's tiles; Triton reuses one allocation across phases, so the kernel needs
#: the larger of the two (sm90, n = 8, H = 1: 32 KB with GEMM tiles of 10-20 KB).
OTHER_PHASES_SHARED = 32768


def mix_columns(op: str, n: int, min_cols: int = 0) -> tuple[int, int]:
    """The GEMM's output columns (n for head, 2n + n*n otherwise) and their padded width, with
    one spare column for the sum of squares, and at least ``min_cols`` (the rows' ``min_cols``:
    the spare columns are zero; they cost L2 reads of fn only)."""
    n3 = n if op == "head" else 2 * n + n * n
    return n3, max(triton.next_power_of_2(n3 + 1), min_cols)


def shared_estimate(op: str, n: int, block_m: int, block_h: int, num_stages: int, amd: bool) -> int:
    """Bytes of shared memory that ``mix_kernel``/``chunk_kernel`` need for ``op`` with n streams,
    a GEMM step of ``block_m`` tokens x ``block_h`` hidden elements (K = next_pow2(n) x block_h)
    and ``num_stages``, on AMD (``amd``) or NVIDIA: fitted to Triton 3.6's allocations, of which
    it was an upper bound at the shapes of tests/test_triton_compile.py; later Triton releases
    ask a few KB more at n >= 6. It is the first guess of :func:`fit_shared`, which needs no
    compiler (the interpreter, the CPU tests); on a GPU and in ``aot.py`` the compiled kernel's
    real size decides (``fit_shared(..., measure=...)``).

    Tiles of one GEMM step: residual a = block_m x K x 2 B, fn b = K x max(16, N3P) x 4 B (fp32,
    or bf16 hi + lo: 4 B a column either way, at least the MMA's narrowest N), and for
    ``fused_post_pre`` the sublayer output x = block_m x block_h x 2 B. Unpipelined (one stage):
    the larger of a and b. Pipelined, AMD keeps num_stages - 1 copies (fused_post_pre: of b
    only, its residual tile comes from registers: exact on gfx942); NVIDIA keeps num_stages
    copies of a + b, and for fused_post_pre it took up to 3.4x (a + b + x) at 3 stages, so
    num_stages + 1 copies are counted there. Never less than ``OTHER_PHASES_SHARED``."""
    k = block_h * triton.next_power_of_2(n)
    a = block_m * k * 2
    b = k * max(16, mix_columns(op, n)[1]) * 4
    fused = op == "fused_post_pre"
    if num_stages <= 1:  # not pipelined: the operands pass through one reused buffer in turn
        gemm = max(a, b)
    elif amd:
        gemm = (num_stages - 1) * b + a if fused else (num_stages - 1) * (a + b)
    else:
        gemm = (num_stages + 1) * (a + b + block_m * block_h * 2) if fused else num_stages * (a + b)
    return max(gemm, OTHER_PHASES_SHARED)


def gemm_shared(n3p: int, block_m: int, block_k: int, stages: int, amd: bool) -> int:
    """Shared memory of ``prenorm_kernel``'s pipeline: a residual tile (block_m x block_k bf16)
    and fn's hi and lo tiles (block_k x n3p bf16) per stage; AMD's pipeliner keeps stages - 1
    copies (both as the AOT builds report; the kernels' other phases need far less)."""
    copies = max(1, stages - 1) if amd else stages
    return copies * (block_m * block_k * 2 + 2 * block_k * max(16, n3p) * 2)


# --- 2. fitting: small T -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Config:
    """Launch parameters of one small-T call (T <= ``SMALL_T``), made by :func:`configs`.

    The kernel: ``chunk`` 0 runs ``kernels.mix_kernel`` in one launch (T <= ``tail_rows``: the
    last GEMM program of a token block finishes it, ``kernels._tail``); ``chunk`` > 0 runs
    ``kernels.chunk_kernel``, ``chunk`` tokens per chunk, phase A (GEMM) of chunk c beside phase B
    (finish and collapse) of chunk c-1, one launch per chunk plus one.

    - ``block_m``: tokens per GEMM program (>= 16: the tl.dot minimum).
    - ``block_h``: hidden elements per GEMM step; a step covers all n streams (K tile
      next_pow2(n) x block_h).
    - ``splits``: GEMM programs per token block, each taking ``h_per_split`` hidden elements.
    - ``block_c``: hidden elements per collapse step.
    - ``num_warps``, ``num_stages``: as in Triton.
    - ``chunk``: see above.
    - ``block_m_b``: tokens per phase B program (chunked only).
    - ``c_steps``: collapse steps of ``block_c`` per phase B program (chunked only).
    - ``tail_rows``: the most tokens a single launch serves (single launch only).
    - ``tail_pf``: collapse chunks of ``block_c`` that the last program prefetches before the
      mixes are known (single launch only; from a budget of ``TAIL_PF_BYTES`` a thread).
    - ``b_split``: ``post_mix``/``comb_mix`` get their own phase B program per token block
      (chunked only).
    - ``min_cols``: the GEMM's padded output columns (``N3P``) are at least this many (the spare
      ones are zero); 0 keeps :func:`mix_columns`'s width (AMD's head rows set 16).

    Sinkhorn always runs in-thread (``kernels._sinkhorn``).
    """

    block_m: int
    block_h: int
    splits: int
    h_per_split: int
    block_c: int
    num_warps: int
    num_stages: int
    chunk: int = 0
    block_m_b: int = 16
    c_steps: int = 1
    tail_rows: int = 1
    tail_pf: int = 0
    b_split: bool = False
    min_cols: int = 0


def table_row(op: str, T: int, amd: bool = False, norm: bool = False) -> Row:
    """The :data:`SMALL_ROWS` row that serves ``op`` at T tokens (T <= SMALL_T) on AMD (``amd``)
    or NVIDIA, with the fused RMSNorm (``norm``) or not."""
    if T > SMALL_T:
        raise ValueError(f"configs() covers T <= {SMALL_T}; plan() serves T = {T}")
    return _row(SMALL_ROWS, (op + "+norm" if norm else op, AMD if amd else NVIDIA), T)


def _config(row: Row, n: int, H: int, block_h: int) -> Config:
    """The :class:`Config` of ``row`` for n streams, hidden size H and a K tile of ``block_h``."""
    h_per_split = triton.cdiv(triton.cdiv(H, row.splits), block_h) * block_h
    block_c = max(16, min(row.block_c, triton.next_power_of_2(H)))  # 1-wide tiles (H=1) crash Triton 3.6
    chunk = tail_pf = 0
    c_steps = row.c_steps
    if row.chunk_mib:
        # Tokens per chunk: as many as keep one chunk's residual (bf16/fp16) under chunk_mib MiB, in
        # multiples of both block sizes; never more than the bucket's largest T needs (one chunk:
        # two launches).
        m = max(row.block_m, row.block_m_b)
        chunk = max(m, int(row.chunk_mib * 2**20 // (n * H * 2)) // m * m)
        chunk = min(chunk, triton.cdiv(row.max_t, m) * m)
        c_steps = max(1, min(c_steps, triton.cdiv(H, block_c)))  # phase B's chunk never wider than H
    else:  # the single-launch kernel: its tail serves T <= tail_rows only
        if row.max_t > row.tail_rows or row.tail_rows > row.block_m:
            raise ValueError(f"tail needs T <= tail_rows <= block_m (bucket up to T={row.max_t})")
        # Prefetched collapse chunks: as many as H needs, within TAIL_PF_BYTES per thread. H == 1 is
        # specialised to a constant, and the prefetch's tiles then crash Triton 3.6's coalescing
        # pass: nothing to prefetch at that size anyway.
        per_chunk = row.tail_rows * n * block_c * 2  # bf16/fp16 bytes
        budget = TAIL_PF_BYTES * 32 * row.num_warps
        tail_pf = 0 if H == 1 else min(triton.cdiv(H, block_c), budget // per_chunk)
    return Config(block_m=row.block_m, block_h=block_h, splits=triton.cdiv(H, h_per_split),
                  h_per_split=h_per_split, block_c=block_c, num_warps=row.num_warps, num_stages=row.num_stages,
                  chunk=chunk, block_m_b=row.block_m_b, c_steps=c_steps, tail_rows=row.tail_rows, tail_pf=tail_pf,
                  b_split=row.b_split, min_cols=row.min_cols)


def fit_shared(row: Row, op: str, n: int, H: int, smem: SharedMemory,
               measure: Callable[[Config], int] | None = None) -> Config:
    """The :class:`Config` of ``row`` for ``op`` with n streams and hidden size H whose GEMM K tile
    fits the device's shared memory ``smem`` (which Triton checks only when it loads the kernel).

    The K tile (next_pow2(n) x block_h) starts at ``row.block_h``, capped by H and kept between
    16 (tl.dot's minimum: tiny H, e.g. 1) and 256, or 128 where the fn tile is 128 columns wide
    (pre/fused at n = 8). It is halved while :func:`shared_estimate` exceeds ``smem.limit`` (n >= 5
    on MI300X's 64 KB, and fused_post_pre's pipelined tiles on the H100; n = 4 keeps its tuned
    tiles everywhere). With ``measure`` (a config -> the compiled kernel's ``metadata.shared`` in
    bytes, which a compiler update can change) it is then halved until the compiled kernel really
    fits: the estimate only picks where to start (the launcher on a GPU and ``aot.py`` pass one)."""
    np2 = triton.next_power_of_2(n)
    k_max = 128 if mix_columns(op, n)[1] > 64 else 256
    bh = max(min(row.block_h, triton.next_power_of_2(H), k_max // np2), 16 // np2)
    while bh * np2 > 16 and shared_estimate(op, n, row.block_m, bh, row.num_stages, smem.amd) > smem.limit:
        bh //= 2
    cfg = _config(row, n, H, bh)
    while measure is not None and bh * np2 > 16 and measure(cfg) > smem.limit:
        bh //= 2
        cfg = _config(row, n, H, bh)
    return cfg


def configs(n: int, H: int, T: int, op: str = "pre", smem: SharedMemory | None = None,
            measure: Callable[[Config], int] | None = None, norm: bool = False) -> Config:
    """The launch config of ``op`` in {"pre", "head", "fused_post_pre"} for ``n`` streams, hidden
    size ``H``, ``T <= SMALL_T`` tokens (any n <= 8, any H), on a GPU with shared memory ``smem``
    (default: the H100's, ``SHARED_MEMORY["sm90"]``; the launchers pass the input device's), with
    the fused RMSNorm (``norm``) or not: the table's row (:func:`table_row`), fitted to n, H and
    the shared memory (:func:`fit_shared`, ``measure`` as there)."""
    smem = smem or SHARED_MEMORY["sm90"]
    return fit_shared(table_row(op, T, smem.amd, norm), op, n, H, smem, measure)


def norm_chunks(H: int, block_c: int) -> int:
    """Chunks of ``block_c`` that cover a row of H (the fused RMSNorm's NCH)."""
    return triton.cdiv(H, block_c)


def prep_block(n3p: int) -> int:
    """Columns of fn per ``prep_kernel`` program: 16K elements of fn a program, at most 1024
    columns (wider programs spilled registers on sm90 and gfx942 at n3p >= 32; none spill at
    16K)."""
    return min(1024, 16384 // n3p)


# --- 2. fitting: above SMALL_T -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TwoPass:
    """Launch plan of ``pre``/``head``/``fused_post_pre`` above ``SMALL_T`` tokens: fn split into
    bf16 hi/lo (``kernels.prep_kernel``; ``prec`` "hilo", the interpreter runs "ieee"), then
    ``kernels.prenorm_kernel`` over all tokens, then ``kernels.finalize_kernel``
    (``fused_post_pre`` runs ``post_kernel`` first).

    GEMM: ``block_m`` tokens x ``steps * block_k`` columns of K = n*H per program, ``warps``,
    ``stages``, ``split_fast`` program order. Second pass: ``bt`` tokens x ``bc`` hidden columns
    per collapse program, ``bmb`` tokens per post/comb program (Sinkhorn in-thread),
    ``fin_warps``. ``min_cols``: the GEMM's output columns are padded to at least this many
    (:func:`mix_columns`; see :data:`TWO_PASS_ROWS`).
    """

    block_m: int
    block_k: int
    steps: int
    warps: int
    stages: int
    prec: str = "hilo"
    split_fast: bool = False
    bt: int = 1
    bc: int = 1024
    bmb: int = 16
    fin_warps: int = 4
    min_cols: int = 16


def plan(op: str, n: int, H: int, T: int, smem: SharedMemory | None = None) -> TwoPass:
    """The :class:`TwoPass` plan of ``op`` in {"pre", "head", "fused_post_pre"} for ``T >
    SMALL_T`` tokens, n streams, hidden size H (any), on a GPU with shared memory ``smem``: the
    :data:`TWO_PASS_ROWS` row, its stages, then K tile, then token tile lowered until
    :func:`gemm_shared` fits, and each program's K steps from the row's splits."""
    smem = smem or SHARED_MEMORY["sm90"]
    row = _row(TWO_PASS_ROWS, (op, family(smem)), T)
    K = n * H
    n3p = mix_columns(op, n, row.min_cols)[1]
    bm, stages = row.block_m, row.stages
    bk = max(16, min(row.block_k, triton.next_power_of_2(K)))
    while stages > 2 and gemm_shared(n3p, bm, bk, stages, smem.amd) > smem.limit:
        stages -= 1
    while bk > 16 and gemm_shared(n3p, bm, bk, stages, smem.amd) > smem.limit:
        bk //= 2
    while bm > 16 and gemm_shared(n3p, bm, bk, stages, smem.amd) > smem.limit:
        bm //= 2
    steps = max(1, triton.cdiv(triton.cdiv(K, row.splits), bk))
    # Collapse tiles at least 16 wide: 1-wide tiles (H = 1) crash Triton 3.6's coalescing pass.
    return TwoPass(bm, bk, steps, row.warps, stages, row.prec, row.split_fast, row.bt,
                   max(16, min(row.bc, triton.next_power_of_2(H))), row.bmb, row.fin_warps, row.min_cols)


# --- 2. fitting: post and the backward --------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PostConfig:
    """``post_kernel``'s tile: ``block_h`` hidden columns of every stream per program, ``warps``,
    and ``h_fast`` its program order (hidden blocks of a token on consecutive programs)."""

    block_h: int
    warps: int
    h_fast: bool = True


def post_config(H: int, T: int, smem: SharedMemory | None = None) -> PostConfig:
    """The tile of ``post`` (and of ``fused_post_pre``'s post step) for hidden size H, T tokens,
    on a GPU with shared memory ``smem`` (default the H100's): the :data:`POST_ROWS` row, its
    tile capped by H."""
    row = _row(POST_ROWS, ("post", family(smem or SHARED_MEMORY["sm90"])), T)
    return PostConfig(min(row.block_h, triton.next_power_of_2(H)), row.warps, row.h_fast)


def _pow2_ceil(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def backward_config(n: int, H: int, T: int, head: bool, norm: bool = False, fused: bool = False,
                    amd: bool = False) -> dict:
    """Launch parameters of the pre/head/fused_post_pre backward (``backward.py``'s stages) for n
    streams, hidden size H, T tokens, on AMD (``amd``) or NVIDIA: the :data:`BACKWARD_ROWS` row's
    tiles, with the widths that n, ``head`` and ``norm`` fix and the step counts that H and T do.

    ``sp``: stage 2's partial width (the mix columns, then the per-token sums of ``backward.py``'s
    module doc), ``stw`` the sums' tile width in stage 3; ``n3p``: ``gz``'s width (>= 16, tl.dot's
    minimum); ``tw``: ``tok``'s width. Stage 2: ``bm`` tokens x ``bh`` hidden columns per step,
    ``stats_steps`` steps per program; stage 3: ``bt`` tokens a program; stage 4: one
    ``gres_bm`` x ``gres_bh`` tile a program; stage 5: ``gfn_bt`` tokens x ``gfn_bk`` columns per
    step, ``gfn_steps`` steps (its chunk of tokens). Step counts are powers of two chosen from T,
    so a model compiles a few variants at most. ``fused`` takes the same tiles."""
    row = backward_row(head, fused, amd, T)
    m = n if head else 2 * n + n * n
    np_ = max(2, triton.next_power_of_2(n))
    stats = m + n + n * (n + 1) // 2 if norm else m + 1 + n
    cfg = dict(m=m, np=np_, sp=max(16, triton.next_power_of_2(stats)), n3p=max(16, triton.next_power_of_2(m)),
               tw=max(2, triton.next_power_of_2(n + 3)), gp=max(2, triton.next_power_of_2(n * (n + 1) // 2)),
               stw=max(2, triton.next_power_of_2(stats - m)),
               **{f.name: getattr(row, f.name) for f in dataclasses.fields(row) if f.name not in ("max_t", "programs")})
    cfg["stats_steps"], cfg["gfn_steps"] = backward_steps(row, n, H, T)
    return cfg


def backward_row(head: bool, fused: bool, amd: bool, T: int) -> BackwardRow:
    """The :data:`BACKWARD_ROWS` row of pre's (neither flag), head's or fused_post_pre's backward at T."""
    op = "head_backward" if head else "fused_post_pre_backward" if fused else "pre_backward"
    return _row(BACKWARD_ROWS, (op, AMD if amd else NVIDIA), T)


def backward_steps(row: BackwardRow, n: int, H: int, T: int) -> tuple[int, int]:
    """``(stats_steps, gfn_steps)`` of :func:`backward_config`: the steps of the looping stages 2
    and 5 for ``row`` at (n, H, T), in plain integer arithmetic (the launcher keys its plans by
    them on every call)."""
    n_hb = -(-H // row.bh)
    n_tb = -(-T // row.bm)
    splits = max(1, min(n_hb, -(-row.programs // n_tb)))
    t_blocks = -(-T // row.gfn_bt)
    chunks = max(1, min(t_blocks, -(-row.programs // -(-(n * H) // row.gfn_bk))))
    return _pow2_ceil(-(-n_hb // splits)), _pow2_ceil(-(-t_blocks // chunks))


def post_backward_config(H: int, T: int, amd: bool = False) -> tuple[int, int]:
    """``_post_bwd_kernel``'s ``(block_h, num_warps)`` for hidden size H, T tokens, on AMD or NVIDIA."""
    row = _row(BACKWARD_ROWS, ("post_backward", AMD if amd else NVIDIA), T)
    return min(row.block_h, triton.next_power_of_2(H)), row.warps
