"""Launchers for the TileLang kernels: configs, the compiled-kernel cache, the four ops.

Imported by ``BACKEND.load()`` only (it imports tilelang through :mod:`.kernels`). The four
functions take flattened, validated, contiguous tensors with T >= 1, exactly as documented in
``mhc/backends/__init__.py``; they allocate with :func:`mhc.backends.empty` on the residual's
device and launch under :func:`mhc.backends.device_guard` on the current stream, with no host
synchronisation (CUDA-graph capturable). Per call they look up a :class:`Plan` (kernel, its
compiled function, config, workspace widths) in :data:`mhc.plans.PLANS` (one dict lookup, keyed
by op, n, H, dtype and device), allocate their outputs, take their workspaces and the zeroed
arrival counters from :mod:`mhc.backends.workspaces` (no memset: the kernel leaves the counters
zero) and call the kernel's compiled function directly (:mod:`.direct`: TileLang's per-call
Python skipped, the launch on the current stream kept). The keyword-only ``_cfg`` of the mix launchers is a
tuning hook (a :class:`~mhc.backends.tilelang.kernels.MixConfig`), not part of the interface.
"""

from __future__ import annotations

import dataclasses
import threading

import torch

from mhc import state
from mhc.backends import device_guard, empty, empty_like
from mhc.backends.tilelang import direct as D
from mhc.backends.tilelang import kernels as K
from mhc.backends.workspaces import WORKSPACES
from mhc.plans import PLANS

__all__ = ["KERNELS", "Plan", "cuda_arch", "post_config", "mix_config", "get_kernel", "plan_for", "target_for", "pre",
           "post", "head", "fused_post_pre"]

_DTYPES = {torch.bfloat16: "bfloat16"}


def post_config(n: int, H: int) -> K.PostConfig:
    """``post``: 1024 columns per CTA (128 threads x 8 bf16); narrower for small H so that few
    threads idle. Measured on the H100: docs/tuning/tilelang.md."""
    bh = 1024
    while bh > 64 and bh // 2 >= H:
        bh //= 2
    return K.PostConfig(BH=bh)


def mix_config(mode: str, n: int, H: int, num_sms: int) -> K.MixConfig:
    """``pre``/``head``/``fused``: 64 tokens x 128 columns per CTA (64 for n > 4, where the tile
    and the hi/lo weight slice would not fit twice per SM). The number of column slices
    S = ceil(H / HC) must not exceed the SM count: the S CTAs of a token block wait for each
    other, so they must be able to be resident together. HC doubles until that holds."""
    hc = 128 if n <= 4 else 64
    while -(-H // hc) > num_sms:
        hc *= 2
    # fused holds x, n residual streams and the new residual in registers: at 2 CTAs/SM ptxas
    # spills ~430 B/thread, so it keeps 1 (registers, 253) while pre/head fit 2 (125 registers).
    return K.MixConfig(BM=64, HC=hc, threads=256, min_blocks=1 if mode == "fused" else 2)


class _KernelCache:
    """Every compiled kernel of this process, keyed ``(op, n, H, dtype, config, target)``.

    One place, one lock: compiled on first use (or loaded from TileLang's disk cache under
    ``TILELANG_CACHE_DIR``, which ``aot.py`` fills ahead of time).
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.kernels: dict[tuple, object] = {}
        self.num_sms: dict[torch.device, int] = {}
        self.targets: dict[torch.device, dict] = {}

    def get(self, key: tuple, target: dict, build):
        k = self.kernels.get(key)
        if k is None:
            with self.lock:
                k = self.kernels.get(key)
                if k is None:
                    k = K.compile_kernel(build(), target)
                    self.kernels[key] = k
        return k

    def clear(self) -> None:
        """Forget the compiled kernels (TileLang's disk cache keeps them), SM counts and targets."""
        with self.lock:
            self.kernels.clear()
            self.num_sms.clear()
            self.targets.clear()


KERNELS = state.register("tilelang.kernels", _KernelCache(), "op, n, H, dtype, config, target; device")

#: Workspace layouts (:meth:`Plan.layout`), so that a call builds no tuples for them.
_LAYOUTS: dict[tuple, tuple] = state.register("tilelang.layouts", {}, "slices, row width, token blocks")


def cuda_arch(major: int, minor: int) -> str:
    """TileLang's arch token: ``sm_90a`` on Hopper (and ``sm_100a`` ... after it). The ``a``
    matters: TileLang emits wgmma for any 9.x target, and a plain ``sm_90`` build of that code
    traps at run time ("wgmma.fence without CUTE_ARCH_MMA_SM90A_ENABLED")."""
    return f"sm_{major}{minor}" + ("a" if major >= 9 else "")


def target_for(device: torch.device) -> dict:
    """The TileLang target for a device: ``{"kind": "cuda", "arch": "sm_90a"}`` on an H100."""
    t = KERNELS.targets.get(device)
    if t is None:
        props = torch.cuda.get_device_properties(device)
        t = {"kind": "cuda", "arch": cuda_arch(props.major, props.minor)}
        KERNELS.targets[device] = t
        KERNELS.num_sms[device] = props.multi_processor_count
    return t


def _target_key(target: dict) -> tuple:
    return tuple(sorted(target.items()))


def get_kernel(op: str, n: int, H: int, dtype: str, target: dict, num_sms: int, cfg=None):
    """The compiled kernel for ``op`` in post/pre/head/fused and its config (``cfg`` overrides
    the heuristic: benchmarks/tilelang_dev.py sweeps with it)."""
    if op == "post":
        cfg = cfg or post_config(n, H)
        build = lambda: K.build_post(n, H, cfg, dtype)  # noqa: E731
    else:
        cfg = cfg or mix_config(op, n, H, num_sms)
        build = lambda: K.build_mix(op, n, H, cfg, dtype)  # noqa: E731
    return KERNELS.get((op, n, H, dtype, cfg, _target_key(target)), target, build), cfg


@dataclasses.dataclass(frozen=True)
class Plan:
    """What a launcher needs for one (op, n, H, dtype, device), kept in :data:`mhc.plans.PLANS`:
    the compiled kernel, what a launch calls (``call``: the kernel's compiled function, see
    :mod:`.direct`), its config, and for the mix kernels the workspace's row width ``e`` (floats
    per token block and slice), the column slices ``splits`` and the tokens per block ``bm``.
    Nothing in it depends on T or on tensor values."""

    kernel: object
    cfg: object
    call: object = None
    e: int = 0
    splits: int = 0
    bm: int = 0

    def layout(self, nb: int) -> tuple:
        """The workspace layout for ``nb`` token blocks: partials (nb, S, e) and reduced partials
        (nb, e) fp32 (every element written before it is read), kept in :data:`_LAYOUTS`. The
        arrival counters are not in it: they come from the pool's counters (:func:`_workspace`)."""
        key = (self.splits, self.e, nb)
        lay = _LAYOUTS.get(key)
        if lay is None:
            lay = _LAYOUTS.setdefault(key, (((nb, self.splits, self.e), torch.float32), ((nb, self.e), torch.float32)))
        return lay


def _plan(kern, cfg, op: str, n: int, H: int) -> Plan:
    # The compiled function (mhc.backends.tilelang.direct); TileLang's own call path where the
    # direct path is off, for stand-ins in the CPU tests (not a TileLang kernel), and where a
    # TileLang other than the tested one no longer matches what the direct path relies on
    # (tests/test_tilelang_direct.py fails then: slower, never wrong).
    call = kern
    if D.ENABLED and D.is_tilelang_kernel(kern):
        try:
            call = D.compiled_function(kern)
        except (TypeError, AttributeError):
            pass
    if op == "post":
        return Plan(kern, cfg, call)
    m = K.mix_width(op, n)
    return Plan(kern, cfg, call, cfg.BM * (-(-(m + 1) // 4) * 4), cfg.splits(H), cfg.BM)


def plan_for(op: str, n: int, H: int, dtype: torch.dtype, device: torch.device) -> Plan:
    """The :class:`Plan` of ``op`` in post/pre/head/fused on ``device``: a dict lookup once built."""

    def build():
        target = target_for(device)
        kern, cfg = get_kernel(op, n, H, _DTYPES[dtype], target, KERNELS.num_sms[device])
        return _plan(kern, cfg, op, n, H)

    return PLANS.get(("tilelang", op, n, H, dtype, device), build)


def _workspace(p: Plan, T: int, device: torch.device):
    """``(ticket, parts, fin, flags)``: partials (NB, S, e) and reduced partials (NB, e) fp32,
    uninitialised (every element is written before it is read), and the arrival counters, a flat
    int32 buffer of at least 2 * NB elements (block b counts at 2b and 2b + 1), zero: the kernel
    leaves them zero, so they come from the pool's counters, zeroed once, with no memset per call.
    Pooled per device and stream, a CUDA graph's capture getting its own
    (:mod:`mhc.backends.workspaces`); hand the ticket back after the launch."""
    nb = -(-T // p.bm)
    ticket, (flags, parts, fin) = WORKSPACES.take(device, p.layout(nb), nb + nb)
    return ticket, parts, fin, flags


def _mix_plan(op: str, residual: torch.Tensor, cfg) -> Plan:
    """The plan for a tuning override ``cfg`` (benchmarks/tilelang_dev.py sweeps with it):
    compiled through the same kernel cache, kept in :data:`mhc.plans.PLANS` under a key that
    names the config."""
    T, n, H = residual.shape
    dev, dtype = residual.device, residual.dtype

    def build():
        target = target_for(dev)
        kern, c = get_kernel(op, n, H, _DTYPES[dtype], target, KERNELS.num_sms[dev], cfg)
        return _plan(kern, c, op, n, H)

    return PLANS.get(("tilelang", op, n, H, dtype, dev, cfg), build)


def post(x, residual, post_mix, comb_mix):
    """``x`` (T, H), ``residual`` (T, n, H) bf16; ``post_mix`` (T, n, 1), ``comb_mix`` (T, n, n)
    fp32. Returns the new residual (T, n, H) bf16."""
    T, n, H = residual.shape
    dev = residual.device
    p = plan_for("post", n, H, residual.dtype, dev)
    out = empty_like(residual)
    with device_guard(dev):
        p.call(x, residual, post_mix, comb_mix, out)
    return out


# The mix launchers pass the scalars as they come (Python floats and an int from the op layer):
# the compiled function converts them (it takes a float, an int or a bool for a float parameter).


def pre(residual, fn, hc_scale, hc_base, rms_eps, hc_pre_eps, hc_sinkhorn_eps, hc_post_mult_value,
        sinkhorn_repeat, *, _cfg=None):
    """``residual`` (T, n, H) bf16, ``fn`` (2n+n*n, n*H), ``hc_scale`` (3,), ``hc_base`` (2n+n*n,)
    fp32. Returns ``post_mix`` (T, n, 1), ``comb_mix`` (T, n, n) fp32, ``layer_input`` (T, H)."""
    T, n, H = residual.shape
    dev = residual.device
    p = plan_for("pre", n, H, residual.dtype, dev) if _cfg is None else _mix_plan("pre", residual, _cfg)
    post_mix = empty((T, n, 1), torch.float32, dev)
    comb_mix = empty((T, n, n), torch.float32, dev)
    layer_input = empty((T, H), residual.dtype, dev)
    with device_guard(dev):
        ticket, parts, fin, flags = _workspace(p, T, dev)
        p.call(residual, fn, hc_scale, hc_base, post_mix, comb_mix, layer_input, parts, fin, flags,
               rms_eps, hc_pre_eps, hc_sinkhorn_eps, hc_post_mult_value, sinkhorn_repeat)
        WORKSPACES.put(ticket)
    return post_mix, comb_mix, layer_input


def head(residual, fn, hc_scale, hc_base, rms_eps, hc_eps, *, _cfg=None):
    """``residual`` (T, n, H) bf16, ``fn`` (n, n*H), ``hc_scale`` (1,), ``hc_base`` (n,) fp32.
    Returns (T, H) bf16."""
    T, n, H = residual.shape
    dev = residual.device
    p = plan_for("head", n, H, residual.dtype, dev) if _cfg is None else _mix_plan("head", residual, _cfg)
    out = empty((T, H), residual.dtype, dev)
    with device_guard(dev):
        ticket, parts, fin, flags = _workspace(p, T, dev)
        p.call(residual, fn, hc_scale, hc_base, out, parts, fin, flags, rms_eps, hc_eps)
        WORKSPACES.put(ticket)
    return out


def fused_post_pre(x, residual, post_mix, comb_mix, fn, hc_scale, hc_base, rms_eps, hc_pre_eps,
                   hc_sinkhorn_eps, hc_post_mult_value, sinkhorn_repeat, *, _cfg=None):
    """``post`` then ``pre`` in one kernel; the new residual is written once, never re-read.
    Returns ``(new_residual (T, n, H), post_mix (T, n, 1), comb_mix (T, n, n), layer_input (T, H))``."""
    T, n, H = residual.shape
    dev = residual.device
    p = plan_for("fused", n, H, residual.dtype, dev) if _cfg is None else _mix_plan("fused", residual, _cfg)
    new, pm, cm = empty_like(residual), empty_like(post_mix), empty_like(comb_mix)
    li = empty((T, H), residual.dtype, dev)
    with device_guard(dev):
        ticket, parts, fin, flags = _workspace(p, T, dev)
        p.call(x, residual, post_mix, comb_mix, fn, hc_scale, hc_base, new, pm, cm, li, parts, fin, flags,
               rms_eps, hc_pre_eps, hc_sinkhorn_eps, hc_post_mult_value, sinkhorn_repeat)
        WORKSPACES.put(ticket)
    return new, pm, cm, li
