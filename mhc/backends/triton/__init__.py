"""The Triton backend: ``pre``, ``post``, ``head`` and ``fused_post_pre`` as Triton kernels.

One source for NVIDIA and AMD GPUs (no vendor intrinsics); CPU tensors run through the Triton
interpreter when ``TRITON_INTERPRET=1`` is set before the kernels load (a test tool, slow).
Nothing here imports triton at module import: :func:`_probe` and :func:`_load` do.

Files: ``kernels.py`` (the ``@triton.jit`` kernels), ``launch.py`` (launchers and the config
table), ``backward.py`` (the backward kernels and their launchers), ``aot.py`` (ahead-of-time
builds for sm90/gfx942/gfx950), ``DESIGN.md`` (the design in short; the figures behind the
configs: ``docs/tuning/triton.md`` in the repository).
"""

from __future__ import annotations

import os
import sys

import torch

from mhc.registry import BACKWARD_OPS, CAUGHT, OPS, Backend, Capabilities, Problem

_KERNELS = "mhc.backends.triton.launch"

#: Largest H for which the Triton kernels fuse the RMSNorm (``norm_weight``): a collapse program
#: holds its token's whole row in fp32 registers (at 4 warps, H / 128 values a thread on NVIDIA:
#: 64 at 8192), so that the residual is read once from memory and the norm sees the unrounded
#: sum; larger H would spill. DeepSeek-V4's 4096 and 7168 fit. Above it: a reason.
NORM_MAX_H = 8192


def _interpreted() -> bool:
    """Whether the kernels are (or, if not loaded yet, will be) defined for the interpreter."""
    mod = sys.modules.get(_KERNELS)
    if mod is not None:
        return mod.INTERPRETED
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _probe(p: Problem) -> list[str]:
    if p.norm and p.H > NORM_MAX_H:
        return [f"fuses the RMSNorm (norm_weight) only up to H = {NORM_MAX_H} (a token's row is held in "
                f"registers), got H = {p.H}"]
    try:
        import triton  # noqa: F401
    except CAUGHT as e:  # a broken install is a reason, not a crash (a sys.exit() in it too)
        return [f"triton is not installed or fails to import ({type(e).__name__}: {e})"]
    if p.device.type == "cpu":
        if not _interpreted():
            return ["CPU tensors need TRITON_INTERPRET=1 (the Triton interpreter: a test tool, "
                    "slow), set before the kernels load"]
        return []
    if _interpreted():
        return ["TRITON_INTERPRET=1 is set: the kernels were defined for the interpreter, which "
                "would run GPU tensors on the CPU"]
    try:
        import triton

        target = triton.runtime.driver.active.get_current_target()
    except CAUGHT as e:
        return [f"Triton finds no GPU driver ({type(e).__name__}: {e})"]
    if target.backend not in ("cuda", "hip"):
        return [f"Triton's active driver is {target.backend!r}, not cuda or hip"]
    return []


def _load():
    import types

    from mhc.backends.triton import backward, launch

    # Forward launchers from launch.py, backward launchers (mhc.autograd calls them) from backward.py.
    return types.SimpleNamespace(**{op: getattr(launch, op) for op in OPS},
                                 **{op: getattr(backward, op) for op in BACKWARD_OPS})


BACKEND = Backend(
    name="triton",
    distribution="triton",
    capabilities=Capabilities(
        device_types=frozenset({"cuda", "cpu"}),
        dtypes=frozenset({torch.bfloat16, torch.float16}),
        ops=frozenset(OPS + BACKWARD_OPS),
        norm_ops=frozenset({"pre", "fused_post_pre", "pre_backward", "fused_post_pre_backward"}),
    ),
    load=_load,
    probe=_probe,
)
