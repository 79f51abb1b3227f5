"""Ahead-of-time builds of every kernel configuration that n=4, H in {4096, 7168} uses, with no GPU.

A tool above the launchers: it reads the configuration table (:mod:`.configs`) and the
specialisations (:mod:`.build`) that the launchers read, and nothing at run time imports it.
``main(["sm90", "gfx942", "gfx950"])`` compiles, for pre, head and fused_post_pre, ``mix_kernel``
or ``chunk_kernel`` (whichever ``configs.configs`` picks, T <= SMALL_T) and ``prep_kernel``,
``prenorm_kernel`` and ``finalize_kernel`` (``configs.plan``, above), ``post_kernel`` for every
T bucket of the table, and the backward kernels of ``backward.py`` (which the interpreter cannot
vouch for: it accepted a shape mismatch between the arms of a runtime ``if`` that the compiler
rejects), bf16, for each arch; prints registers and spills per kernel (CUDA: from ``cuobjdump
--dump-resource-usage`` on the cubin, as Triton's metadata fills them only when loading on a GPU;
AMD: the VGPR/SGPR and spill counts that the AMDGCN assembly carries, and the LDS bytes) and
returns non-zero if any build fails or needs more shared memory than the arch has
(``configs.SHARED_MEMORY``; Triton itself checks that only when a GPU loads the kernel) or spills
registers without a waiver in ``SPILL_WAIVERS``.
``python -m mhc aot --backend triton --arch sm90,gfx942,gfx950`` calls it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

import torch

from mhc.backends.triton import build as B
from mhc.backends.triton import configs as C

ARCHS = tuple(C.SHARED_MEMORY)  # sm90, gfx942, gfx950
H_VALUES = (4096, 7168)
DTYPES = (torch.bfloat16,)  # the models' dtype; fp16 builds the same code paths but doubles the time
MIX_OPS = ("pre", "head", "fused_post_pre")

_TYPE = {torch.bfloat16: "bf16", torch.float16: "fp16"}


def t_values() -> tuple[int, ...]:
    """One T per bucket of the forward rows (``configs.SMALL_ROWS``, ``TWO_PASS_ROWS``,
    ``POST_ROWS``): each row's ``max_t``, and for the unbounded rows 4096 (a prefill)."""
    bounds = {row.max_t for table in (C.SMALL_ROWS, C.TWO_PASS_ROWS, C.POST_ROWS)
              for rows in table.values() for row in rows}
    return tuple(sorted(b for b in bounds if b is not None)) + (4096,)


def _backward_jobs(arch: str):
    """The backward kernels (``backward.py``) for n=4, H in H_VALUES, T = 4096, with every
    gradient asked for: pre (with and without the fused RMSNorm), head, fused_post_pre (with and
    without), at the specialisations the launchers pass (:func:`mhc.backends.triton.backward.specializations`
    and ``post_specialization``): what AOT builds is what runs. Smaller T changes only the step
    counts of the streaming loops."""
    from mhc.backends.triton import backward

    act, f32, bf = "*bf16", "*fp32", "*bf16"
    seen = set()
    T = 4096
    for H in H_VALUES:
        for op, norm in (("pre", False), ("pre", True), ("head", False), ("fused_post_pre", False),
                         ("fused_post_pre", True)):
            head, fused = op == "head", op == "fused_post_pre"
            stats, tail, gres, gfn, _ = backward.specializations(4, H, T, torch.bfloat16, head, norm, fused,
                                                                  need_nw=norm, amd=arch != "sm90")
            label = f"{op}_backward{'+norm' if norm else ''} H={H:<5} T={T:<5} bf16"
            g = act if head else f32
            sigs = {
                "_bwd_stats_kernel": {"res_ptr": act, "fnp_ptr": bf, "gout_ptr": act, "nw_ptr": act, "part_ptr": f32,
                                      "T": "i32", "H": "i32"},
                "_bwd_tail_kernel": {"part_ptr": f32, "n_splits": "i32", "gpm_ptr": g, "gcm_ptr": g,
                                     "scale_ptr": f32, "base_ptr": f32, "gz_ptr": bf, "tok_ptr": f32,
                                     "sums_ptr": f32, "T": "i32", "H": "i32", "rms_eps": "fp32", "w_eps": "fp32",
                                     "sk_eps": "fp32", "post_mult": "fp32", "repeat": "i32", "norm_eps": "fp32"},
                "_bwd_gres_kernel": {"res_ptr": act, "fnp_ptr": bf, "gout_ptr": act, "nw_ptr": act, "gz_ptr": bf,
                                     "tok_ptr": f32, "gext_ptr": act, "gres_ptr": act, "gnw_ptr": f32 if norm else act,
                                     "T": "i32", "H": "i32"},
                "_bwd_gfn_kernel": {"res_ptr": act, "gz_ptr": bf, "gfn_ptr": f32, "T": "i32", "K": "i32"},
            }
            for kname, spec in (("_bwd_stats_kernel", stats), ("_bwd_tail_kernel", tail),
                                ("_bwd_gres_kernel", gres), ("_bwd_gfn_kernel", gfn)):
                spec = dict(spec)
                warps, stages = spec.pop("num_warps"), spec.pop("num_stages")
                key = (kname, tuple(sorted(spec.items())), warps, stages)
                if key not in seen:
                    seen.add(key)
                    yield f"{label} {kname}", f"backward.{kname}", sigs[kname], spec, warps, stages
        pspec, warps = backward.post_specialization(4, H, T)
        psig = {"g_ptr": act, "x_ptr": act, "res_ptr": act, "pm_ptr": f32, "cm_ptr": f32, "gx_ptr": act,
                "gres_ptr": act, "part_ptr": f32, "T": "i32", "H": "i32"}
        key = ("post_bwd", tuple(sorted(pspec.items())), warps)
        if key not in seen:
            seen.add(key)
            yield f"post_backward H=any T={T:<5} bf16 _post_bwd_kernel", "backward._post_bwd_kernel", psig, pspec, warps, 1


def mix_job(op: str, n: int, H: int, T: int, dtype: torch.dtype, arch: str) -> tuple[tuple, tuple]:
    """(dedup key, build job) of the kernel that serves ``op`` at (n, H, T) on ``arch``; the job is
    what :func:`_build` takes after the arch. The key and the label come from the config that
    ``configs.configs`` picks by its estimate; :func:`_build` then fits the K tile to the compiled
    kernel's real shared memory as the launcher does on a GPU (``launch.device_config``), so what
    is built is what runs."""
    cfg = C.configs(n, H, T, op, C.SHARED_MEMORY[arch])
    kname, sig, spec, warps, stages, aligned = B.mix_build(op, n, dtype, cfg, H % 16 == 0)
    key = (kname, op, _TYPE[dtype], tuple(sorted(spec.items())), warps, stages, aligned)
    label = f"{op:<14} n={n} H={H:<5} T<={T:<5} {_TYPE[dtype]} {kname}"
    return key, (label, kname, sig, spec, warps, stages, aligned, (op, n, H, T, dtype))


def two_pass_jobs(op: str, n: int, H: int, T: int, dtype: torch.dtype, arch: str):
    """(dedup key, build job) pairs of the kernels that serve ``op`` at (n, H, T > SMALL_T) on
    ``arch``, with the plan the launcher picks there (``configs.plan``): fn's split,
    ``prenorm_kernel`` and ``finalize_kernel``."""
    p = C.plan(op, n, H, T, C.SHARED_MEMORY[arch])
    act, t = "*" + _TYPE[dtype], _TYPE[dtype]
    head = op == "head"
    n3, n3p = C.mix_columns(op, n, p.min_cols)
    K = n * H
    splits = -(-K // (p.steps * p.block_k))
    sp = 1 << (splits - 1).bit_length()
    mix_ty = act if head else "*fp32"
    common = dict(N3=n3, N3P=n3p, BM=p.block_m, BK=p.block_k, STEPS=p.steps, PREC=p.prec,
                  EXACT_BF16=dtype == torch.bfloat16, EVEN_K=K % (p.steps * p.block_k) == 0)
    pspec = dict(N3=n3, N3P=n3p, BK=C.prep_block(n3p), INTERPRET=False)
    yield ("prep", tuple(sorted(pspec.items()))), (f"{'prep':<14} N3={n3:<3}", "prep_kernel",
                                                  {"fn_ptr": "*fp32", "out_ptr": "*bf16", "K": "i32"}, pspec, 4, 1)
    label = f"{op:<14} n={n} H={H:<5} T<={T:<5} {t}"
    spec = dict(common, SPLIT_FAST=p.split_fast)
    sig = {"x_ptr": act, "w_ptr": "*bf16", "part_ptr": "*fp32", "T": "i32", "K": "i32", "sstride": "i32"}
    yield (("prenorm", t, tuple(sorted(spec.items())), p.warps, p.stages),
           (f"{label} prenorm_kernel", "prenorm_kernel", sig, spec, p.warps, p.stages))
    fspec = dict(N=n, NP=1 << (n - 1).bit_length(), N3=n3, N3P=n3p, SP=sp, BT=p.bt, BC=p.bc, BMB=p.bmb,
                 HEAD=head, INTERPRET=False)
    fsig = {"src_ptr": act, "out_ptr": act, "part_ptr": "*fp32", "scale_ptr": "*fp32", "base_ptr": "*fp32",
            "post_ptr": mix_ty, "comb_ptr": mix_ty, "T": "i32", "H": "i32", "n_splits": "i32", "sstride": "i32",
            "n_pc": "i32", "rms_eps": "fp32", "pre_eps": "fp32", "sk_eps": "fp32", "post_mult": "fp32",
            "sk_repeat": "i32", "nw_ptr": act, "norm_eps": "fp32"}
    yield (("finalize", t, tuple(sorted(fspec.items())), p.fin_warps),
           (f"{label} finalize_kernel", "finalize_kernel", fsig, fspec, p.fin_warps, 1))
    if op != "head":  # the fused RMSNorm's variant (norm_weight)
        nspec = dict(fspec, NORM=True, NCH=C.norm_chunks(H, p.bc))
        yield (("finalize", t, tuple(sorted(nspec.items())), p.fin_warps),
               (f"{label} finalize_kernel {NORM_LABEL}", "finalize_kernel", fsig, nspec, p.fin_warps, 1))


#: In a build's label: the fused-RMSNorm variant of a kernel. Such a build gets its kernel's
#: spill waiver only if it spills no more than its plain twin (the same config without the
#: norm): the norm itself must add no spill.
NORM_LABEL = "[norm]"


def norm_mix_job(op: str, n: int, H: int, T: int, dtype: torch.dtype, arch: str) -> tuple[tuple, tuple]:
    """(dedup key, build job) of the small-T kernel with the fused RMSNorm (``norm_weight``) that
    serves ``op`` at (n, H, T <= SMALL_T) on ``arch``: ``configs.configs(..., norm=True)``."""
    cfg = C.configs(n, H, T, op, C.SHARED_MEMORY[arch], norm=True)
    spec = B.mix_specialization(op, n, dtype, cfg, C.norm_chunks(H, cfg.block_c))
    kname = "chunk_kernel" if cfg.chunk else "mix_kernel"
    key = (kname, op, _TYPE[dtype], tuple(sorted(spec.items())), cfg.num_warps, cfg.num_stages, H % 16 == 0)
    label = f"{op:<14} n={n} H={H:<5} T<={T:<5} {_TYPE[dtype]} {kname} {NORM_LABEL}"
    return key, (label, kname, B.mix_signature(op, dtype), spec, cfg.num_warps, cfg.num_stages, H % 16 == 0)


def _jobs(arch: str = "sm90"):
    """(label, kernel name, signature, constexprs, num_warps, num_stages[, H % 16 == 0]) for every
    distinct build on ``arch`` (whose shared memory the configs fit); a kernel name without a
    module prefix is in ``kernels.py``."""
    seen = set()
    for H in H_VALUES:
        for T in t_values():
            for dtype in DTYPES:
                for op in MIX_OPS:
                    if T <= C.SMALL_T:
                        pairs = [mix_job(op, 4, H, T, dtype, arch)]
                        if op != "head":
                            pairs.append(norm_mix_job(op, 4, H, T, dtype, arch))
                    else:
                        pairs = list(two_pass_jobs(op, 4, H, T, dtype, arch))
                    for key, job in pairs:
                        if key not in seen:
                            seen.add(key)
                            yield job
                pc = C.post_config(H, T, C.SHARED_MEMORY[arch])
                spec = B.post_specialization(4, pc)
                key = ("post", _TYPE[dtype], tuple(sorted(spec.items())), pc.warps)
                if key not in seen:
                    seen.add(key)
                    yield (f"{'post':<14} H=any   T<={T:<5} {_TYPE[dtype]}", "post_kernel",
                           B.post_signature(dtype), spec, pc.warps, 1)
    yield from _backward_jobs(arch)


def _cuda_resources(cubin: bytes) -> str:
    from triton.backends.nvidia import compiler as nv

    tool = os.path.join(os.path.dirname(nv.__file__), "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    if not m:
        return "registers: not reported"
    reg, stack, shared, local = m.groups()
    return f"regs {reg:>3}  spill/stack {stack}B local {local}B  static smem {shared}B"


def _amd_resources(asm: str) -> str:
    def get(name):
        m = re.search(rf"\.{name}:\s*(\d+)", asm)
        return m.group(1) if m else "?"

    scratch = re.search(r";\s*ScratchSize:\s*(\d+)", asm)
    return (f"vgpr {get('vgpr_count'):>3} (spill {get('vgpr_spill_count')})  "
            f"sgpr {get('sgpr_count')} (spill {get('sgpr_spill_count')})  "
            f"scratch {scratch.group(1) if scratch else '?'}B")


def _fit_and_compile(arch: str, fit: tuple):
    """The config that the launcher runs for ``fit`` = (op, n, H, T, dtype) on ``arch`` (K tile
    fitted to the measured shared memory) and its compiled kernel."""
    op, n, H, T, dtype = fit
    built: dict = {}

    def measure(cfg) -> int:
        if cfg not in built:
            built[cfg] = B.compile_mix(op, n, dtype, cfg, B.target(arch), H % 16 == 0)
        return built[cfg].metadata.shared

    cfg = C.configs(n, H, T, op, C.SHARED_MEMORY[arch], measure=measure)
    measure(cfg)
    return cfg, built[cfg]


def _build(job) -> tuple[str, bool, str]:
    arch, (label, kname, signature, constexprs, num_warps, num_stages, *rest) = job
    h_aligned = rest[0] if rest else True
    fit = rest[1] if len(rest) > 1 else None
    try:
        t0 = time.time()
        note = ""
        if fit is None:
            compiled = B.compile_kernel(kname, signature, constexprs, num_warps, num_stages, h_aligned,
                                        B.target(arch))
        else:
            first = C.configs(*fit[1:4], fit[0], C.SHARED_MEMORY[arch])
            cfg, compiled = _fit_and_compile(arch, fit)
            if cfg != first:
                note = f"  K tile {first.block_h}->{cfg.block_h} (fitted to the measured shared memory)"
        dt = time.time() - t0
        res = (_cuda_resources(compiled.asm["cubin"]) if arch == "sm90"
               else _amd_resources(compiled.asm["amdgcn"])) + f"  shared {compiled.metadata.shared}B"
        line = f"{arch:<7} {label}  warps {num_warps} stages {num_stages}  {res}{note}  ({dt:.1f}s)"
        # Triton checks this only when it loads the kernel on a GPU ("out of resource: shared
        # memory"): a build that does not fit is a failure here, not on the user's machine.
        limit = C.SHARED_MEMORY[arch].limit
        if compiled.metadata.shared > limit:
            return f"{line}  FAILED: needs {compiled.metadata.shared} B of shared memory, {arch} has {limit}", False, ""
        return line, True, ""
    except Exception as e:
        return f"{arch:<7} {label}  FAILED: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", False, repr(e)


def main(archs: list[str]) -> int:
    """Build every configuration for ``archs`` (from ``ARCHS``); print one line per build;
    return the number of failed builds (0: all built). Unknown archs raise ``ValueError``."""
    for a in archs:
        B.target(a)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("TRITON_INTERPRET=1 is set: AOT needs compiled kernels; unset it", file=sys.stderr)
        return 1
    from mhc.progress import Progress

    jobs = [(a, j) for a in archs for j in _jobs(a)]
    failed = 0
    t0 = time.time()
    workers = max(1, min(len(jobs), os.cpu_count() or 1))
    print(f"triton aot: {len(jobs)} builds for {', '.join(archs)} on {workers} worker(s); each takes seconds to "
          "a minute of one core", flush=True)
    progress = Progress(len(jobs))
    waived = []
    spills: dict[tuple[str, str], int] = {}  # (arch, label) -> spilled amount, for the [norm] twins
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for (arch, job), (line, ok, detail) in zip(jobs, pool.map(_build, jobs)):
            progress.step()
            spills[(arch, job[0])] = spill_amount(line)
            if ok and spilled(line):
                why = waiver(arch, job[1].rpartition(".")[2])
                if NORM_LABEL in job[0]:  # a [norm] build is built right after its plain twin
                    twin = spills.get((arch, job[0].replace(" " + NORM_LABEL, "")))
                    why = (f"no more than its plain twin, which spills {twin} (the norm adds none); {why}"
                           if why is not None and twin is not None and spill_amount(line) <= twin else None)
                if why is None:
                    ok, line = False, f"{line}  FAILED: spills registers (no waiver in aot.SPILL_WAIVERS)"
                else:
                    waived.append(line)
                    line = f"{line}  spill waived: {why}"
            print(progress.prefix() + line, flush=True)
            if not ok:
                failed += 1
                if detail:
                    print("   " + detail[:2000], file=sys.stderr)
    print(f"{len(jobs) - failed}/{len(jobs)} builds succeeded in {time.time() - t0:.0f}s "
          f"for {', '.join(archs)}; {len(waived)} spill(s) waived (aot.SPILL_WAIVERS)")
    return failed


#: Register spills that ``main`` lets pass, by (arch, kernel) with the reason; any other spill in a
#: build of the model shapes fails it (on CDNA a VGPR spill goes to scratch memory, and over 256
#: VGPRs means one wave per SIMD: the AOT build is our only window on AMD speed). All are sm90's
#: (the small-T chunked kernel, still to be rebuilt); the two-pass kernels spill nothing on any
#: arch, and on gfx942 and gfx950 the small-T kernels stay within 256 VGPRs and spill none with the
#: AMD rows of ``configs.SMALL_ROWS`` (the counts: docs/tuning/triton.md; SGPR spills to VGPR
#: lanes remain in ``chunk_kernel``).
SPILL_WAIVERS = {
    ("sm90", "chunk_kernel"): "T <= 128 chunked kernel at H = 7168: 255 registers, 8-224 B of stack: to rebuild",
}


def waiver(arch: str, kernel: str) -> str | None:
    """The reason :data:`SPILL_WAIVERS` gives for a spill of ``kernel`` built on ``arch``, or None."""
    return SPILL_WAIVERS.get((arch, kernel))


def spill_amount(line: str) -> int:
    """Spilled bytes (CUDA stack) plus spilled VGPRs and scratch bytes (AMD) of a build line."""
    return sum(int(m) for pattern in (r"spill/stack (\d+)B", r"vgpr +\d+ \(spill (\d+)\)", r"scratch (\d+)B")
               for m in re.findall(pattern, line))


def spilled(line: str) -> bool:
    """Whether a build line of :func:`_build` reports spilled registers: stack bytes on CUDA
    (``spill/stack``), spilled VGPRs or scratch memory on AMD. SGPR spills (to VGPR lanes, no
    memory) are shown but do not count."""
    for pattern in (r"spill/stack (\d+)B", r"vgpr +\d+ \(spill (\d+)\)", r"scratch (\d+)B"):
        m = re.search(pattern, line)
        if m and int(m.group(1)) > 0:
            return True
    return False


if __name__ == "__main__":
    sys.exit(main(sys.argv[1].split(",") if len(sys.argv) > 1 else list(ARCHS)))
