"""mhc: GPU kernels for mHC (Manifold-Constrained Hyper-Connections) with interchangeable backends.

Public API: :func:`pre`, :func:`post`, :func:`head`, :func:`fused_post_pre` (also reachable as
``torch.ops.mhc.<op>``), backend selection with :func:`use_backend`, the ``MHC_BACKEND``
environment variable or ``backend=``, and :func:`explain`. Importing ``mhc`` imports torch and
nothing optional: triton, tilelang and aiter load on first use of their backend.
"""

from __future__ import annotations

import math
import re

import torch

from mhc import ops as _ops  # registers torch.ops.mhc.*
from mhc import autograd as _autograd  # registers torch.ops.mhc.*_backward and the ops' autograd
from mhc import reference, registry, validation
from mhc.reference import DEFAULTS as _D
from mhc.registry import Backend, BackendError, Capabilities, Explanation, Problem, register, use_backend

__version__ = "0.1.0"

__all__ = [
    "pre",
    "post",
    "head",
    "fused_post_pre",
    "use_backend",
    "explain",
    "list_backends",
    "register",
    "Backend",
    "BackendError",
    "Capabilities",
    "Explanation",
    "Problem",
    "reference",
]

_BACKEND_DOC = """
    backend: ``None`` follows :func:`mhc.use_backend` / ``MHC_BACKEND`` / auto; a backend name
        (or ``"auto"``) forces it. A named backend that cannot serve raises
        :class:`mhc.BackendError` listing why. Bad inputs raise ``TypeError``/``ValueError``.
    """

_BELOW_AUTOGRAD = torch._C._AutoDispatchBelowADInplaceOrView


def _type_error(op, msg: str) -> str:
    """The dispatcher's argument-type error in one line: ``residual must be Tensor, got list``.
    Its own message repeats the value (170 KB for a list the size of an 8 x 4 x 512 residual)."""
    m = re.search(r"[Ee]xpected a value of type '([^']*)' for argument '(\w+)' but instead found type '([^']*)'",
                  msg)
    if m:
        return f"mhc.{op._schema.name.split('::')[-1]}: {m[2]} must be {m[1]}, got {m[3]}"
    return msg.split("\nValue:")[0].split("\nCast error")[0][:500]


def _typed(op, n_tensors: int, also: tuple[int, ...] = ()):
    """``op`` for the public wrappers' general path (the calls their fast path refuses): the dispatcher's argument-type errors (a RuntimeError naming
    the argument) re-raised as a one-line ``TypeError``, sparse and nested tensors refused with a
    ``TypeError`` naming the argument, ``backend`` checked (None or a non-empty str: the dispatcher
    would take ``b"torch"`` as a str and ``""`` as no choice), and the autograd layer skipped when
    no gradient can flow.

    ``torch.library.register_autograd`` puts a Python autograd kernel in front of every call,
    which redispatches in Python even when nothing requires grad: ~20 µs a call instead of ~13 on
    CPU (``python benchmarks/bench.py --overhead``). When grad mode is off or none of the first
    ``n_tensors`` (tensor) arguments requires grad, the call goes below autograd directly, as
    PyTorch's own C++ ops do, and where :func:`mhc.ops.direct_ok` finds that the dispatcher would
    only box the arguments and call the op's kernel (plain dense tensors, no mode, transform,
    autocast or profiler), it calls that kernel itself. When a gradient can flow, the call goes through
    ``mhc.autograd.EAGER_FUNCTIONS`` (the op's backward, without ``register_autograd``'s
    per-call cost). Under ``torch.compile`` the plain op is traced. ``also``: positions of
    optional tensor arguments after the first ``n_tensors`` (``norm_weight``) that count too."""

    names = [a.name for a in op._schema.arguments]
    name = op._schema.name.split("::")[-1]
    recorded = _autograd.EAGER_FUNCTIONS[name].apply
    direct, tensors, scalars = _ops.DIRECT[name]

    def call(*args, **kwargs):
        b = kwargs.get("backend")
        if b is not None and (b.__class__ is not str or not b):
            validation.check_backend(b)
        try:
            if not torch.compiler.is_compiling():
                needs = False
                if torch.is_grad_enabled():
                    for t in args[:n_tensors]:
                        if isinstance(t, torch.Tensor) and t.requires_grad:
                            needs = True
                            break
                    for i in also:
                        if len(args) > i and isinstance(args[i], torch.Tensor) and args[i].requires_grad:
                            needs = True
                if not needs:
                    if _ops.direct_ok(args, tensors, scalars):  # the op's kernel, as the dispatcher would call it
                        return direct(*args, **kwargs)
                    with _BELOW_AUTOGRAD():
                        return op(*args, **kwargs)
                if kwargs.keys() <= {"backend"}:
                    return recorded(*args, kwargs.get("backend"))
            return op(*args, **kwargs)
        except NotImplementedError:  # (a RuntimeError) a nested tensor's subclass: say which argument
            err = validation.non_dense(names, args, kwargs)
            if err is not None:
                raise err from None
            raise
        except RuntimeError as e:
            if "xpected a value of type" in str(e):
                raise TypeError(_type_error(op, str(e))) from None
            raise

    return call


_PRE, _POST, _HEAD, _FUSED = (torch.ops.mhc.pre.default, torch.ops.mhc.post.default, torch.ops.mhc.head.default,
                               torch.ops.mhc.fused_post_pre.default)
_pre_op = _typed(torch.ops.mhc.pre.default, 4, also=(9,))  # 9: norm_weight
_post_op = _typed(torch.ops.mhc.post.default, 4)
_head_op = _typed(torch.ops.mhc.head.default, 4)
_fused_op = _typed(torch.ops.mhc.fused_post_pre.default, 7, also=(12,))  # 12: norm_weight


# --- the fast path ---------------------------------------------------------------------------
# Each public function first tries, in one expression, whether the call is the usual one: nothing
# compiling (checked first, so that Dynamo never traces the C queries after it; under Dynamo it is
# True and the wrapper below is traced as before), no mode, transform, autocast region or profiler,
# plain dense non-meta tensors (as ``mhc.ops.direct_ok``), exact float/int scalars and every
# validation passing (``mhc.validation``'s checks, as their hot paths do them). Then it chooses
# the backend and runs it (``mhc.ops.run_*``), or records the call with
# ``mhc.autograd.FAST_APPLY`` where a gradient can flow. Anything else, including every call that
# fails a check, goes to the general path (``_typed``), which finds the argument to name.
# Each attribute read and call costs ~50-150 ns on CPU and the per-call budget is a few µs, so the
# per-tensor tests are inlined; what the ops share beyond them (the context, pre's scalars, the
# norm weight) is one helper call each. The layers this replaces cost ~9 µs a call on CPU with a
# kernel that does nothing (``python benchmarks/bench.py --overhead``).

_T, _P, _S, _INF = torch.Tensor, torch.nn.Parameter, torch.strided, math.inf
_MAX_N, _MAX_REPEAT, _MIX = validation.MAX_N, validation.MAX_SINKHORN_REPEAT, validation.MIX_DTYPES
_is_compiling = torch.compiler.is_compiling
_grad_enabled = torch.is_grad_enabled
_dispatch_modes, _function_modes, _autocast, _profiling, _functorch_level = (
    _ops._dispatch_modes, _ops._function_modes, _ops._autocast, _ops._profiling, _ops._functorch_level)
_unwrap_if_dead = torch._C._functorch.unwrap_if_dead  # as Function.apply does
_select = registry.select
_run_pre, _run_post, _run_head, _run_fused = _ops.run_pre, _ops.run_post, _ops.run_head, _ops.run_fused
_PRE_APPLY, _POST_APPLY, _HEAD_APPLY, _FUSED_APPLY = (_autograd.FAST_APPLY[op]
                                                      for op in ("pre", "post", "head", "fused_post_pre"))


def _plain_context() -> bool:
    """No dispatch or function mode, autocast region, profiler or functorch transform is active:
    the fast path's condition on the call's context (the same for every op)."""
    return not (_dispatch_modes() or _function_modes() or _autocast() or _profiling()) and _functorch_level() is None


def _pre_scalars_ok(rms_eps, hc_pre_eps, hc_sinkhorn_eps, hc_post_mult_value, sinkhorn_repeat, norm_eps) -> bool:
    """``pre``'s scalars (and ``fused_post_pre``'s) as ``validation.check_pre`` accepts them, as
    exact Python floats and an int (anything else takes the general path)."""
    return (sinkhorn_repeat.__class__ is int and 1 <= sinkhorn_repeat <= _MAX_REPEAT
            and rms_eps.__class__ is float and 0.0 <= rms_eps < _INF
            and hc_pre_eps.__class__ is float and 0.0 <= hc_pre_eps < _INF
            and hc_sinkhorn_eps.__class__ is float and 0.0 <= hc_sinkhorn_eps < _INF
            and hc_post_mult_value.__class__ is float and -_INF < hc_post_mult_value < _INF
            and norm_eps.__class__ is float and 0.0 <= norm_eps < _INF)


def _norm_weight_ok(norm_weight, H: int, dt: torch.dtype, mdt: torch.dtype, dev: torch.device) -> bool:
    """A norm weight the fused RMSNorm accepts (``validation.check_norm``): a plain dense (H,)
    tensor in the residual's dtype ``dt`` or the mix dtype ``mdt``, on ``dev``."""
    return ((norm_weight.__class__ is _P or norm_weight.__class__ is _T) and norm_weight.layout is _S
            and not norm_weight.is_nested and norm_weight.shape == (H,)
            and (norm_weight.dtype is dt or norm_weight.dtype is mdt) and norm_weight.device == dev)


def _retyped(op, e: RuntimeError) -> Exception:
    """What the general path raises for ``e``: the dispatcher's argument-type error as a
    ``TypeError`` (see :func:`_typed`), anything else as it is."""
    return TypeError(_type_error(op, str(e))) if "xpected a value of type" in str(e) else e


def pre(residual, fn, hc_scale, hc_base, rms_eps=_D["rms_eps"], hc_pre_eps=_D["hc_pre_eps"],
        hc_sinkhorn_eps=_D["hc_sinkhorn_eps"], hc_post_mult_value=_D["hc_post_mult_value"],
        sinkhorn_repeat=_D["sinkhorn_repeat"], norm_weight=None, norm_eps=_D["norm_eps"], *, backend=None):
    if (not _is_compiling()
            and (residual.__class__ is _T or residual.__class__ is _P) and (fn.__class__ is _P or fn.__class__ is _T)
            and (hc_scale.__class__ is _P or hc_scale.__class__ is _T)
            and (hc_base.__class__ is _P or hc_base.__class__ is _T)
            and _plain_context()
            and residual.layout is _S and fn.layout is _S and hc_scale.layout is _S and hc_base.layout is _S
            and not (residual.is_nested or fn.is_nested or hc_scale.is_nested or hc_base.is_nested or residual.is_meta)
            and _pre_scalars_ok(rms_eps, hc_pre_eps, hc_sinkhorn_eps, hc_post_mult_value, sinkhorn_repeat, norm_eps)
            and (backend is None or (backend.__class__ is str and backend))):
        shape = residual.shape
        if len(shape) == 3:
            T, n, H = shape
        else:
            T = shape[:-2].numel() if len(shape) > 1 else 0  # (n, H): one token; (H,) and T == 0: general
            n, H = shape[-2:] if T else (0, 0)
        dt, dev = residual.dtype, residual.device
        mdt, m = _MIX.get(dt), 2 * n + n * n
        if (T and 1 <= n <= _MAX_N and H >= 1 and fn.shape == (m, n * H) and hc_scale.shape == (3,)
                and hc_base.shape == (m,) and fn.dtype is mdt and hc_scale.dtype is mdt and hc_base.dtype is mdt
                and fn.device == dev and hc_scale.device == dev and hc_base.device == dev
                and (norm_weight is None or _norm_weight_ok(norm_weight, H, dt, mdt, dev))):
            try:
                if _grad_enabled() and (residual.requires_grad or fn.requires_grad or hc_scale.requires_grad
                                        or hc_base.requires_grad
                                        or (norm_weight is not None and norm_weight.requires_grad)):
                    return _PRE_APPLY(_unwrap_if_dead(residual), _unwrap_if_dead(fn), _unwrap_if_dead(hc_scale),
                                      _unwrap_if_dead(hc_base),
                                      None if norm_weight is None else _unwrap_if_dead(norm_weight),
                                      (_select("pre", dev, dt, n, H, T, backend, False, norm_weight is not None),
                                       T, n, H, rms_eps, hc_pre_eps, hc_sinkhorn_eps, hc_post_mult_value,
                                       sinkhorn_repeat, norm_eps))
                return _run_pre(_select("pre", dev, dt, n, H, T, backend, False, norm_weight is not None), residual,
                                fn, hc_scale, hc_base, rms_eps, hc_pre_eps, hc_sinkhorn_eps, hc_post_mult_value,
                                sinkhorn_repeat, norm_weight, norm_eps, T, n, H)
            except RuntimeError as e:
                raise _retyped(_PRE, e) from None
    validation.check_sinkhorn_repeat(sinkhorn_repeat)  # before dispatch, which takes True as 1
    return _pre_op(residual, fn, hc_scale, hc_base, rms_eps, hc_pre_eps, hc_sinkhorn_eps,
                   hc_post_mult_value, sinkhorn_repeat, norm_weight, norm_eps, backend=backend)


def post(x, residual, post_mix, comb_mix, *, backend=None):
    if (not _is_compiling()
            and (x.__class__ is _T or x.__class__ is _P) and (residual.__class__ is _T or residual.__class__ is _P)
            and (post_mix.__class__ is _T or post_mix.__class__ is _P)
            and (comb_mix.__class__ is _T or comb_mix.__class__ is _P)
            and _plain_context()
            and x.layout is _S and residual.layout is _S and post_mix.layout is _S and comb_mix.layout is _S
            and not (x.is_nested or residual.is_nested or post_mix.is_nested or comb_mix.is_nested or residual.is_meta)
            and (backend is None or (backend.__class__ is str and backend))):
        shape = residual.shape
        if len(shape) == 3:
            T, n, H = shape
            xs, ps, cs = (T, H), (T, n, 1), (T, n, n)
        else:
            T = shape[:-2].numel() if len(shape) > 1 else 0
            n, H = shape[-2:] if T else (0, 0)
            lead = shape[:-2]
            xs, ps, cs = (*lead, H), (*lead, n, 1), (*lead, n, n)
        dt, dev = residual.dtype, residual.device
        mdt = _MIX.get(dt)
        if (T and 1 <= n <= _MAX_N and H >= 1 and x.shape == xs and post_mix.shape == ps and comb_mix.shape == cs
                and x.dtype is dt and post_mix.dtype is mdt and comb_mix.dtype is mdt
                and x.device == dev and post_mix.device == dev and comb_mix.device == dev):
            try:
                if _grad_enabled() and (x.requires_grad or residual.requires_grad or post_mix.requires_grad
                                        or comb_mix.requires_grad):
                    return _POST_APPLY(_unwrap_if_dead(x), _unwrap_if_dead(residual), _unwrap_if_dead(post_mix),
                                       _unwrap_if_dead(comb_mix),
                                       (_select("post", dev, dt, n, H, T, backend), T, n, H))
                return _run_post(_select("post", dev, dt, n, H, T, backend), x, residual, post_mix, comb_mix, T, n, H)
            except RuntimeError as e:
                raise _retyped(_POST, e) from None
    return _post_op(x, residual, post_mix, comb_mix, backend=backend)


def head(residual, fn, hc_scale, hc_base, rms_eps=_D["rms_eps"], hc_eps=_D["hc_eps"], *, backend=None):
    if (not _is_compiling()
            and (residual.__class__ is _T or residual.__class__ is _P) and (fn.__class__ is _P or fn.__class__ is _T)
            and (hc_scale.__class__ is _P or hc_scale.__class__ is _T)
            and (hc_base.__class__ is _P or hc_base.__class__ is _T)
            and _plain_context()
            and residual.layout is _S and fn.layout is _S and hc_scale.layout is _S and hc_base.layout is _S
            and not (residual.is_nested or fn.is_nested or hc_scale.is_nested or hc_base.is_nested or residual.is_meta)
            and rms_eps.__class__ is float and 0.0 <= rms_eps < _INF and hc_eps.__class__ is float
            and 0.0 <= hc_eps < _INF
            and (backend is None or (backend.__class__ is str and backend))):
        shape = residual.shape
        if len(shape) == 3:
            T, n, H = shape
        else:
            T = shape[:-2].numel() if len(shape) > 1 else 0
            n, H = shape[-2:] if T else (0, 0)
        dt, dev = residual.dtype, residual.device
        mdt = _MIX.get(dt)
        if (T and 1 <= n <= _MAX_N and H >= 1 and fn.shape == (n, n * H) and hc_scale.shape == (1,)
                and hc_base.shape == (n,) and fn.dtype is mdt and hc_scale.dtype is mdt and hc_base.dtype is mdt
                and fn.device == dev and hc_scale.device == dev and hc_base.device == dev):
            try:
                if _grad_enabled() and (residual.requires_grad or fn.requires_grad or hc_scale.requires_grad
                                        or hc_base.requires_grad):
                    return _HEAD_APPLY(_unwrap_if_dead(residual), _unwrap_if_dead(fn), _unwrap_if_dead(hc_scale),
                                       _unwrap_if_dead(hc_base),
                                       (_select("head", dev, dt, n, H, T, backend), T, n, H, rms_eps, hc_eps))
                return _run_head(_select("head", dev, dt, n, H, T, backend), residual, fn, hc_scale, hc_base, rms_eps,
                                 hc_eps, T, n, H)
            except RuntimeError as e:
                raise _retyped(_HEAD, e) from None
    return _head_op(residual, fn, hc_scale, hc_base, rms_eps, hc_eps, backend=backend)


def fused_post_pre(x, residual, post_mix, comb_mix, fn, hc_scale, hc_base, rms_eps=_D["rms_eps"],
                   hc_pre_eps=_D["hc_pre_eps"], hc_sinkhorn_eps=_D["hc_sinkhorn_eps"],
                   hc_post_mult_value=_D["hc_post_mult_value"], sinkhorn_repeat=_D["sinkhorn_repeat"],
                   norm_weight=None, norm_eps=_D["norm_eps"], *, backend=None):
    if (not _is_compiling()
            and (x.__class__ is _T or x.__class__ is _P) and (residual.__class__ is _T or residual.__class__ is _P)
            and (post_mix.__class__ is _T or post_mix.__class__ is _P)
            and (comb_mix.__class__ is _T or comb_mix.__class__ is _P)
            and (fn.__class__ is _P or fn.__class__ is _T) and (hc_scale.__class__ is _P or hc_scale.__class__ is _T)
            and (hc_base.__class__ is _P or hc_base.__class__ is _T)
            and _plain_context()
            and x.layout is _S and residual.layout is _S and post_mix.layout is _S and comb_mix.layout is _S
            and fn.layout is _S and hc_scale.layout is _S and hc_base.layout is _S
            and not (x.is_nested or residual.is_nested or post_mix.is_nested or comb_mix.is_nested or fn.is_nested
                     or hc_scale.is_nested or hc_base.is_nested or residual.is_meta)
            and _pre_scalars_ok(rms_eps, hc_pre_eps, hc_sinkhorn_eps, hc_post_mult_value, sinkhorn_repeat, norm_eps)
            and (backend is None or (backend.__class__ is str and backend))):
        shape = residual.shape
        if len(shape) == 3:
            T, n, H = shape
            xs, ps, cs = (T, H), (T, n, 1), (T, n, n)
        else:
            T = shape[:-2].numel() if len(shape) > 1 else 0
            n, H = shape[-2:] if T else (0, 0)
            lead = shape[:-2]
            xs, ps, cs = (*lead, H), (*lead, n, 1), (*lead, n, n)
        dt, dev = residual.dtype, residual.device
        mdt, m = _MIX.get(dt), 2 * n + n * n
        if (T and 1 <= n <= _MAX_N and H >= 1 and x.shape == xs and post_mix.shape == ps and comb_mix.shape == cs
                and fn.shape == (m, n * H) and hc_scale.shape == (3,) and hc_base.shape == (m,)
                and x.dtype is dt and post_mix.dtype is mdt and comb_mix.dtype is mdt
                and fn.dtype is mdt and hc_scale.dtype is mdt and hc_base.dtype is mdt
                and x.device == dev and post_mix.device == dev and comb_mix.device == dev
                and fn.device == dev and hc_scale.device == dev and hc_base.device == dev
                and (norm_weight is None or _norm_weight_ok(norm_weight, H, dt, mdt, dev))):
            try:
                if _grad_enabled() and (x.requires_grad or residual.requires_grad or post_mix.requires_grad
                                        or comb_mix.requires_grad or fn.requires_grad or hc_scale.requires_grad
                                        or hc_base.requires_grad
                                        or (norm_weight is not None and norm_weight.requires_grad)):
                    return _FUSED_APPLY(_unwrap_if_dead(x), _unwrap_if_dead(residual), _unwrap_if_dead(post_mix),
                                        _unwrap_if_dead(comb_mix), _unwrap_if_dead(fn), _unwrap_if_dead(hc_scale),
                                        _unwrap_if_dead(hc_base),
                                        None if norm_weight is None else _unwrap_if_dead(norm_weight),
                                        (_select("fused_post_pre", dev, dt, n, H, T, backend, False,
                                                 norm_weight is not None),
                                         T, n, H, rms_eps, hc_pre_eps, hc_sinkhorn_eps, hc_post_mult_value,
                                         sinkhorn_repeat, norm_eps))
                return _run_fused(_select("fused_post_pre", dev, dt, n, H, T, backend, False, norm_weight is not None),
                                  x, residual, post_mix, comb_mix, fn, hc_scale, hc_base, rms_eps, hc_pre_eps,
                                  hc_sinkhorn_eps, hc_post_mult_value, sinkhorn_repeat, norm_weight, norm_eps,
                                  T, n, H)
            except RuntimeError as e:
                raise _retyped(_FUSED, e) from None
    validation.check_sinkhorn_repeat(sinkhorn_repeat)
    return _fused_op(x, residual, post_mix, comb_mix, fn, hc_scale, hc_base, rms_eps, hc_pre_eps,
                     hc_sinkhorn_eps, hc_post_mult_value, sinkhorn_repeat, norm_weight, norm_eps, backend=backend)


# One home for the math's docstrings: the reference's, plus what the dispatching API adds.
for _f, _r in ((pre, reference.pre), (post, reference.post), (head, reference.head),
               (fused_post_pre, reference.fused_post_pre)):
    _f.__doc__ = _r.__doc__.rstrip() + "\n" + _BACKEND_DOC


_CHECKS = {"pre": validation.check_pre, "post": validation.check_post, "head": validation.check_head,
           "fused_post_pre": validation.check_fused}
#: How many leading arguments of each op are tensors (the rest are scalars with defaults).
_N_TENSORS = {"pre": 4, "post": 4, "head": 4, "fused_post_pre": 7}


def explain(op: str, *args, backend: str | None = None) -> Explanation:
    """Which backend would serve ``op`` called with ``args`` (the op's positional arguments: its
    tensors, then optionally its scalars), and why every other backend would not. Runs no
    kernel. ``str()`` of the result is a report::

        print(mhc.explain("pre", residual, fn, hc_scale, hc_base))
    """
    if op not in _CHECKS:
        raise ValueError(f"unknown op {op!r}; ops: {', '.join(_CHECKS)}")
    names = [a.name for a in getattr(torch.ops.mhc, op).default._schema.arguments if not a.kwarg_only]
    n_tensors = _N_TENSORS[op]
    if not n_tensors <= len(args) <= len(names):
        optional = f"[, {', '.join(names[n_tensors:])}]" if len(names) > n_tensors else ""
        raise TypeError(f"mhc.explain({op!r}, ...) takes {op}'s arguments: {', '.join(names[:n_tensors])}"
                        f"{optional}; got {len(args)}")
    validation.check_backend(backend)
    given = dict(zip(names, args))
    for name in names[n_tensors:]:  # the scalars left out take the API's defaults
        given.setdefault(name, _D.get(name))  # norm_weight: None
    _, T, n, H = _CHECKS[op](**given)
    res = given["residual"]
    from mhc import registry

    norm = given.get("norm_weight") is not None
    return registry.explain_problem(Problem(op, res.device, res.dtype, n, H, T, norm=norm), backend)


def list_backends() -> list[str]:
    """Names of every known backend (built-in and from the ``mhc.backends`` entry-point group)."""
    from mhc import registry

    return registry.backend_names()
