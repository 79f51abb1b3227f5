"""The TileLang backend (``pip install tilelang==0.1.15``): ``pre``, ``post``, ``head``,
``fused_post_pre`` on NVIDIA GPUs (sm_80+), bf16 residuals, any n in 1..8, any H.

ROCm is refused with a reason: the kernels use CUDA-only intrinsics (``__nanosleep`` in the
cross-CTA wait) and were never run on AMD; AITER and Triton serve ROCm. They use no PDL, so
the "PDL is not supported" failure vLLM hit on ROCm does not apply.

Importing this module imports only torch: ``import tilelang`` rewrites ``os.environ`` and
``PYTHONPATH`` and imports tvm and z3, so it happens in :func:`_load` on first use.

Kernel cache: compiled kernels live in one process-wide table
(``mhc.backends.tilelang.launch.KERNELS``, keyed by op, n, H, dtype, launch config and target)
and in TileLang's disk cache: ``TILELANG_CACHE_DIR`` if the user set it, else
:func:`cache_dir`'s default, ``$XDG_CACHE_HOME/mhc/tilelang`` when ``XDG_CACHE_HOME`` is set,
else ``<tempdir>/mhc-tilelang-<uid>`` — never silently under $HOME (TileLang's own default is
``~/.tilelang/cache``). The default is handed to TileLang through its own setting
(``tilelang.env.TILELANG_CACHE_DIR``) when a kernel is compiled (``kernels.compile_kernel``);
``os.environ`` is never written, so child processes see the user's environment unchanged.

Layout of this package: ``kernels.py`` (the TileLang programs), ``launch.py`` (configs, cache,
launchers), ``aot.py`` (ahead-of-time compilation for CI), ``DESIGN.md`` (the design in short; the
figures and what was tried: ``docs/tuning/tilelang.md`` in the repository).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile

import torch

from mhc.registry import CAUGHT, Backend, Capabilities, Problem

__all__ = ["BACKEND", "TESTED_VERSION", "cache_dir", "find_compiler"]

TESTED_VERSION = "0.1.15"
#: Lowest compute capability served: the kernels use bf16 MMA (sm_80+); sm_90 gets wgmma.
MIN_CAPABILITY = (8, 0)


def _default_cache_dir() -> str:
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return os.path.join(xdg, "mhc", "tilelang")
    user = os.getuid() if hasattr(os, "getuid") else "user"
    return os.path.join(tempfile.gettempdir(), f"mhc-tilelang-{user}")


def cache_dir() -> str:
    """TileLang's disk cache directory: ``TILELANG_CACHE_DIR`` if set, else the default of the
    module docstring (which ``kernels.compile_kernel`` hands to TileLang). Writes nothing."""
    return os.environ.get("TILELANG_CACHE_DIR") or _default_cache_dir()


def find_compiler() -> str | None:
    """Path of nvcc as TileLang finds it (CUDA_HOME, CUDA_PATH, PATH, /usr/local/cuda), or None."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and os.path.isfile(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    return "/usr/local/cuda/bin/nvcc" if os.path.isfile("/usr/local/cuda/bin/nvcc") else None


def _installed_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("tilelang")
    except CAUGHT:
        return None


def _probe(p: Problem) -> list[str]:
    why = []
    if importlib.util.find_spec("tilelang") is None:
        why.append(f"tilelang is not installed (pip install tilelang=={TESTED_VERSION})")
    if p.device.type != "cuda" or torch.version.hip:
        why.append(f"needs an NVIDIA GPU tensor, got {p.device}")
        return why
    if find_compiler() is None:
        why.append("no nvcc found (set CUDA_HOME); TileLang compiles its kernels with it")
    try:
        cap = torch.cuda.get_device_capability(p.device)
    except CAUGHT as e:  # no driver, bad ordinal
        why.append(f"cannot query {p.device}: {type(e).__name__}: {e}")
        return why
    if cap < MIN_CAPABILITY:
        why.append(f"needs compute capability {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}+ "
                   f"(bf16 tensor cores); {p.device} is sm_{cap[0]}{cap[1]}")
    return why


def _notes() -> list[str]:
    v = _installed_version()
    d = os.environ.get("TILELANG_CACHE_DIR")
    out = [f"kernel cache: {d}" if d else f"kernel cache: {_default_cache_dir()} (TILELANG_CACHE_DIR unset)"]
    if v and v != TESTED_VERSION:
        out.append(f"tilelang {v} is installed; the kernels were written and tested for {TESTED_VERSION}")
    return out


def _load():
    from mhc.backends.tilelang import launch

    return launch


BACKEND = Backend(
    name="tilelang",
    distribution="tilelang",
    capabilities=Capabilities(
        device_types=frozenset({"cuda"}),
        dtypes=frozenset({torch.bfloat16}),
        platforms=frozenset({"cuda"}),
    ),
    load=_load,
    probe=_probe,
    notes=_notes,
)
