"""Launchers for the Triton kernels: flatten nothing (the op layer did), pick a config, allocate,
launch under the input's device. Signatures are those of ``mhc/backends/__init__.py``.

Two launch heuristics, split at ``SMALL_T`` tokens: :func:`configs` (T <= SMALL_T: the latency-bound
single-launch and chunked kernels; the T bucket's row of ``_TABLE``, :func:`table_row`, fitted to
n, H and the device's shared memory by :func:`fit_shared`; :func:`mix_specialization` turns a
config into their compile-time constants) and :func:`plan` (above: the two-pass path), plus
:func:`post_config` for ``post``. The launchers and ``aot.py`` use the same functions, so what AOT
builds is what runs.

Per call, a launcher looks up its launch plan (:func:`plan_for`: config, tiles, the kernels as
:class:`~mhc.backends.triton.direct.DirectKernel` handles; built once per op, n, H,
:func:`t_bucket`, dtype and device, kept in :data:`mhc.plans.PLANS`), allocates its outputs and
takes its scratch buffers (counters, partials, fn's hi/lo rows) from :mod:`mhc.backends.workspaces` and
launches: no heuristic runs and no kernel argument is re-specialised by Triton
on a warm call.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable

import torch
import triton

from mhc.backends import device_guard, empty, empty_like
from mhc.backends.triton import NORM_MAX_H, kernels  # noqa: F401 (NORM_MAX_H: the docstrings' limit)
from mhc.backends.triton.direct import DirectKernel, int_spec
from mhc.backends.workspaces import WORKSPACES
from mhc.plans import PLANS

#: Compile options that every launch (and every build of ``aot.py``) passes: Triton 3.9 warns when
#: fp fusion is left to its default, which 3.10 turns off; the kernels were tuned and checked with
#: it on, as 3.6 does by default.
COMPILE_OPTIONS = dict(enable_fp_fusion=True)

#: True when ``TRITON_INTERPRET=1`` was set before the kernels were defined: they then run on CPU
#: tensors, and every kernel gets it as its ``INTERPRET`` constexpr (the GEMM then runs in fp32,
#: as the interpreter mishandles bf16 dots, and bf16 rounding is done in integer arithmetic, as
#: it truncates; see ``kernels``).
INTERPRETED = type(kernels.mix_kernel).__name__ == "InterpretedFunction"


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
      ones are zero); 0 keeps ``_mix_columns``'s width (:data:`_AMD` sets 16 for head).

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


@dataclasses.dataclass(frozen=True)
class Row:
    """One T bucket of :data:`_TABLE`: what was tuned, before :func:`fit_shared` sizes it for n,
    H and the device. Fields as :class:`Config`, except:

    - ``max_t``: the bucket's largest T (the first row with T <= max_t serves T).
    - ``chunk_mib``: 0 for the single-launch kernel; else the chunked kernel, with chunks of as
      many tokens as keep their residual (bf16/fp16) under ``chunk_mib`` MiB, in L2 when phase B
      re-reads it (:func:`fit_shared` derives ``Config.chunk``).
    - ``block_h``: the K tile to start from (:func:`fit_shared` caps it by H and halves it until
      the kernel fits the shared memory).
    - ``splits``: GEMM programs per token block wanted (``Config.splits``/``h_per_split`` follow
      from H and the K tile).
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


#: Above this many tokens ``pre``, ``head`` and ``fused_post_pre`` take the two-pass path
#: (:func:`plan`); at or below it, :func:`configs`.
SMALL_T = 128

#: Register budget of ``kernels._tail_prefetch`` (bytes of residual held per thread).
TAIL_PF_BYTES = 256

#: The small-T launch table: one complete row per T bucket, as tuned on the H100/H200 for pre,
#: head and fused_post_pre alike (the figures that chose them: docs/tuning/triton.md, run 7).
#: What is compiled depends on the bucket and H only (never on T itself), so a model compiles at
#: most one variant per bucket and op. block_m_b, c_steps and b_split are read by the chunked
#: kernel only, tail_rows by the single launch only.
_TABLE = (
    #   max_t    chunk_mib block_m block_h splits block_c block_m_b c_steps b_split tail_rows warps stages
    Row(1,       0,        16,     64,     128,   1024,   16,       1,      False,  1,        4,    1),
    Row(SMALL_T, 64,       16,     64,     64,    256,    4,        1,      True,   1,        4,    1),
)

#: AMD (``SharedMemory.amd``: gfx942, gfx950) changes to every ``_TABLE`` row, by op: the VGPR
#: budget of issue 13 (no VGPR spill and <= 256 VGPRs a thread at n = 4, H in {4096, 7168}; on
#: CDNA a spill goes to scratch memory, and over 256 VGPRs leaves one wave per SIMD). The rows as
#: tuned on the H100/H200 built 33 of those 40 AMD kernels with 264-512 VGPRs, 7 of them spilling
#: (head on gfx942: 300); with these, all 40 take 136-224 and spill none
#: (benchmarks/results/aot-amd-vgpr.md, per build; swept with benchmarks/amd_vgpr_sweep.py).
#: Chosen by registers only, the fewest changes that fit: nothing has been timed on AMD.
#: - head: 16 GEMM columns instead of 8 (n + the sum of squares, padded): AMD's MFMA has no
#:   N = 8 form, and Triton 3.6 then falls back to an fp32 FMA dot whose operand layouts hold
#:   the K tile in registers (gfx942: 512 VGPRs, 300 spilled; gfx950: 396-398).
#: - pre: K tiles of n x 32 (the GEMM's hi/lo operand tiles; 64 wide: 302-349 VGPRs on gfx942).
#: - fused_post_pre: K tiles of n x 16 (its post step's [BM, n, block_h] tiles besides; 32 wide
#:   still gave 264-265 on gfx942 at T <= 128 and at T = 1, H = 7168).
_AMD = {
    "head": dict(min_cols=16),
    "pre": dict(block_h=32),
    "fused_post_pre": dict(block_h=16),
}

#: The fused RMSNorm's change to the chunked rows: a collapse program owns whole rows (held in
#: registers, ``NORM_MAX_H``), one token each, in chunks of up to 1024 (few, so that the unrolled
#: row stays short).
_NORM_CHUNKED = dict(block_m_b=1, block_c=1024, c_steps=1)


@dataclasses.dataclass(frozen=True)
class PostConfig:
    """``post_kernel``'s tile: ``block_h`` hidden columns of every stream per program, ``warps``,
    and ``h_fast`` its program order (hidden blocks of a token on consecutive programs)."""

    block_h: int
    warps: int
    h_fast: bool = True


def post_config(H: int, T: int) -> PostConfig:
    """The tile of ``post`` (and of ``fused_post_pre``'s post step) for hidden size H, T tokens.
    T = 1 runs token-major: one token has nothing to order, and that form needs no division to
    find its block (docs/tuning/triton.md, "Program order: post")."""
    if T <= 1:
        bh, warps, h_fast = 256, 1, False
    elif T <= 128:
        bh, warps, h_fast = 512, 2, True
    else:
        bh, warps, h_fast = 1024, 4, True
    return PostConfig(min(bh, triton.next_power_of_2(H)), warps, h_fast)


def _mix_columns(op: str, n: int, min_cols: int = 0) -> tuple[int, int]:
    """The GEMM's output columns (n for head, 2n + n*n otherwise) and their padded width, with
    one spare column for the sum of squares, and at least ``min_cols`` (the configs'
    ``min_cols``: the spare columns are zero; they cost L2 reads of fn only)."""
    n3 = n if op == "head" else 2 * n + n * n
    return n3, max(triton.next_power_of_2(n3 + 1), min_cols)


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

_DEVICE_SHARED: dict[int, SharedMemory] = {}


def device_shared_memory(device: torch.device) -> SharedMemory:
    """The :class:`SharedMemory` of ``device`` (a CUDA or ROCm GPU), from the driver once per
    device; the H100's for CPU tensors (the interpreter has no limit, and the CPU tests then run
    the configs that the H100 runs)."""
    if device.type != "cuda" or INTERPRETED:
        return SHARED_MEMORY["sm90"]
    index = device.index if device.index is not None else torch.cuda.current_device()
    got = _DEVICE_SHARED.get(index)
    if got is None:
        props = triton.runtime.driver.active.utils.get_device_properties(index)
        got = _DEVICE_SHARED[index] = SharedMemory(int(props["max_shared_mem"]), torch.version.hip is not None)
    return got


#: Shared memory that the kernels' other phases (partial reductions, Sinkhorn, the collapse) may
#: take besides the GEMM's tiles; Triton reuses one allocation across phases, so the kernel needs
#: the larger of the two (sm90, n = 8, H = 1: 32 KB with GEMM tiles of 10-20 KB).
OTHER_PHASES_SHARED = 32768


def shared_estimate(op: str, n: int, block_m: int, block_h: int, num_stages: int, amd: bool) -> int:
    """Bytes of shared memory that ``mix_kernel``/``chunk_kernel`` need for ``op`` with n streams,
    a GEMM step of ``block_m`` tokens x ``block_h`` hidden elements (K = next_pow2(n) x block_h)
    and ``num_stages``, on AMD (``amd``) or NVIDIA: fitted to Triton 3.6's allocations, of which
    it was an upper bound at the shapes of tests/test_triton_compile.py; Triton 3.9 asks 2-8 KB
    more at n >= 6 (unpipelined pre: 73728 B at n = 6 against an estimate of 65536 B). It is the
    first guess of :func:`fit_shared`, which needs no compiler (the interpreter, the CPU tests);
    on a GPU and in ``aot.py`` the compiled kernel's real size decides (``fit_shared(...,
    measure=...)``).

    Tiles of one GEMM step: residual a = block_m x K x 2 B, fn b = K x max(16, N3P) x 4 B (fp32,
    or bf16 hi + lo: 4 B a column either way, at least the MMA's narrowest N), and for
    ``fused_post_pre`` the sublayer output x = block_m x block_h x 2 B. Unpipelined (one stage):
    the larger of a and b. Pipelined, AMD keeps num_stages - 1 copies (fused_post_pre: of b
    only, its residual tile comes from registers: exact on gfx942); NVIDIA keeps num_stages
    copies of a + b, and for fused_post_pre it took up to 3.4x (a + b + x) at 3 stages (n = 8:
    280 KB), so num_stages + 1 copies are counted there. Never less than
    ``OTHER_PHASES_SHARED``."""
    k = block_h * triton.next_power_of_2(n)
    a = block_m * k * 2
    b = k * max(16, _mix_columns(op, n)[1]) * 4
    fused = op == "fused_post_pre"
    if num_stages <= 1:  # not pipelined: the operands pass through one reused buffer in turn
        gemm = max(a, b)
    elif amd:
        gemm = (num_stages - 1) * b + a if fused else (num_stages - 1) * (a + b)
    else:
        gemm = (num_stages + 1) * (a + b + block_m * block_h * 2) if fused else num_stages * (a + b)
    return max(gemm, OTHER_PHASES_SHARED)


def table_row(op: str, T: int, amd: bool = False, norm: bool = False) -> Row:
    """The :data:`_TABLE` row that serves ``op`` at T tokens (T <= SMALL_T), with :data:`_AMD`'s
    changes on AMD (``amd``) and :data:`_NORM_CHUNKED` for the fused RMSNorm (``norm``)."""
    row = next((r for r in _TABLE if T <= r.max_t), None)
    if row is None:
        raise ValueError(f"configs() covers T <= {_TABLE[-1].max_t}; plan() serves T = {T}")
    if amd:
        row = dataclasses.replace(row, **_AMD.get(op, {}))
    if norm and row.chunk_mib:
        row = dataclasses.replace(row, **_NORM_CHUNKED)
    return row


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
    (pre/fused at n = 8: the shared-memory rule would reach it at T > 1024; it still decides
    n = 8's unpipelined small-T rows, which ran that way in the H100 contract tests). It is halved
    while :func:`shared_estimate` exceeds ``smem.limit`` (at T > 1024, n >= 5 asked 80-160 KB of
    MI300X's 64 KB, and fused_post_pre 280-308 KB of the H100's 227 KB; n = 4 keeps its tuned
    tiles everywhere). With ``measure`` (a config -> the compiled kernel's ``metadata.shared`` in bytes,
    which a compiler update can change) it is then halved until the compiled kernel really fits:
    the estimate only picks where to start (:func:`device_config` and ``aot.py`` pass one)."""
    np2 = triton.next_power_of_2(n)
    k_max = 128 if _mix_columns(op, n)[1] > 64 else 256
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
    """The launch config of ``op`` for ``n`` streams, hidden size ``H``, ``T <= SMALL_T`` tokens
    (any n <= 8, any H), on a GPU with shared memory ``smem`` (default: the H100's,
    ``SHARED_MEMORY["sm90"]``; the launchers pass the input device's), with the fused RMSNorm
    (``norm``) or not: the table's row (:func:`table_row`), fitted to n, H and the shared memory
    (:func:`fit_shared`, ``measure`` as there)."""
    smem = smem or SHARED_MEMORY["sm90"]
    return fit_shared(table_row(op, T, smem.amd, norm), op, n, H, smem, measure)


_FITTED: dict[tuple, Config] = {}


def device_config(op: str, n: int, H: int, T: int, dtype: torch.dtype, device: torch.device,
                  norm: bool = False) -> Config:
    """:func:`configs` for a launch on ``device``, with its shared memory. On a GPU, the K tile is
    checked against the compiled kernel's real shared memory (``aot.compile_mix`` for the
    device's target reads ``metadata.shared``; Triton itself checks it only when it loads the
    kernel, and its needs change between releases: 3.9 asks 2-8 KB more than 3.6 at n >= 6) and
    halved while it does not fit. That costs one extra compile per config on its first use in a
    process (Triton's on-disk cache serves later processes); the result is kept per device,
    dtype and estimated config, so later calls pay a dict lookup. If that compile raises, the
    estimate's config runs, with a warning (Triton's own load check still stands)."""
    smem = device_shared_memory(device)
    cfg = configs(n, H, T, op, smem, norm=norm)
    if device.type != "cuda" or INTERPRETED:
        return cfg
    key = (device.index, op, n, dtype, H % 16 == 0, cfg)
    got = _FITTED.get(key)
    if got is None:
        from mhc.backends.triton import aot

        with torch.cuda.device(device):
            target = triton.runtime.driver.active.get_current_target()

        def measure(c: Config) -> int:
            return aot.compile_mix(op, n, dtype, c, target, H % 16 == 0).metadata.shared

        try:
            got = configs(n, H, T, op, smem, measure=measure, norm=norm)
        except Exception as e:
            warnings.warn(f"mhc triton: could not measure the shared memory of the {op} kernel for n={n}, H={H} "
                          f"({type(e).__name__}: {e}); using the estimated tiles", RuntimeWarning, stacklevel=3)
            got = cfg
        _FITTED[key] = got
    return got


def mix_specialization(op: str, n: int, dtype: torch.dtype, cfg: Config, norm_chunks: int = 0) -> dict:
    """Compile-time constants of the kernel that serves ``op`` in {"pre", "head",
    "fused_post_pre"} with ``cfg`` (``kernels.mix_kernel`` if ``cfg.chunk == 0``, else
    ``kernels.chunk_kernel``), ``n`` streams, residual ``dtype``. ``norm_chunks`` > 0: the fused
    RMSNorm, the row's collapse held in that many chunks of ``cfg.block_c`` (:func:`norm_chunks`)."""
    head = op == "head"
    n3, n3p = _mix_columns(op, n, cfg.min_cols)
    sp = triton.next_power_of_2(cfg.splits)
    common = dict(
        N=n, NP=triton.next_power_of_2(n), N3=n3, N3P=n3p,
        HEAD=head, FUSED=op == "fused_post_pre",
        BM=cfg.block_m, BH=cfg.block_h, STEPS=cfg.h_per_split // cfg.block_h, SP=sp, BC=cfg.block_c,
        INTERPRET=INTERPRETED, EXACT_BF16=dtype == torch.bfloat16,
    )
    if norm_chunks:
        common.update(NORM=True, NCH=norm_chunks)
    if cfg.chunk:
        return dict(common, CHUNK=cfg.chunk, BMB=cfg.block_m_b, CSTEPS=cfg.c_steps, BSPLIT=cfg.b_split)
    return dict(common, RB=cfg.tail_rows, PF=cfg.tail_pf)


def norm_chunks(H: int, block_c: int) -> int:
    """Chunks of ``block_c`` that cover a row of H (the fused RMSNorm's NCH)."""
    return triton.cdiv(H, block_c)


def prep_block(n3p: int) -> int:
    """Columns of fn per ``prep_kernel`` program: 16K elements of fn a program, at most 1024
    columns (n3p = 32 at 1024 columns spilled 144 B on sm90 under Triton 3.9, and n = 8's
    128 x 1024 spilled 8 KB on sm90 and 242 VGPRs on gfx942 under 3.6; none spill at 16K)."""
    return min(1024, 16384 // n3p)


def t_bucket(T: int) -> int:
    """The T bucket of a launch plan: the token counts between which no heuristic here changes
    (``_TABLE``'s rows and :func:`post_config`: T <= 1 and T <= SMALL_T; :func:`plan`'s splits:
    T <= 1024). Everything a plan holds depends on T only through this."""
    return 0 if T <= 1 else 1 if T <= SMALL_T else 2 if T <= 1024 else 3


def _flat(numel: int, dtype: torch.dtype) -> tuple:
    """A workspace layout of one flat buffer of at least ``numel`` elements, rounded up to a power
    of two so that calls of nearby T share a pooled buffer (``mhc.backends.workspaces``)."""
    return ((1 << max(0, numel - 1).bit_length(),), dtype),  # not triton.next_power_of_2: ~3 µs a call


@dataclasses.dataclass(frozen=True)
class TwoPass:
    """Launch plan of ``pre``/``head``/``fused_post_pre`` above ``SMALL_T`` tokens: fn split into
    bf16 hi/lo (``kernels.prep_kernel``; ``prec`` "hilo", the interpreter runs "ieee"), then
    ``kernels.prenorm_kernel`` over all tokens, then ``kernels.finalize_kernel``
    (``fused_post_pre`` runs ``post_kernel`` first).

    GEMM: ``block_m`` tokens x ``steps * block_k`` columns of K = n*H per program, ``warps``,
    ``stages``, ``split_fast`` program order. Second pass: ``bt`` tokens x ``bc`` hidden columns
    per collapse program, ``bmb`` tokens per post/comb program (Sinkhorn in-thread),
    ``fin_warps``. ``min_cols``: the GEMM's output columns are padded to at least
    this many (:func:`_mix_columns`): head's 8 (n = 4) streamed the residual at 2.2 TB/s on the
    H200 where 16 and pre's 32 stream 3.7 TB/s (benchmarks/results/two-pass-h200.md, "ncu").
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


def gemm_shared(n3p: int, block_m: int, block_k: int, stages: int, amd: bool) -> int:
    """Shared memory of ``prenorm_kernel``'s pipeline: a residual tile (block_m x block_k bf16)
    and fn's hi and lo tiles (block_k x n3p bf16) per stage; AMD's pipeliner keeps stages - 1
    copies (both as the AOT builds report; the kernels' other phases need far less)."""
    copies = max(1, stages - 1) if amd else stages
    return copies * (block_m * block_k * 2 + 2 * block_k * max(16, n3p) * 2)


def plan(op: str, n: int, H: int, T: int, smem: SharedMemory | None = None) -> TwoPass:
    """The :class:`TwoPass` plan of ``op`` in {"pre", "head", "fused_post_pre"} for ``T >
    SMALL_T`` tokens, n streams, hidden size H (any), on a GPU with shared memory ``smem``.

    From the H200 sweeps (benchmarks/prenorm_dev.py, benchmarks/determinism_diag.py; figures in
    docs/tuning/triton.md, "Two-pass path"): GEMM tiles of 128 tokens x 64 columns, 4 warps (8 streamed 2 %
    faster, but Triton 3.6's pipelined dot at 8 warps and N3P = 32 gave partials that differ from
    run to run), 4 stages (2 on AMD, whose pipeliner failed to build some kernels at 4), each
    program K/8 columns (K/16 up to 1024 tokens, so that every SM has work).
    """
    smem = smem or SHARED_MEMORY["sm90"]
    K = n * H
    n3p = _mix_columns(op, n, TwoPass.min_cols)[1]
    bm, stages = 128, (2 if smem.amd else 4)
    bk = max(16, min(64, triton.next_power_of_2(K)))
    while stages > 2 and gemm_shared(n3p, bm, bk, stages, smem.amd) > smem.limit:
        stages -= 1
    while bk > 16 and gemm_shared(n3p, bm, bk, stages, smem.amd) > smem.limit:
        bk //= 2
    while bm > 16 and gemm_shared(n3p, bm, bk, stages, smem.amd) > smem.limit:
        bm //= 2
    splits = 16 if T <= 1024 else 8
    steps = max(1, triton.cdiv(triton.cdiv(K, splits), bk))
    # Collapse tiles at least 16 wide: 1-wide tiles (H = 1) crash Triton 3.6's coalescing pass.
    return TwoPass(bm, bk, steps, 4, stages, bc=max(16, min(1024, triton.next_power_of_2(H))))


# --- launch plans (mhc.plans.PLANS, keyed ("triton", op, n, H, t_bucket(T), dtype, device)) -------


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)  # triton.cdiv is a constexpr function: ~3 µs a call from Python


def _kernel(fn, constexprs: dict, **options) -> DirectKernel:
    return DirectKernel(fn, constexprs, dict(options, **COMPILE_OPTIONS), INTERPRETED)


@dataclasses.dataclass(frozen=True)
class PostPlan:
    """``post_kernel`` with its tile for one (n, H, T bucket, dtype, device)."""

    cfg: PostConfig
    h_blocks: int  # programs per token: cdiv(H, cfg.block_h)
    kernel: DirectKernel


@dataclasses.dataclass(frozen=True)
class SmallPlan:
    """``pre``/``head``/``fused_post_pre`` at T <= SMALL_T: the config of :func:`device_config`
    and its kernel (``mix_kernel``, or ``chunk_kernel`` if ``cfg.chunk``)."""

    cfg: Config
    n3p: int
    head: bool
    norm: bool  # the fused RMSNorm's variant (NORM)
    kernel: DirectKernel
    # mix_kernel's launch (it serves T <= tail_rows <= block_m: one token block): its grid and
    # its workspace layout (the GEMM's partials; arrival counters besides), made once here.
    grid: tuple = ()
    layout: tuple = ()


@dataclasses.dataclass(frozen=True)
class TwoPassPlan:
    """``pre``/``head``/``fused_post_pre`` above SMALL_T: :func:`plan`'s tiles (``tp``) and the
    kernels of both passes; ``prep`` is None where fn is read as fp32 (``prec`` "ieee", the
    interpreter); ``post`` serves fused_post_pre's first step."""

    tp: TwoPass
    n3: int
    n3p: int
    splits: int  # K splits of the GEMM
    norm: bool  # the fused RMSNorm's variant of finalize (NORM): one program per token row
    prep: DirectKernel | None
    prep_grid: tuple
    prenorm: DirectKernel
    finalize: DirectKernel
    post: PostPlan | None


def post_specialization(n: int, cfg: PostConfig) -> dict:
    """Compile-time constants of ``post_kernel`` for n streams and tile ``cfg`` (what the
    launcher passes and ``aot.py`` builds)."""
    return dict(N=n, NP=triton.next_power_of_2(n), BH=cfg.block_h, INTERPRET=INTERPRETED, H_FAST=cfg.h_fast)


def _post_plan(n: int, H: int, T: int) -> PostPlan:
    cfg = post_config(H, T)
    return PostPlan(cfg, _cdiv(H, cfg.block_h),
                    _kernel(kernels.post_kernel, post_specialization(n, cfg), num_warps=cfg.warps))


def _small_plan(op: str, n: int, H: int, T: int, dtype: torch.dtype, device: torch.device,
                norm: bool) -> SmallPlan:
    cfg = device_config(op, n, H, T, dtype, device, norm=norm)
    spec = mix_specialization(op, n, dtype, cfg, norm_chunks(H, cfg.block_c) if norm else 0)
    fn = kernels.chunk_kernel if cfg.chunk else kernels.mix_kernel
    kernel = _kernel(fn, spec, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if cfg.chunk:
        return SmallPlan(cfg, spec["N3P"], op == "head", norm, kernel)
    return SmallPlan(cfg, spec["N3P"], op == "head", norm, kernel, (1, cfg.splits, 1),
                     _flat(cfg.splits * cfg.block_m * spec["N3P"], torch.float32))


def _two_pass_plan(op: str, tp: TwoPass, n: int, H: int, T: int, dtype: torch.dtype,
                   norm: bool = False) -> TwoPassPlan:
    K = n * H
    head = op == "head"
    n3, n3p = _mix_columns(op, n, tp.min_cols)
    prec = "ieee" if INTERPRETED else tp.prec
    k_split = tp.steps * tp.block_k
    splits = _cdiv(K, k_split)
    prep = bk = None
    if prec == "hilo":
        bk = prep_block(n3p)
        prep = _kernel(kernels.prep_kernel, dict(N3=n3, N3P=n3p, BK=bk, INTERPRET=INTERPRETED), num_warps=4)
    prenorm = _kernel(kernels.prenorm_kernel,
                      dict(N3=n3, N3P=n3p, BM=tp.block_m, BK=tp.block_k, STEPS=tp.steps, PREC=prec,
                           EXACT_BF16=dtype == torch.bfloat16, EVEN_K=K % k_split == 0, SPLIT_FAST=tp.split_fast),
                      num_warps=tp.warps, num_stages=tp.stages)
    finalize = _kernel(kernels.finalize_kernel,
                       dict(N=n, NP=triton.next_power_of_2(n), N3=n3, N3P=n3p, SP=triton.next_power_of_2(splits),
                            BT=tp.bt, BC=tp.bc, BMB=tp.bmb, HEAD=head, INTERPRET=INTERPRETED,
                            **(dict(NORM=True, NCH=norm_chunks(H, tp.bc)) if norm else {})),
                       num_warps=tp.fin_warps)
    post = _post_plan(n, H, T) if op == "fused_post_pre" else None
    return TwoPassPlan(tp, n3, n3p, splits, norm, prep, (_cdiv(K, bk), 1, 1) if bk else (), prenorm, finalize, post)


def _build(op: str, n: int, H: int, T: int, dtype: torch.dtype, device: torch.device, norm: bool):
    if op == "post":
        return _post_plan(n, H, T)
    if T <= SMALL_T:
        return _small_plan(op, n, H, T, dtype, device, norm)
    return _two_pass_plan(op, plan(op, n, H, T, device_shared_memory(device)), n, H, T, dtype, norm)


def plan_for(op: str, n: int, H: int, T: int, dtype: torch.dtype, device: torch.device, norm: bool = False):
    """The launch plan of ``op`` (any of the four) for n streams, hidden size H, T tokens,
    residual ``dtype`` on ``device`` (``norm``: with the fused RMSNorm, ``pre`` and
    ``fused_post_pre``): built once per ``t_bucket(T)`` and kept in :data:`mhc.plans.PLANS`.
    A :class:`PostPlan`, :class:`SmallPlan` or :class:`TwoPassPlan`."""
    key = ("triton", op, n, H, t_bucket(T), dtype, device, norm)
    p = PLANS.find(key)  # the warm call: one dict lookup, no closure made
    if p is None:
        p = PLANS.get(key, lambda: _build(op, n, H, T, dtype, device, norm))
    return p


def _prep_fn(fn, n3, n3p, kernel: DirectKernel | None = None):
    """fn (n3, K) fp32 -> (2*n3p, K) bf16 hi rows then lo rows (``kernels.prep_kernel``, launched
    by ``kernel`` or, without one, through the JIT), in a new tensor: the tests' and
    ``benchmarks/prenorm_dev.py``'s entry to the kernel. The launchers run the same kernel on
    every call (one ~1.5 MB launch at H=4096: no cache to invalidate, an in-place update of fn
    is always seen) into a pooled buffer."""
    K = fn.shape[1]
    out = torch.empty((2 * n3p, K), dtype=torch.bfloat16, device=fn.device)
    bk = prep_block(n3p)
    if kernel is None:
        kernel = _kernel(kernels.prep_kernel, dict(N3=n3, N3P=n3p, BK=bk, INTERPRET=INTERPRETED), num_warps=4)
    kernel((_cdiv(K, bk), 1, 1), fn, out, K)
    return out


def _outputs(op, residual, fused_inputs):
    """The outputs of a mix op: ``(layer_input, post_mix, comb_mix, new_residual)``, with the
    layer input standing in for what ``op`` does not make (never written); fused_post_pre's
    new residual and mixes are shaped as its inputs (``fused_inputs``)."""
    T, n, H = residual.shape
    dev = residual.device
    out = empty((T, H), residual.dtype, dev)
    if fused_inputs is not None:
        return out, empty_like(fused_inputs[1]), empty_like(fused_inputs[2]), empty_like(residual)
    if op == "head":
        return out, out, out, out
    return out, empty((T, n, 1), torch.float32, dev), empty((T, n, n), torch.float32, dev), out


def _inputs_key(residual, fn, hc_scale, hc_base, fused_inputs, nw) -> tuple:
    """What the launch keys of a mix op (:meth:`DirectKernel.launch`) hold of the tensors the op
    was given: their dtypes, and the norm weight's (None without one). Every other tensor its
    kernels get is allocated by the launcher, in dtypes the plan fixes."""
    return (residual.dtype, fn.dtype, hc_scale.dtype, hc_base.dtype,
            None if fused_inputs is None else (fused_inputs[0].dtype, fused_inputs[1].dtype, fused_inputs[2].dtype),
            None if nw is None else nw.dtype)


def _mix(op, residual, fn, hc_scale, hc_base, scalars, fused_inputs=None, norm=None):
    """``op`` in {"pre", "head", "fused_post_pre"} by its plan; returns ``(layer_input, post_mix,
    comb_mix, new_residual)`` (the ones ``op`` does not make are placeholders). ``scalars``: the
    kernels' five (floats, then ``sinkhorn_repeat`` an int); ``norm``: None, or ``(norm_weight,
    norm_eps)`` for the fused RMSNorm (pre and fused_post_pre)."""
    T, n, H = residual.shape
    dev = residual.device
    p = plan_for(op, n, H, T, residual.dtype, dev, norm is not None)
    nw = None if norm is None else norm[0]
    ik = _inputs_key(residual, fn, hc_scale, hc_base, fused_inputs, nw)
    scalars = (*scalars, nw, 0.0 if norm is None else norm[1])  # + the kernels' nw_ptr, norm_eps
    if T > SMALL_T:
        return _run_two_pass(op, p, residual, fn, hc_scale, hc_base, scalars, fused_inputs, ik)
    cfg = p.cfg
    out, post_mix, comb_mix, new = _outputs(op, residual, fused_inputs)
    x, pm_in, cm_in = fused_inputs if fused_inputs is not None else (residual,) * 3  # read only if FUSED
    with device_guard(dev):
        if cfg.chunk:
            _chunked(p, residual, x, pm_in, cm_in, new, fn, hc_scale, hc_base, post_mix, comb_mix, out, T, H,
                     scalars, ik)
            return out, post_mix, comb_mix, new
        ticket, (cnt, part) = WORKSPACES.take(dev, p.layout, counters=1)
        p.kernel.launch(p.grid, (ik, int_spec(T), int_spec(scalars[4])),
                        residual, x, pm_in, cm_in, new, fn, hc_scale, hc_base,
                        post_mix, comb_mix, out, part, cnt, T, H, cfg.splits, *scalars)
        WORKSPACES.put(ticket)  # not reached if the launch raised: those buffers are dropped
    return out, post_mix, comb_mix, new


def _chunked(p, residual, x, pm_in, cm_in, new, fn, hc_scale, hc_base, post_mix, comb_mix, out, T, H, scalars, ik):
    """``chunk_kernel`` launches: (A 0), (A 1, B 0), ..., (B last). The chunk count depends on T
    only (a shape), so this is capturable; the partials are [splits, T, N3P] fp32."""
    cfg = p.cfg
    n_chunks = _cdiv(T, cfg.chunk)
    ticket, (_, part) = WORKSPACES.take(residual.device, _flat(cfg.splits * T * p.n3p, torch.float32))
    n_hc = (1 if p.norm else _cdiv(H, cfg.c_steps * cfg.block_c)) + (1 if cfg.b_split and not p.head else 0)
    key = (ik, int_spec(T), int_spec(scalars[4]))
    for a in range(n_chunks + 1):
        b = a - 1
        rows_a = min(cfg.chunk, T - a * cfg.chunk) if a < n_chunks else 0
        rows_b = min(cfg.chunk, T - b * cfg.chunk) if b >= 0 else 0
        n_a = _cdiv(rows_a, cfg.block_m) * cfg.splits
        n_b = _cdiv(rows_b, cfg.block_m_b) * n_hc
        p.kernel.launch((n_b + n_a, 1, 1), (key, int_spec(a), int_spec(b), int_spec(n_b)),
                        residual, x, pm_in, cm_in, new, fn, hc_scale, hc_base,
                        post_mix, comb_mix, out, part, T, H, cfg.splits, a, b, n_b, *scalars)
    WORKSPACES.put(ticket)


def _run_two_pass(op, p: TwoPassPlan, residual, fn, hc_scale, hc_base, scalars, fused_inputs, ik):
    T, n, H = residual.shape
    tp = p.tp
    out, post_mix, comb_mix, new = _outputs(op, residual, fused_inputs)
    sstride = T * p.n3p
    ts, ss = int_spec(T), int_spec(sstride)
    with device_guard(residual.device):
        if fused_inputs is not None:
            x, pm_in, cm_in = fused_inputs
            p.post.kernel.launch((T * p.post.h_blocks, 1, 1), (ik, ts), x, residual, pm_in, cm_in, new, T, H)
        src = new if fused_inputs is not None else residual
        K = n * H
        layout = _flat(p.splits * sstride, torch.float32)
        if p.prep is not None:
            layout += _flat(2 * p.n3p * K, torch.bfloat16)
        ticket, (_, part, *hilo) = WORKSPACES.take(residual.device, layout)
        w = fn
        if p.prep is not None:  # fn as bf16 hi/lo rows, made on every call (an update of fn is seen)
            w = hilo[0]
            p.prep.launch(p.prep_grid, ik, fn, w, K)
        p.prenorm.launch((_cdiv(T, tp.block_m) * p.splits, 1, 1), (ik, ts, ss), src, w, part, T, K, sstride)
        n_pc = 0 if op == "head" else _cdiv(T, tp.bmb)
        p.finalize.launch((n_pc + _cdiv(T, tp.bt) * (1 if p.norm else _cdiv(H, tp.bc)), 1, 1),
                          (ik, ts, ss, int_spec(n_pc), int_spec(scalars[4])),
                          src, out, part, hc_scale, hc_base, post_mix, comb_mix, T, H, p.splits, sstride, n_pc,
                          *scalars)
        WORKSPACES.put(ticket)
    return out, post_mix, comb_mix, new


def _two_pass(op, plan, residual, fn, hc_scale, hc_base, scalars, fused_inputs=None, norm=None):
    """``op`` in {"pre", "head", "fused_post_pre"} by the :class:`TwoPass` tiles ``plan`` (any
    T; the launchers take :func:`plan`'s above SMALL_T, benchmarks/prenorm_dev.py sweeps others);
    ``scalars`` and ``norm`` as :func:`_mix`; returns ``(layer_input, post_mix, comb_mix,
    new_residual)`` as :func:`_mix`."""
    T, n, H = residual.shape
    dtype, dev = residual.dtype, residual.device
    p = PLANS.get(("triton", "two_pass", op, n, H, t_bucket(T), dtype, dev, plan, norm is not None),
                  lambda: _two_pass_plan(op, plan, n, H, T, dtype, norm is not None))
    nw = None if norm is None else norm[0]
    ik = _inputs_key(residual, fn, hc_scale, hc_base, fused_inputs, nw)
    scalars = (*scalars, nw, 0.0 if norm is None else norm[1])
    return _run_two_pass(op, p, residual, fn, hc_scale, hc_base, scalars, fused_inputs, ik)


def _norm(norm_weight, norm_eps):
    return None if norm_weight is None else (norm_weight, float(norm_eps))


def pre(residual, fn, hc_scale, hc_base, rms_eps, hc_pre_eps, hc_sinkhorn_eps,
        hc_post_mult_value, sinkhorn_repeat, norm_weight=None, norm_eps=1e-6):
    """mHC ``pre`` (math: ``mhc.reference.pre``).

    ``residual`` (T, n, H) bf16/fp16 contiguous; ``fn`` (2n+n*n, n*H) fp32; ``hc_scale`` (3,)
    fp32; ``hc_base`` (2n+n*n,) fp32; ``sinkhorn_repeat`` int >= 1; ``norm_weight`` None or (H,)
    in the residual's dtype or fp32, H <= ``NORM_MAX_H`` (the fused RMSNorm). Returns
    ``post_mix`` (T, n, 1) fp32, ``comb_mix`` (T, n, n) fp32, ``layer_input`` (T, H) in the
    residual's dtype.
    """
    scalars = (float(rms_eps), float(hc_pre_eps), float(hc_sinkhorn_eps), float(hc_post_mult_value),
               int(sinkhorn_repeat))
    out, post_mix, comb_mix, _ = _mix("pre", residual, fn, hc_scale, hc_base, scalars,
                                      norm=_norm(norm_weight, norm_eps))
    return post_mix, comb_mix, out


def head(residual, fn, hc_scale, hc_base, rms_eps, hc_eps):
    """mHC ``head`` (math: ``mhc.reference.head``).

    ``residual`` (T, n, H) bf16/fp16 contiguous; ``fn`` (n, n*H) fp32; ``hc_scale`` (1,) fp32;
    ``hc_base`` (n,) fp32. Returns (T, H) in the residual's dtype.
    """
    scalars = (float(rms_eps), float(hc_eps), 0.0, 0.0, 1)
    return _mix("head", residual, fn, hc_scale, hc_base, scalars)[0]


def fused_post_pre(x, residual, post_mix, comb_mix, fn, hc_scale, hc_base, rms_eps, hc_pre_eps,
                   hc_sinkhorn_eps, hc_post_mult_value, sinkhorn_repeat, norm_weight=None, norm_eps=1e-6):
    """``post`` then ``pre`` (math: ``mhc.reference.fused_post_pre``).

    ``x`` (T, H) and ``residual`` (T, n, H) bf16/fp16; ``post_mix`` (T, n, 1) and ``comb_mix``
    (T, n, n) fp32; the rest as :func:`pre`. Returns ``(new_residual (T, n, H), post_mix (T, n, 1),
    comb_mix (T, n, n), layer_input (T, H))``. Up to ``SMALL_T`` tokens the small-T kernels compute
    the new residual inside the GEMM's tile loop, write it once and feed it to the GEMM from
    registers; above, ``post_kernel`` writes it and the two passes read it back. ``norm_weight``,
    ``norm_eps``: as :func:`pre`.
    """
    scalars = (float(rms_eps), float(hc_pre_eps), float(hc_sinkhorn_eps), float(hc_post_mult_value),
               int(sinkhorn_repeat))
    out, pm, cm, new = _mix("fused_post_pre", residual, fn, hc_scale, hc_base, scalars,
                            fused_inputs=(x, post_mix, comb_mix), norm=_norm(norm_weight, norm_eps))
    return new, pm, cm, out


def post(x, residual, post_mix, comb_mix):
    """mHC ``post`` (math: ``mhc.reference.post``).

    ``x`` (T, H) and ``residual`` (T, n, H) bf16/fp16; ``post_mix`` (T, n, 1), ``comb_mix``
    (T, n, n) fp32. Returns (T, n, H) in the residual's dtype.
    """
    T, n, H = residual.shape
    dev = residual.device
    p = plan_for("post", n, H, T, residual.dtype, dev)
    out = empty_like(residual)
    with device_guard(dev):
        p.kernel.launch((T * p.h_blocks, 1, 1), (x.dtype, residual.dtype, post_mix.dtype, comb_mix.dtype, int_spec(T)),
                        x, residual, post_mix, comb_mix, out, T, H)
    return out
