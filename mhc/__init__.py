"""mhc: GPU kernels for mHC (Manifold-Constrained Hyper-Connections) with interchangeable backends.

Public API: :func:`pre`, :func:`post`, :func:`head`, :func:`fused_post_pre` (also reachable as
``torch.ops.mhc.<op>``), backend selection with :func:`use_backend`, the ``MHC_BACKEND``
environment variable or ``backend=``, and :func:`explain`. Importing ``mhc`` imports torch and
nothing optional: triton, tilelang and aiter load on first use of their backend.
"""

from __future__ import annotations

import re

import torch

from mhc import ops as _ops  # registers torch.ops.mhc.*
from mhc import autograd as _autograd  # registers torch.ops.mhc.*_backward and the ops' autograd
from mhc import reference, validation
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
    """``op`` for the public wrappers: the dispatcher's argument-type errors (a RuntimeError naming
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


_pre_op = _typed(torch.ops.mhc.pre.default, 4, also=(9,))  # 9: norm_weight
_post_op = _typed(torch.ops.mhc.post.default, 4)
_head_op = _typed(torch.ops.mhc.head.default, 4)
_fused_op = _typed(torch.ops.mhc.fused_post_pre.default, 7, also=(12,))  # 12: norm_weight


def pre(residual, fn, hc_scale, hc_base, rms_eps=_D["rms_eps"], hc_pre_eps=_D["hc_pre_eps"],
        hc_sinkhorn_eps=_D["hc_sinkhorn_eps"], hc_post_mult_value=_D["hc_post_mult_value"],
        sinkhorn_repeat=_D["sinkhorn_repeat"], norm_weight=None, norm_eps=_D["norm_eps"], *, backend=None):
    validation.check_sinkhorn_repeat(sinkhorn_repeat)  # before dispatch, which takes True as 1
    return _pre_op(residual, fn, hc_scale, hc_base, rms_eps, hc_pre_eps, hc_sinkhorn_eps,
                   hc_post_mult_value, sinkhorn_repeat, norm_weight, norm_eps, backend=backend)


def post(x, residual, post_mix, comb_mix, *, backend=None):
    return _post_op(x, residual, post_mix, comb_mix, backend=backend)


def head(residual, fn, hc_scale, hc_base, rms_eps=_D["rms_eps"], hc_eps=_D["hc_eps"], *, backend=None):
    return _head_op(residual, fn, hc_scale, hc_base, rms_eps, hc_eps, backend=backend)


def fused_post_pre(x, residual, post_mix, comb_mix, fn, hc_scale, hc_base, rms_eps=_D["rms_eps"],
                   hc_pre_eps=_D["hc_pre_eps"], hc_sinkhorn_eps=_D["hc_sinkhorn_eps"],
                   hc_post_mult_value=_D["hc_post_mult_value"], sinkhorn_repeat=_D["sinkhorn_repeat"],
                   norm_weight=None, norm_eps=_D["norm_eps"], *, backend=None):
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
