"""What a Triton kernel of this backend is compiled with, and its compilation for a target with no GPU.

- :func:`mix_specialization`, :func:`post_specialization`: the compile-time constants of the
  forward kernels for a config of :mod:`.configs` (what the launchers pass and ``aot.py`` builds).
- :data:`COMPILE_OPTIONS`, :data:`INTERPRETED`: what every launch passes, and whether the kernels
  were defined for Triton's interpreter.
- :func:`compile_kernel` / :func:`compile_mix`: ``triton.compile`` of a kernel for a
  ``GPUTarget``, with the argument types the launchers pass. The launcher uses it on a GPU to
  measure a config's real shared memory (``launch.device_config``); ``aot.py``, the tool above
  the launchers, builds every model configuration with it.

Imports ``kernels`` and ``configs`` only: nothing here launches.
"""

from __future__ import annotations

import importlib
import inspect

import torch
import triton

from mhc.backends.triton import kernels
from mhc.backends.triton.configs import Config, PostConfig, mix_columns

__all__ = ["COMPILE_OPTIONS", "INTERPRETED", "target", "mix_specialization", "post_specialization",
           "mix_signature", "post_signature", "mix_build", "compile_kernel", "compile_mix"]

#: Compile options that every launch (and every build of ``aot.py``) passes: Triton 3.9 warns when
#: fp fusion is left to its default, which 3.10 turns off; the kernels were tuned and checked with
#: it on, as 3.6 does by default.
COMPILE_OPTIONS = dict(enable_fp_fusion=True)

#: True when ``TRITON_INTERPRET=1`` was set before the kernels were defined: they then run on CPU
#: tensors, and every kernel gets it as its ``INTERPRET`` constexpr (the GEMM then runs in fp32,
#: as the interpreter mishandles bf16 dots, and bf16 rounding is done in integer arithmetic, as
#: it truncates; see ``kernels``).
INTERPRETED = type(kernels.mix_kernel).__name__ == "InterpretedFunction"

_TYPE = {torch.bfloat16: "bf16", torch.float16: "fp16"}


def target(arch: str):
    """Triton's ``GPUTarget`` of ``arch`` (a key of ``configs.SHARED_MEMORY``)."""
    from triton.backends.compiler import GPUTarget

    if arch == "sm90":
        return GPUTarget("cuda", 90, 32)
    if arch in ("gfx942", "gfx950"):
        return GPUTarget("hip", arch, 64)
    raise ValueError(f"unknown arch {arch!r}; known: sm90, gfx942, gfx950")


def mix_specialization(op: str, n: int, dtype: torch.dtype, cfg: Config, norm_chunks: int = 0) -> dict:
    """Compile-time constants of the kernel that serves ``op`` in {"pre", "head",
    "fused_post_pre"} with ``cfg`` (``kernels.mix_kernel`` if ``cfg.chunk == 0``, else
    ``kernels.chunk_kernel``), ``n`` streams, residual ``dtype``. ``norm_chunks`` > 0: the fused
    RMSNorm, the row's collapse held in that many chunks of ``cfg.block_c``
    (``configs.norm_chunks``)."""
    head = op == "head"
    n3, n3p = mix_columns(op, n, cfg.min_cols)
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


def post_specialization(n: int, cfg: PostConfig) -> dict:
    """Compile-time constants of ``post_kernel`` for n streams and tile ``cfg`` (what the
    launcher passes and ``aot.py`` builds)."""
    return dict(N=n, NP=triton.next_power_of_2(n), BH=cfg.block_h, INTERPRET=INTERPRETED, H_FAST=cfg.h_fast)


def mix_signature(op: str, dtype: torch.dtype) -> dict[str, str]:
    """Argument types of ``mix_kernel``/``chunk_kernel`` as ``launch._mix`` passes them (unused
    pointers are the residual or the output, hence the residual dtype)."""
    act = "*" + _TYPE[dtype]
    fused = op == "fused_post_pre"
    return {
        "res_ptr": act, "x_ptr": act, "new_ptr": act, "out_ptr": act,
        "pm_in_ptr": "*fp32" if fused else act, "cm_in_ptr": "*fp32" if fused else act,
        "post_ptr": act if op == "head" else "*fp32", "comb_ptr": act if op == "head" else "*fp32",
        "fn_ptr": "*fp32", "scale_ptr": "*fp32", "base_ptr": "*fp32",
        "part_ptr": "*fp32", "cnt_ptr": "*i32",
        "T": "i32", "H": "i32", "n_splits": "i32", "sk_repeat": "i32",
        "c_a": "i32", "c_b": "i32", "n_b": "i32",
        "rms_eps": "fp32", "pre_eps": "fp32", "sk_eps": "fp32", "post_mult": "fp32",
        # the fused RMSNorm's (read only with NORM; the model's norm weight is in its dtype)
        "nw_ptr": act, "norm_eps": "fp32",
    }


def post_signature(dtype: torch.dtype) -> dict[str, str]:
    """Argument types of ``post_kernel`` as ``launch.post`` passes them."""
    act = "*" + _TYPE[dtype]
    return {"x_ptr": act, "res_ptr": act, "pm_ptr": "*fp32", "cm_ptr": "*fp32", "out_ptr": act,
            "T": "i32", "H": "i32"}


def mix_build(op: str, n: int, dtype: torch.dtype, cfg: Config, h_aligned: bool) -> tuple:
    """(kernel name, signature, constexprs, num_warps, num_stages, h_aligned) of the kernel that
    serves ``op`` with launch config ``cfg``: what :func:`compile_kernel` takes."""
    spec = mix_specialization(op, n, dtype, cfg)
    kname = "chunk_kernel" if cfg.chunk else "mix_kernel"
    return kname, mix_signature(op, dtype), spec, cfg.num_warps, cfg.num_stages, h_aligned


def compile_kernel(kname: str, signature: dict[str, str], constexprs: dict, num_warps: int, num_stages: int,
                   h_aligned: bool, gpu_target):
    """``triton.compile`` of kernel ``kname`` (``module.name``, or a name in ``kernels.py``) for
    ``gpu_target`` (a ``GPUTarget``) with no GPU; returns Triton's compiled kernel, whose
    ``metadata.shared`` is the shared memory (LDS) it needs."""
    mod, _, name = kname.rpartition(".")
    fn = getattr(importlib.import_module(f"mhc.backends.triton.{mod or 'kernels'}"), name)
    sig = {a: t for a, t in signature.items() if a in fn.arg_names}
    constexprs = dict(constexprs)
    # Constexprs left out take their defaults, as at a launch (NORM, NCH: the fused RMSNorm's).
    for p in inspect.signature(fn.fn).parameters.values():
        if p.name not in sig and p.name not in constexprs and p.default is not inspect.Parameter.empty \
                and isinstance(p.annotation, str) and p.annotation.endswith("constexpr"):
            constexprs[p.name] = p.default
    for name in constexprs:
        sig[name] = "constexpr"
    missing = [a for a in fn.arg_names if a not in sig]
    if missing:
        raise KeyError(f"no AOT type for argument(s) {missing} of {kname}")
    # The divisibility facts the JIT sees at run time for these shapes: 16-byte aligned
    # pointers, H a multiple of 16. Without them the builds would not vectorize as the
    # launched kernels do.
    attrs = {(k,): [["tt.divisibility", 16]] for k, a in enumerate(fn.arg_names)
             if sig[a].startswith("*") or (h_aligned and a in ("H", "K"))}
    src = triton.compiler.ASTSource(fn=fn, signature={a: sig[a] for a in fn.arg_names},
                                    constexprs=dict(constexprs), attrs=attrs)
    return triton.compile(src, target=gpu_target,
                          options=dict(num_warps=num_warps, num_stages=num_stages, **COMPILE_OPTIONS))


def compile_mix(op: str, n: int, dtype: torch.dtype, cfg: Config, gpu_target, h_aligned: bool):
    """The compiled kernel that serves ``op`` with launch config ``cfg`` on ``gpu_target``."""
    return compile_kernel(*mix_build(op, n, dtype, cfg, h_aligned), gpu_target=gpu_target)
