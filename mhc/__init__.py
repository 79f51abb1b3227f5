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
from mhc import reference, registry, validation
from mhc import torch_private as _torch_private
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


def _type_error(op: str, msg: str) -> Exception | None:
    """The dispatcher's argument-type error (a ``RuntimeError``) in one line, naming the argument:
    a ``ValueError`` for an int too large for the schema's int or float (``sinkhorn_repeat=2**63``,
    ``rms_eps=10**400``), else a ``TypeError`` (``residual must be Tensor, got list``); None for
    any other error. The dispatcher's own message repeats the value (170 KB for a list the size of
    an 8 x 4 x 512 residual)."""
    m = re.search(r"[Ee]xpected a value of type '([^']*)' for argument '(\w+)' but instead found type '([^']*)'",
                  msg)
    if m is None:
        return None
    if m[3] == "int" and m[1] in ("int", "float"):
        return ValueError(f"mhc.{op}: {m[2]} must be a {m[1]} within the range of a C {m[1]} (int64 or double)")
    return TypeError(f"mhc.{op}: {m[2]} must be {m[1]}, got {m[3]}")


_grad_enabled = torch.is_grad_enabled
_any_requires_grad = _torch_private.any_requires_grad
_unwrap_if_dead = _torch_private.unwrap_if_dead


def _way_in(name: str):
    """``call(args, backend)``: the one way into forward op ``name`` for its public function,
    ``args`` being every positional argument of the op.

    Where :func:`mhc.ops.direct_ok` finds that the dispatcher would do nothing but call the op's
    kernel, the call runs that kernel itself (which validates, selects the backend and launches),
    or, where a gradient can flow, the op's ``autograd.Function`` (:data:`mhc.autograd.FUNCTIONS`,
    the same one the op's autograd kernel applies), whose forward calls the kernel. Every other
    call is ``torch.ops.mhc.<name>`` itself. So both ways in accept and refuse the same inputs and
    compute the same results; what differs is the error type for the arguments the dispatcher
    cannot convert (its ``RuntimeError``, here a ``TypeError``/``ValueError`` naming the
    argument, :func:`_type_error`) and ``sinkhorn_repeat=True``, which the dispatcher takes as 1
    and this refuses.

    The function's class is applied through its C ``apply`` (:func:`mhc.torch_private.function_apply`):
    ``Function.apply``'s Python layer serves functorch transforms (none is active when
    ``direct_ok`` holds) and unwraps functorch's dead wrappers, done here."""
    spec = _ops.SPECS[name]
    op, kernel, tensors, ints = spec.op, spec.kernel, spec.tensors, spec.ints
    apply = _torch_private.function_apply(_autograd.FUNCTIONS[name])
    names = [a.name for a in op._schema.arguments]

    def call(args: tuple, backend):
        if backend is not None and (backend.__class__ is not str or not backend):
            validation.check_backend(backend)  # the dispatcher would take b"torch" as a str, "" as None
        try:
            if _ops.direct_ok(args, spec):
                if _grad_enabled() and _any_requires_grad(*args):
                    return apply(*[_unwrap_if_dead(a) if i in tensors and a is not None else a
                                   for i, a in enumerate(args)], backend, None)
                return kernel(*args, backend=backend)
            for i in ints:  # sinkhorn_repeat: the dispatcher would take True as 1
                if args[i].__class__ is bool:
                    validation.check_sinkhorn_repeat(args[i])
            return op(*args, backend=backend)
        except NotImplementedError:  # (a RuntimeError) a nested tensor's subclass: say which argument
            err = validation.non_dense(names, args, {})
            if err is not None:
                raise err from None
            raise
        except RuntimeError as e:
            err = _type_error(name, str(e))
            if err is not None:
                raise err from None
            raise

    return call


_pre, _post, _head, _fused = (_way_in(name) for name in ("pre", "post", "head", "fused_post_pre"))


def pre(residual, fn, hc_scale, hc_base, rms_eps=_D["rms_eps"], hc_pre_eps=_D["hc_pre_eps"],
        hc_sinkhorn_eps=_D["hc_sinkhorn_eps"], hc_post_mult_value=_D["hc_post_mult_value"],
        sinkhorn_repeat=_D["sinkhorn_repeat"], norm_weight=None, norm_eps=_D["norm_eps"], *, backend=None):
    return _pre((residual, fn, hc_scale, hc_base, rms_eps, hc_pre_eps, hc_sinkhorn_eps, hc_post_mult_value,
                 sinkhorn_repeat, norm_weight, norm_eps), backend)


def post(x, residual, post_mix, comb_mix, *, backend=None):
    return _post((x, residual, post_mix, comb_mix), backend)


def head(residual, fn, hc_scale, hc_base, rms_eps=_D["rms_eps"], hc_eps=_D["hc_eps"], *, backend=None):
    return _head((residual, fn, hc_scale, hc_base, rms_eps, hc_eps), backend)


def fused_post_pre(x, residual, post_mix, comb_mix, fn, hc_scale, hc_base, rms_eps=_D["rms_eps"],
                   hc_pre_eps=_D["hc_pre_eps"], hc_sinkhorn_eps=_D["hc_sinkhorn_eps"],
                   hc_post_mult_value=_D["hc_post_mult_value"], sinkhorn_repeat=_D["sinkhorn_repeat"],
                   norm_weight=None, norm_eps=_D["norm_eps"], *, backend=None):
    return _fused((x, residual, post_mix, comb_mix, fn, hc_scale, hc_base, rms_eps, hc_pre_eps, hc_sinkhorn_eps,
                   hc_post_mult_value, sinkhorn_repeat, norm_weight, norm_eps), backend)


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
