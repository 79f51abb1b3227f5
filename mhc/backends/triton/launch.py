"""Launchers for the Triton kernels: flatten nothing (the op layer did), pick a config, allocate,
launch under the input's device. Signatures are those of ``mhc/backends/__init__.py``.

The one launch heuristic is :func:`configs`; :func:`mix_specialization` turns a config into the
kernel's compile-time constants, and both the launchers and ``aot.py`` use it, so what AOT builds
is what runs.
"""

from __future__ import annotations

import dataclasses
import threading

import torch
import triton

from mhc.backends import device_guard, empty
from mhc.backends.triton import kernels

#: True when ``TRITON_INTERPRET=1`` was set before the kernels were defined: they then run on CPU
#: tensors, the GEMM runs in fp32 (the interpreter mishandles bf16 dots) and bf16 rounding is
#: done in integer arithmetic (the interpreter truncates).
INTERPRETED = type(kernels.mix_kernel).__name__ == "InterpretedFunction"


@dataclasses.dataclass(frozen=True)
class Config:
    """Launch parameters of one call.

    ``block_m`` tokens per program (>= 16: the tl.dot minimum); ``block_h`` hidden elements per
    GEMM step (the step covers all n streams); ``splits`` programs per token block, each taking
    ``h_per_split`` hidden elements; ``block_c`` hidden elements per collapse step, ``rowwise`` collapse one token at a time;
    ``num_warps``/``num_stages`` as in Triton. ``post_block_h``/``post_warps``: ``post``'s tile.
    """

    block_m: int
    block_h: int
    splits: int
    h_per_split: int
    block_c: int
    rowwise: bool
    num_warps: int
    num_stages: int
    post_block_h: int
    post_warps: int


# Per T bucket: (max T, block_m, block_h, splits, block_c, rowwise collapse, warps, stages,
# post_block_h, post_warps). Everything compiled depends on the bucket and H only (never on T
# itself), so a model compiles at most four variants per op. Splits: enough programs for the 132
# SMs of an H100 at the bucket's typical T; few per block at large T, where they run together so
# that the block's residual is still in L2 when the last one collapses it. Short blocks (T <= 16)
# collapse row by row with wide tiles. Figures that chose these: TUNING.md.
_TABLE = (
    (16, 16, 64, 128, 2048, True, 4, 1, 256, 1),
    (128, 16, 64, 32, 128, False, 4, 1, 512, 2),
    (1024, 16, 64, 8, 128, False, 4, 1, 1024, 4),
    (None, 64, 64, 4, 64, False, 8, 2, 1024, 4),
)


def configs(n: int, H: int, T: int) -> Config:
    """The launch config for ``n`` streams, hidden size ``H``, ``T`` tokens (any n <= 8, any H)."""
    for max_t, bm, bh, splits, bc, rowwise, warps, stages, pbh, pw in _TABLE:
        if max_t is None or T <= max_t:
            break
    p2 = triton.next_power_of_2(H)
    bh = min(bh, p2)
    h_per_split = triton.cdiv(triton.cdiv(H, splits), bh) * bh
    return Config(bm, bh, triton.cdiv(H, h_per_split), h_per_split, min(bc, p2), rowwise, warps,
                  stages, min(pbh, p2), pw)


def mix_specialization(op: str, n: int, dtype: torch.dtype, cfg: Config) -> dict:
    """Compile-time constants of ``kernels.mix_kernel`` for ``op`` in {"pre", "head",
    "fused_post_pre"}, ``n`` streams, residual ``dtype`` and ``cfg``."""
    head = op == "head"
    n3 = n if head else 2 * n + n * n
    n3p = triton.next_power_of_2(n3 + 1)  # one spare column carries the sum of squares
    sp = triton.next_power_of_2(cfg.splits)
    # The reduction reads [SP, RC] partials per step: 4K fp32 at most, RC divides BM*N3P.
    rc = max(1, min(cfg.block_m * n3p, 4096 // sp))
    return dict(
        N=n, NP=triton.next_power_of_2(n), N3=n3, N3P=n3p,
        HEAD=head, FUSED=op == "fused_post_pre",
        BM=cfg.block_m, BH=cfg.block_h, STEPS=cfg.h_per_split // cfg.block_h, SP=sp, RC=rc, BC=cfg.block_c, ROWWISE=cfg.rowwise,
        DOT_F32=INTERPRETED, EXACT_BF16=dtype == torch.bfloat16,
    )


class _Counters:
    """Per-token-block arrival counters of ``mix_kernel``, one zeroed int32 buffer per (device,
    stream). The kernel leaves them zero, so they are allocated and zeroed once, not per call
    (no memset launch, CUDA-graph capturable); keying by stream keeps concurrent streams apart."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._bufs: dict[tuple, torch.Tensor] = {}

    def get(self, device: torch.device, count: int) -> torch.Tensor:
        stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
        key = (device, stream)
        buf = self._bufs.get(key)
        if buf is None or buf.numel() < count:
            with self._lock:
                buf = self._bufs.get(key)
                if buf is None or buf.numel() < count:
                    buf = torch.zeros(max(count, 4096), dtype=torch.int32, device=device)
                    self._bufs[key] = buf
        return buf


_COUNTERS = _Counters()


def _mix(op, residual, fn, hc_scale, hc_base, scalars, fused_inputs=None):
    T, n, H = residual.shape
    dev = residual.device
    cfg = configs(n, H, T)
    spec = mix_specialization(op, n, residual.dtype, cfg)
    num_m = triton.cdiv(T, cfg.block_m)
    n3p = spec["N3P"]
    out = empty((T, H), residual.dtype, dev)
    if op == "head":
        post_mix = comb_mix = out  # not written: HEAD=True
    else:
        post_mix = empty((T, n, 1), torch.float32, dev)
        comb_mix = empty((T, n, n), torch.float32, dev)
    if fused_inputs is None:
        x = pm_in = cm_in = new = residual  # not read or written: FUSED=False
    else:
        x, pm_in, cm_in = fused_inputs
        new = empty((T, n, H), residual.dtype, dev)
    with device_guard(dev):
        part = torch.empty(num_m * cfg.splits * cfg.block_m * n3p, dtype=torch.float32, device=dev)
        mix = torch.empty(num_m * cfg.block_m * n3p, dtype=torch.float32, device=dev)
        cnt = _COUNTERS.get(dev, num_m)
        kernels.mix_kernel[(num_m, cfg.splits)](
            residual, x, pm_in, cm_in, new, fn, hc_scale, hc_base,
            post_mix, comb_mix, out, part, mix, cnt,
            T, H, cfg.splits, *scalars,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, **spec,
        )
    return out, post_mix, comb_mix, new


def pre(residual, fn, hc_scale, hc_base, rms_eps, hc_pre_eps, hc_sinkhorn_eps,
        hc_post_mult_value, sinkhorn_repeat):
    """mHC ``pre`` (math: ``mhc.reference.pre``).

    ``residual`` (T, n, H) bf16/fp16 contiguous; ``fn`` (2n+n*n, n*H) fp32; ``hc_scale`` (3,)
    fp32; ``hc_base`` (2n+n*n,) fp32; ``sinkhorn_repeat`` int >= 1. Returns ``post_mix``
    (T, n, 1) fp32, ``comb_mix`` (T, n, n) fp32, ``layer_input`` (T, H) in the residual's dtype.
    """
    scalars = (rms_eps, hc_pre_eps, hc_sinkhorn_eps, hc_post_mult_value, int(sinkhorn_repeat))
    out, post_mix, comb_mix, _ = _mix("pre", residual, fn, hc_scale, hc_base, scalars)
    return post_mix, comb_mix, out


def head(residual, fn, hc_scale, hc_base, rms_eps, hc_eps):
    """mHC ``head`` (math: ``mhc.reference.head``).

    ``residual`` (T, n, H) bf16/fp16 contiguous; ``fn`` (n, n*H) fp32; ``hc_scale`` (1,) fp32;
    ``hc_base`` (n,) fp32. Returns (T, H) in the residual's dtype.
    """
    scalars = (rms_eps, hc_eps, 0.0, 0.0, 1)
    return _mix("head", residual, fn, hc_scale, hc_base, scalars)[0]


def fused_post_pre(x, residual, post_mix, comb_mix, fn, hc_scale, hc_base, rms_eps, hc_pre_eps,
                   hc_sinkhorn_eps, hc_post_mult_value, sinkhorn_repeat):
    """``post`` then ``pre`` in one launch (math: ``mhc.reference.fused_post_pre``).

    ``x`` (T, H) and ``residual`` (T, n, H) bf16/fp16; ``post_mix`` (T, n, 1) and ``comb_mix``
    (T, n, n) fp32; the rest as :func:`pre`. Returns ``(new_residual (T, n, H), post_mix (T, n, 1),
    comb_mix (T, n, n), layer_input (T, H))``; the new residual is written once and the GEMM reads
    it from registers, the collapse from L2.
    """
    scalars = (rms_eps, hc_pre_eps, hc_sinkhorn_eps, hc_post_mult_value, int(sinkhorn_repeat))
    out, pm, cm, new = _mix("fused_post_pre", residual, fn, hc_scale, hc_base, scalars,
                            fused_inputs=(x, post_mix, comb_mix))
    return new, pm, cm, out


def post(x, residual, post_mix, comb_mix):
    """mHC ``post`` (math: ``mhc.reference.post``).

    ``x`` (T, H) and ``residual`` (T, n, H) bf16/fp16; ``post_mix`` (T, n, 1), ``comb_mix``
    (T, n, n) fp32. Returns (T, n, H) in the residual's dtype.
    """
    T, n, H = residual.shape
    cfg = configs(n, H, T)
    out = empty((T, n, H), residual.dtype, residual.device)
    with device_guard(residual.device):
        kernels.post_kernel[(T, triton.cdiv(H, cfg.post_block_h))](
            x, residual, post_mix, comb_mix, out, T, H,
            N=n, NP=triton.next_power_of_2(n), BH=cfg.post_block_h, EMULATE_RNE=INTERPRETED,
            num_warps=cfg.post_warps,
        )
    return out
