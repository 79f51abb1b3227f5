"""Triton-backend specifics: every T bucket and code path of the kernels against the fp64 oracle,
with poisoned outputs; the counters left zero; the registry record's reasons; the config table.

On CPU these run under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1 before
any kernel is defined), so sizes stay small.
"""

from __future__ import annotations

import dataclasses
import importlib.util

import pytest
import torch

from mhc import reference as R
from mhc.checking import TOLERANCES, rel_error
from mhc.backends.workspaces import WORKSPACES
from mhc.registry import Problem

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
EPS = (1e-6, 1e-6, 1e-6, 2.0)


@pytest.fixture(scope="module")
def L():
    from mhc.backends.triton import BACKEND

    why = BACKEND.probe(Problem("pre", DEV, torch.bfloat16, 4, 64, 1))
    if why:
        pytest.skip("; ".join(why))
    return BACKEND.load()


# Outputs are NaN-poisoned by conftest's autouse fixture; tolerances are mhc.checking's table.


def _close(out, ref, dtype, kind):
    err, tol = rel_error(out, ref), TOLERANCES[dtype][kind]
    assert err <= tol, f"{kind} rel. error {err:.2e} > {tol:g}"


def check_all_ops(L, T, n, H, dtype, seed, repeat=4):
    """pre, post, fused_post_pre and head of the loaded launchers against the reference in fp64.

    fused's pre half is checked against the reference run on the kernel's own stored new residual:
    at these tiny H a few 1-ulp rounding differences of that residual would move the mixes ~1e-3."""
    t = make(T, n, H, dtype, seed=seed)
    r = d64(t)
    for o, ref, kind in zip(L.pre(t["residual"], t["fn"], t["scale"], t["base"], *EPS, repeat),
                            R.pre(r["residual"], r["fn"], r["scale"], r["base"], *EPS, repeat),
                            ("mix", "mix", "act")):
        _close(o, ref, dtype, kind)
    want_new = R.post(r["x"], r["residual"], r["pm"], r["cm"])
    _close(L.post(t["x"], t["residual"], t["pm"], t["cm"]), want_new, dtype, "act")
    new, *rest = L.fused_post_pre(t["x"], t["residual"], t["pm"], t["cm"], t["fn"], t["scale"], t["base"],
                                  *EPS, repeat)
    _close(new, want_new, dtype, "act")
    for o, ref, kind in zip(rest, R.pre(new.double(), r["fn"], r["scale"], r["base"], *EPS, repeat),
                            ("mix", "mix", "act")):
        _close(o, ref, dtype, kind)
    h = make(T, n, H, dtype, seed=seed + 7, head=True)
    rh = d64(h)
    _close(L.head(h["residual"], h["fn"], h["scale"], h["base"], 1e-6, 1e-6),
           R.head(rh["residual"], rh["fn"], rh["scale"], rh["base"], 1e-6, 1e-6), dtype, "act")


def make(T, n, H, dtype, seed, head=False):
    g = torch.Generator().manual_seed(seed)
    n3 = n if head else 2 * n + n * n
    t = dict(
        residual=torch.randn(T, n, H, generator=g).to(dtype),
        x=torch.randn(T, H, generator=g).to(dtype),
        fn=torch.randn(n3, n * H, generator=g) / (n * H) ** 0.5,
        scale=torch.rand(1 if head else 3, generator=g) + 0.5,
        base=torch.randn(n3, generator=g) * 0.5,
        pm=torch.rand(T, n, 1, generator=g) * 2,
        cm=torch.softmax(torch.randn(T, n, n, generator=g), -1),
    )
    return {k: v.to(DEV) for k, v in t.items()}


def d64(t):
    return {k: v.double() for k, v in t.items()}


# (T, n, H): T=1 takes the single-launch kernel's register tail, 2/5/40/3 the chunked kernel's
# small-T bucket (one chunk, partial blocks), 300 the two-pass path (prenorm_kernel then
# finalize_kernel; T not a multiple of its 128-token blocks); H not a multiple of the tiles, n
# from 1 to 8.
SHAPES = [(1, 4, 64), (5, 3, 100), (40, 4, 72), (300, 2, 48), (2, 8, 40), (3, 1, 33)]


@pytest.mark.parametrize("T,n,H", SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_pre_post_head_fused(L, T, n, H, dtype):
    check_all_ops(L, T, n, H, dtype, seed=T * 100 + n * 10 + H, repeat=3)


@pytest.mark.parametrize("repeat", [1, 20])
def test_sinkhorn_repeat_is_runtime(L, repeat):
    t = make(4, 4, 64, torch.bfloat16, seed=repeat)
    r = d64(t)
    _, cm, _ = L.pre(t["residual"], t["fn"], t["scale"], t["base"], *EPS, repeat)
    _, rcm, _ = R.pre(r["residual"], r["fn"], r["scale"], r["base"], *EPS, repeat)
    _close(cm, rcm, torch.bfloat16, "mix")


def _use_rows(monkeypatch, *rows):
    """Every op's small-T rows (``configs.SMALL_ROWS``, both arch families) replaced by ``rows``."""
    from mhc.backends.triton import configs

    monkeypatch.setattr(configs, "SMALL_ROWS", {key: rows for key in configs.SMALL_ROWS})


# A test-only chunked row (configs.Row's fields): chunk_mib 0.01 gives 32-token chunks at n=4, H=40
# (320 B a token), 3 GEMM splits of 16 hidden elements, phase B in blocks of 8 tokens and 2 hidden
# chunks of 2x16.
_SMALL_CHUNKS = dict(max_t=128, chunk_mib=0.01, block_m=16, block_h=16, splits=3, block_c=16, block_m_b=8, c_steps=2,
                     b_split=False, tail_rows=1, num_warps=4, num_stages=1)


@pytest.mark.parametrize("T", [33, 70])
def test_chunked_across_chunk_boundaries(L, monkeypatch, T):
    """Several chunks, T not a multiple of the chunk or of the blocks: phase A of chunk c beside
    phase B of chunk c-1 in one launch must not mix their tokens."""
    from mhc.backends.triton import configs

    _use_rows(monkeypatch, configs.Row(**_SMALL_CHUNKS))
    cfg = configs.configs(4, 40, T)
    assert cfg.chunk == 32 and cfg.splits == 3 and T > cfg.chunk
    check_all_ops(L, T, 4, 40, torch.bfloat16, seed=T)
    check_all_ops(L, T, 4, 40, torch.float16, seed=T + 1)

# The small-T paths: the single-launch kernel's register tail (T <= tail_rows; some hidden chunks
# prefetched, the rest loaded after) and the chunked kernel with the separate post/comb program
# (b_split); H=40 masks the tiles, n from 1 to 8.
_TAIL = dict(chunk_mib=0, block_m=16, block_h=16, splits=3, block_c=16, block_m_b=16, c_steps=1, b_split=False,
             num_warps=4, num_stages=1)
_SMALL_T_ROWS = {
    "tail": dict(_TAIL, max_t=1, tail_rows=1),
    "tail-2rows": dict(_TAIL, max_t=2, tail_rows=2),
    "chunk-bsplit": dict(_SMALL_CHUNKS, b_split=True, c_steps=1),
    "chunk-bsplit-csteps": dict(_SMALL_CHUNKS, b_split=True),
}


@pytest.mark.parametrize("kind", sorted(_SMALL_T_ROWS))
@pytest.mark.parametrize("n,dtype", [(4, torch.bfloat16), (8, torch.float16), (3, torch.bfloat16), (1, torch.bfloat16)])
def test_small_t_paths(L, monkeypatch, kind, n, dtype):
    from mhc.backends.triton import configs

    row = _SMALL_T_ROWS[kind]
    _use_rows(monkeypatch, configs.Row(**row), configs.Row(**_SMALL_CHUNKS))
    if not row["chunk_mib"]:
        # A budget of 2 chunks a row: part of H prefetched, the rest loaded after the mixes.
        monkeypatch.setattr(configs, "TAIL_PF_BYTES", -(-2 * row["tail_rows"] * n * 16 * 2 // 128))
        assert configs.configs(n, 40, 1).tail_pf == 2 or n == 1
    for T in ((1, 2) if row["max_t"] == 2 else (1,) if row["max_t"] == 1 else (5, 33)):
        check_all_ops(L, T, n, 40, dtype, seed=T + n + len(kind))


def test_prep_kernel_splits_fn_exactly():
    """hi + lo of prep_kernel reproduce fn to ~2**-16 relative, padding rows are 0."""
    from mhc.backends.triton import launch

    fn = (torch.randn(5, 3000) * 3).to(DEV)
    out = launch._prep_fn(fn, 5, 8).float()
    assert out.shape == (16, 3000)
    assert (out[5:8] == 0).all() and (out[13:16] == 0).all()
    assert ((out[:5] + out[8:13] - fn).abs() <= fn.abs() * 2.0**-15).all()
    assert (out[:5] == fn.bfloat16().float()).all()  # round to nearest even


# post_kernel's program orders (H_FAST: the table's choice above T = 1; token-major at T = 1); H
# masks the tile.
@pytest.mark.parametrize("h_fast", [True, False])
@pytest.mark.parametrize("T,n,H,dtype", [(5, 4, 100, torch.bfloat16), (7, 3, 40, torch.float16),
                                         (3, 8, 72, torch.bfloat16), (2, 1, 64, torch.bfloat16)])
def test_post_kernel_forms(h_fast, T, n, H, dtype):
    import triton

    from mhc.backends.triton import kernels, launch

    t = make(T, n, H, dtype, seed=T * 10 + n)
    r = d64(t)
    bh = 32
    out = torch.full((T, n, H), float("nan"), dtype=dtype, device=DEV)
    kernels.post_kernel[(T * triton.cdiv(H, bh),)](
        t["x"], t["residual"], t["pm"], t["cm"], out, T, H, N=n, NP=triton.next_power_of_2(n), BH=bh,
        INTERPRET=launch.INTERPRETED, H_FAST=h_fast, num_warps=1)
    _close(out, R.post(r["x"], r["residual"], r["pm"], r["cm"]), dtype, "act")


def test_post_program_order_by_bucket():
    """The measured choice (docs/tuning/triton.md, "Program order: post"): hidden blocks fastest wherever
    there is more than one token."""
    from mhc.backends.triton import configs

    assert not configs.post_config(4096, 1).h_fast
    assert all(configs.post_config(H, T).h_fast for H in (4096, 7168) for T in (2, 64, 512, 4096, 16384))


def test_counters_left_zero_and_calls_repeat(L, monkeypatch):
    """The arrival counters must be zero after a launch (the next call relies on it)."""
    from mhc.backends.triton import launch  # noqa: F401 (loads the kernels)

    t = make(1, 4, 64, torch.bfloat16, seed=3)  # T = 1: mix_kernel, the kernel with counters
    first = L.pre(t["residual"], t["fn"], t["scale"], t["base"], *EPS, 2)
    second = L.pre(t["residual"], t["fn"], t["scale"], t["base"], *EPS, 2)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    for buf in WORKSPACES.counter_buffers():
        assert int(buf.count_nonzero()) == 0


def test_configs_depend_on_bucket_not_T():
    """What gets compiled (the constexprs) is fixed within a T bucket, so T does not recompile:
    every row's bucket bound is one of ``mhc.plans.T_BOUNDS``, and configs() up to SMALL_T, plan()
    above, give one config per ``t_bucket``."""
    from mhc.backends.triton import build, configs
    from mhc.plans import T_BOUNDS, t_bucket

    for table in (configs.SMALL_ROWS, configs.TWO_PASS_ROWS, configs.POST_ROWS, configs.BACKWARD_ROWS):
        for key, rows in table.items():
            bounds = [r.max_t for r in rows]
            assert all(b in T_BOUNDS for b in bounds[:-1]) and bounds == sorted(bounds, key=lambda b: b or 1 << 62)
            assert bounds[-1] in (T_BOUNDS + (None,)), key
    for (op, arch), rows in configs.SMALL_ROWS.items():
        assert rows[-1].max_t == configs.SMALL_T, (op, arch)
    for rows in (*configs.TWO_PASS_ROWS.values(), *configs.POST_ROWS.values(), *configs.BACKWARD_ROWS.values()):
        assert rows[-1].max_t is None  # every T served
    edges = sorted({1, 2} | {b + d for b in T_BOUNDS for d in (0, 1)} | {70000})
    for op in ("pre", "head", "fused_post_pre"):
        for H in (4096, 7168, 1000):
            seen = {}
            for T in edges:
                if T <= configs.SMALL_T:
                    cfg = configs.configs(4, H, T, op)
                    what = tuple(sorted(build.mix_specialization(op, 4, torch.bfloat16, cfg).items()))
                    assert cfg.splits * cfg.h_per_split >= H > (cfg.splits - 1) * cfg.h_per_split
                    if cfg.chunk:
                        assert cfg.chunk % cfg.block_m == 0 and cfg.chunk % cfg.block_m_b == 0
                else:
                    what = configs.plan(op, 4, H, T)
                assert seen.setdefault(t_bucket(T), what) == what, (op, H, T)
    with pytest.raises(ValueError, match="plan"):
        configs.configs(4, 4096, configs.SMALL_T + 1)


def test_plan_fits_each_arch_shared_memory():
    """Every plan's GEMM pipeline fits the shared memory of the arch it is made for (n <= 8, any
    H), keeps tl.dot's minimum tile (16), and n = 4 at the models' H keeps the tuned tiles on the
    H100/H200; MI300X's 64 KB of LDS gets 2 stages."""
    from mhc.backends.triton import configs

    for arch, smem in configs.SHARED_MEMORY.items():
        for n in range(1, 9):
            for H in (1, 7, 40, 4096, 7168):
                for T in (200, 2000):
                    for op in ("pre", "head", "fused_post_pre"):
                        p = configs.plan(op, n, H, T, smem)
                        n3p = configs.mix_columns(op, n)[1]
                        assert configs.gemm_shared(n3p, p.block_m, p.block_k, p.stages, smem.amd) <= smem.limit
                        assert p.block_m >= 16 and p.block_k >= 16
                        assert p.steps * p.block_k * (16 if T <= 1024 else 8) >= n * H
    p = configs.plan("pre", 4, 4096, 4096)
    assert (p.block_m, p.block_k, p.stages, p.warps, p.steps) == (128, 64, 4, 4, 32)
    assert configs.plan("pre", 4, 4096, 4096, configs.SHARED_MEMORY["gfx942"]).stages == 2


def test_probe_reasons_on_cpu(monkeypatch):
    import mhc.backends.triton as tb

    monkeypatch.setattr(tb, "_interpreted", lambda: False)
    why = tb.BACKEND.probe(Problem("pre", torch.device("cpu"), torch.bfloat16, 4, 64, 1))
    assert why and "TRITON_INTERPRET=1" in why[0]


def test_aot_counts_spills_and_their_waivers():
    """A build line with stack bytes (CUDA), spilled VGPRs or scratch (AMD) is a spill; SGPR
    spills are not; every waiver names a reason."""
    from mhc.backends.triton import aot

    assert aot.spilled("sm90 pre ... regs 255  spill/stack 128B local 0B  static smem 1024B")
    assert not aot.spilled("sm90 pre ... regs 106  spill/stack 0B local 0B  static smem 1024B")
    assert aot.spilled("gfx942 head ... vgpr 512 (spill 300)  sgpr 50 (spill 0)  scratch 1204B")
    assert aot.spilled("gfx942 pre ... vgpr 349 (spill 1)  sgpr 106 (spill 346)  scratch 0B")
    assert not aot.spilled("gfx942 pre ... vgpr  60 (spill 0)  sgpr 106 (spill 82)  scratch 0B  shared 4096B")
    assert all(key[0] in aot.ARCHS and key[1].endswith("_kernel") and len(key) == 2 and why
               for key, why in aot.SPILL_WAIVERS.items())
    assert not any(key[1] in ("prenorm_kernel", "finalize_kernel", "prep_kernel", "post_kernel")
                   for key in aot.SPILL_WAIVERS)
    # a waiver covers its arch and kernel only: no backward kernel has one
    assert aot.waiver("sm90", "chunk_kernel") is not None
    assert aot.waiver("gfx942", "chunk_kernel") is None
    assert not any(key[1].startswith("_bwd") or key[1] == "_post_bwd_kernel" for key in aot.SPILL_WAIVERS)


def test_aot_rejects_unknown_arch():
    from mhc.backends.triton import aot

    with pytest.raises(ValueError, match="unknown arch"):
        aot.main(["sm75"])


def test_configs_fit_each_arch_shared_memory_and_keep_the_h100_rows():
    """Every (n <= 8, H, small-T bucket, op) config fits the shared memory of the arch it is made
    for by configs.shared_estimate (the first guess; on a GPU and in AOT the compiled size decides,
    as tests/test_triton_compile.py checks); the H100's configs are the default ones, and n = 4
    (the models' n) gets them on AMD too (MI300X's 64 KB fits them as tuned) but for the
    fields that the AMD rows of ``configs.SMALL_ROWS`` change there (the VGPR budget)."""
    from triton import next_power_of_2

    from mhc.backends.triton import configs

    for arch, smem in configs.SHARED_MEMORY.items():
        for n in range(1, 9):
            for H in (1, 7, 40, 4096, 7168):
                for T in (1, 5, 100):
                    for op in ("pre", "head", "fused_post_pre"):
                        cfg = configs.configs(n, H, T, op, smem)
                        assert cfg.block_h * next_power_of_2(n) >= 16, (arch, n, H, T, op)  # tl.dot's minimum K
                        est = configs.shared_estimate(op, n, cfg.block_m, cfg.block_h, cfg.num_stages, smem.amd)
                        assert est <= smem.limit, (arch, n, H, T, op, est)
                        if arch == "sm90":
                            assert cfg == configs.configs(n, H, T, op)
                        if n == 4 and arch != "sm90":
                            # AMD: the H100's rows but for the AMD rows' fields (and what block_h derives)
                            ref = configs.configs(n, H, T, op)
                            amd_row, nv_row = configs.table_row(op, T, True), configs.table_row(op, T, False)
                            amd = {f.name: getattr(amd_row, f.name) for f in dataclasses.fields(amd_row)
                                   if getattr(amd_row, f.name) != getattr(nv_row, f.name)}
                            assert amd, (op, T)  # every op has its AMD change
                            changed = {f.name for f in dataclasses.fields(cfg)
                                       if getattr(cfg, f.name) != getattr(ref, f.name)}
                            assert changed <= set(amd) | {"splits", "h_per_split"}, (arch, H, T, op)
                            if H >= 4096:
                                assert all(getattr(cfg, k) == v for k, v in amd.items()), (arch, H, T, op)


def test_configs_fit_the_measured_shared_memory():
    """With ``measure`` (the compiled kernel's real ``metadata.shared``, as on a GPU and in AOT),
    the K tile is halved until the measured size fits, whatever the estimate said; where the
    measured size fits, the estimate's config is kept."""
    from triton import next_power_of_2

    from mhc.backends.triton import configs, launch

    smem = configs.SHARED_MEMORY["gfx942"]
    for n, op in ((8, "pre"), (6, "fused_post_pre"), (4, "head")):
        est = configs.configs(n, 4096, 100, op, smem)
        assert configs.configs(n, 4096, 100, op, smem, measure=lambda c: 0) == est
        asked = []

        def measure(c, n=n):  # a compiler that needs 4 KB per K-tile element: only K <= 16 fits
            asked.append(c.block_h)
            return c.block_h * next_power_of_2(n) * 4096

        cfg = configs.configs(n, 4096, 100, op, smem, measure=measure)
        assert cfg.block_h * next_power_of_2(n) == 16 and asked[0] == est.block_h
        assert cfg.splits * cfg.h_per_split >= 4096 > (cfg.splits - 1) * cfg.h_per_split
        assert cfg == configs._config(configs.table_row(op, 100, smem.amd), n, 4096, cfg.block_h)
    # On CPU tensors (the interpreter) nothing is compiled: the estimate's config runs.
    assert launch.device_config("pre", 8, 4096, 100, torch.bfloat16, torch.device("cpu")) == configs.configs(8, 4096, 100)


@pytest.mark.parametrize("T", [1, 5])
@pytest.mark.parametrize("op,norm", [("pre", False), ("pre", True), ("head", False), ("fused_post_pre", False),
                                     ("fused_post_pre", True)])
def test_amd_configs_match_fp64_oracle(L, monkeypatch, op, norm, T):
    """The small-T configs that an AMD GPU gets (the AMD rows: head's 16 GEMM columns, pre's and
    fused_post_pre's narrower K tiles), run by the interpreter, against the fp64 oracle, with and
    without the fused RMSNorm: T = 1 (mix_kernel) and T = 5 (chunk_kernel), H = 200 (masked tiles).
    gfx942 and gfx950 get the same rows (only their LDS limits differ, and n = 4 fits both)."""
    from mhc import checking
    from mhc.backends.triton import configs, launch

    monkeypatch.setattr(launch, "device_shared_memory", lambda device: configs.SHARED_MEMORY["gfx942"])
    H = 200
    p = launch.plan_for(op, 4, H, T, torch.bfloat16, DEV, norm)  # the plan that the call below runs
    assert p.cfg == configs.configs(4, H, T, op, configs.SHARED_MEMORY["gfx942"], norm=norm)
    assert p.cfg != configs.configs(4, H, T, op, norm=norm)  # not the H100's
    assert p.n3p == (16 if op == "head" else 32)
    args, kw = checking.make_inputs(op, (T,), 4, H, torch.bfloat16, device=DEV, seed=T * 10 + len(op))
    if norm:
        g = torch.Generator().manual_seed(T)
        kw = dict(kw, norm_weight=(torch.randn(H, generator=g) * 0.5 + 1).to(torch.bfloat16).to(DEV), norm_eps=1e-5)
    outs = checking.call(op, args, kw, backend="triton")
    for name, err, tol in checking.compare(op, outs, checking.oracle(op, args, kw), torch.bfloat16):
        assert err <= tol, f"{op} T={T} norm={norm} {name}: rel. error {err:.3e} > {tol:g}"


@pytest.mark.slow  # about a minute of interpreter on 2 cores: the six largest contract calls of the suite
def test_launch_uses_the_device_shared_memory(L, monkeypatch):
    """The launchers size their tiles for the input's device (``device_shared_memory``), and the
    smaller tiles that a 64 KB GPU gets compute the same ops (n = 6 and 8 above SMALL_T; under
    the interpreter, H kept small)."""
    from mhc.backends.triton import configs, launch

    if DEV.type == "cpu":
        assert launch.device_shared_memory(torch.device("cpu")) == configs.SHARED_MEMORY["sm90"]
    seen = []
    real_plan = configs.plan
    monkeypatch.setattr(launch, "device_shared_memory", lambda dev: configs.SHARED_MEMORY["gfx942"])
    monkeypatch.setattr(launch, "plan", lambda *a, **k: seen.append(a + tuple(k.values())) or real_plan(*a, **k))
    for n in (6, 8):
        check_all_ops(L, 200, n, 64, torch.bfloat16, seed=n, repeat=3)
    assert seen and all(s[-1] == configs.SHARED_MEMORY["gfx942"] for s in seen)


def test_two_pass_small_tiles(L, monkeypatch):
    """prenorm_kernel + finalize_kernel with several K splits, uneven K and multi-token collapse
    programs (bt 4, bc narrower than H), bf16 and fp16."""
    from mhc.backends.triton import configs, launch

    monkeypatch.setattr(launch, "plan", lambda op, n, H, T, smem=None: configs.TwoPass(
        16, 16, 3, 4, 2, bt=4, bc=32, bmb=16))
    check_all_ops(L, 150, 3, 40, torch.bfloat16, seed=5, repeat=3)
    check_all_ops(L, 150, 4, 72, torch.float16, seed=6, repeat=3)


def test_two_pass_at_the_smallest_widths(L):
    """The planned tiles at H = 1 and 7 (K below one GEMM step; collapse tiles wider than H)."""
    check_all_ops(L, 140, 2, 1, torch.bfloat16, seed=7, repeat=2)
    check_all_ops(L, 140, 1, 7, torch.float16, seed=8, repeat=2)


def test_triton_modules_import_no_circle():
    """The Triton backend's modules, with every import counted (function-local ones too), form no
    circle: configs <- build <- launch <- backward <- aot, the AOT tool above the launchers."""
    import ast
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1] / "mhc" / "backends" / "triton"
    names = {p.stem for p in root.glob("*.py") if p.stem != "__init__"}
    graph = {}
    for name in names:
        deps = set()
        for node in ast.walk(ast.parse((root / f"{name}.py").read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                if node.module == "mhc.backends.triton":
                    deps |= {a.name for a in node.names} & names
                elif node.module.startswith("mhc.backends.triton."):
                    deps.add(node.module.rpartition(".")[2])
        graph[name] = deps - {name}
    assert "aot" not in set().union(*(graph[n] for n in names - {"aot"})), graph

    def visit(n, path):
        assert n not in path, f"import circle: {' -> '.join(path + [n])}"
        for d in graph.get(n, ()):
            visit(d, path + [n])

    for n in names:
        visit(n, [])
