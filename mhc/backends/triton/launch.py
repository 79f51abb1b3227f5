"""Launchers for the Triton kernels: flatten nothing (the op layer did), pick a config, allocate,
launch under the input's device. Signatures are those of ``mhc/backends/__init__.py``.

The configuration is :mod:`.configs`' (one table, then fitting): :func:`~.configs.configs` at
T <= ``SMALL_T`` (the latency-bound single-launch and chunked kernels), :func:`~.configs.plan`
above (the two-pass path), :func:`~.configs.post_config` for ``post``; :mod:`.build` turns a
config into the kernels' compile-time constants. ``aot.py`` builds from the same functions, so
what AOT builds is what runs. Here only what needs the device: its shared memory
(:func:`device_shared_memory`) and, on a GPU, the K tile checked against the compiled kernel's
real size (:func:`device_config`).

Per call, a launcher looks up its launch plan (:func:`plan_for`: config, tiles, the kernels as
:class:`~mhc.backends.triton.direct.DirectKernel` handles; built once per op, n, H,
:func:`mhc.plans.t_bucket`, dtype and device, kept in :data:`mhc.plans.PLANS`), allocates its
outputs and takes its scratch buffers (counters, partials, fn's hi/lo rows) from
:mod:`mhc.backends.workspaces` and launches: no heuristic runs and no kernel argument is
re-specialised by Triton on a warm call.
"""

from __future__ import annotations

import dataclasses
import warnings

import torch
import triton

from mhc import state
from mhc.backends import device_guard, empty, empty_like
from mhc.backends.triton import NORM_MAX_H, build, kernels  # noqa: F401 (NORM_MAX_H: the docstrings' limit)
from mhc.backends.triton.build import COMPILE_OPTIONS, INTERPRETED, mix_specialization, post_specialization
from mhc.backends.triton.configs import (SHARED_MEMORY, SMALL_T, Config, PostConfig, SharedMemory, TwoPass, configs,
                                         mix_columns, norm_chunks, plan, post_config, prep_block)
from mhc.backends.triton.direct import DirectKernel, int_spec
from mhc.backends.workspaces import WORKSPACES
from mhc.plans import PLANS, t_bucket

#: The shared memory of each GPU this process launched on, from the driver once per device.
_DEVICE_SHARED: dict[int, SharedMemory] = state.register("triton.device_shared", {}, "device index")


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


#: Configs whose K tile was fitted to the compiled kernel's shared memory (:func:`device_config`).
_FITTED: dict[tuple, Config] = state.register("triton.fitted", {},
                                              "device index, op, n, dtype, H % 16 == 0, estimated config")


def device_config(op: str, n: int, H: int, T: int, dtype: torch.dtype, device: torch.device,
                  norm: bool = False) -> Config:
    """:func:`configs` for a launch on ``device``, with its shared memory. On a GPU, the K tile is
    checked against the compiled kernel's real shared memory (:func:`.build.compile_mix` for the
    device's target reads ``metadata.shared``; Triton itself checks it only when it loads the
    kernel, and its needs change between releases) and halved while it does not fit. That costs one extra compile per config on its first use in a
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
        with torch.cuda.device(device):
            target = triton.runtime.driver.active.get_current_target()

        def measure(c: Config) -> int:
            return build.compile_mix(op, n, dtype, c, target, H % 16 == 0).metadata.shared

        try:
            got = configs(n, H, T, op, smem, measure=measure, norm=norm)
        except Exception as e:
            warnings.warn(f"mhc triton: could not measure the shared memory of the {op} kernel for n={n}, H={H} "
                          f"({type(e).__name__}: {e}); using the estimated tiles", RuntimeWarning, stacklevel=3)
            got = cfg
        _FITTED[key] = got
    return got


def _flat(numel: int, dtype: torch.dtype) -> tuple:
    """A workspace layout of one flat buffer of at least ``numel`` elements, rounded up to a power
    of two so that calls of nearby T share a pooled buffer (``mhc.backends.workspaces``)."""
    return ((1 << max(0, numel - 1).bit_length(),), dtype),  # not triton.next_power_of_2: slow from Python


# --- launch plans (mhc.plans.PLANS, keyed ("triton", op, n, H, t_bucket(T), dtype, device)) -------


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)  # triton.cdiv is a constexpr function: slow to call from Python


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


def _post_plan(n: int, H: int, T: int, smem: SharedMemory | None = None) -> PostPlan:
    cfg = post_config(H, T, smem)
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
                   norm: bool = False, smem: SharedMemory | None = None) -> TwoPassPlan:
    K = n * H
    head = op == "head"
    n3, n3p = mix_columns(op, n, tp.min_cols)
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
    post = _post_plan(n, H, T, smem) if op == "fused_post_pre" else None
    return TwoPassPlan(tp, n3, n3p, splits, norm, prep, (_cdiv(K, bk), 1, 1) if bk else (), prenorm, finalize, post)


def _build(op: str, n: int, H: int, T: int, dtype: torch.dtype, device: torch.device, norm: bool):
    smem = device_shared_memory(device)
    if op == "post":
        return _post_plan(n, H, T, smem)
    if T <= SMALL_T:
        return _small_plan(op, n, H, T, dtype, device, norm)
    return _two_pass_plan(op, plan(op, n, H, T, smem), n, H, T, dtype, norm, smem)


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
        hc_post_mult_value, sinkhorn_repeat, norm_weight=None, norm_eps=None):
    """mHC ``pre`` (math: ``mhc.reference.pre``).

    ``residual`` (T, n, H) bf16/fp16 contiguous; ``fn`` (2n+n*n, n*H) fp32; ``hc_scale`` (3,)
    fp32; ``hc_base`` (2n+n*n,) fp32; ``sinkhorn_repeat`` int >= 1; ``norm_weight`` None or (H,)
    in the residual's dtype or fp32, H <= ``NORM_MAX_H`` (the fused RMSNorm), with its ``norm_eps``
    (the op layer passes both, or neither). Returns
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
                   hc_sinkhorn_eps, hc_post_mult_value, sinkhorn_repeat, norm_weight=None, norm_eps=None):
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
