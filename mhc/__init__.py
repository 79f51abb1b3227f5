"""mhc: GPU kernels for mHC (Manifold-Constrained Hyper-Connections) with interchangeable backends.

Public API: :func:`pre`, :func:`post`, :func:`head`, :func:`fused_post_pre` (also reachable as
``torch.ops.mhc.<op>``), backend selection with :func:`use_backend`, the ``MHC_BACKEND``
environment variable or ``backend=``, and :func:`explain`. Importing ``mhc`` imports torch and
nothing optional: triton, tilelang and aiter load on first use of their backend.
"""

from __future__ import annotations

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


def _typed(op, n_tensors: int):
    """``op`` for the public wrappers: the dispatcher's argument-type errors (a RuntimeError naming
    the argument) re-raised as ``TypeError``, and the autograd layer skipped when no gradient can
    flow.

    ``torch.library.register_autograd`` puts a Python autograd kernel in front of every call,
    which redispatches in Python even when nothing requires grad: ~20 µs a call instead of ~13 on
    CPU (``python -m mhc bench --overhead``). When grad mode is off or none of the first
    ``n_tensors`` (tensor) arguments requires grad, the call goes below autograd directly, as
    PyTorch's own C++ ops do. Under ``torch.compile`` the plain op is traced."""

    def call(*args, **kwargs):
        try:
            if not torch.compiler.is_compiling():
                needs = False
                if torch.is_grad_enabled():
                    for t in args[:n_tensors]:
                        if isinstance(t, torch.Tensor) and t.requires_grad:
                            needs = True
                            break
                if not needs:
                    with _BELOW_AUTOGRAD():
                        return op(*args, **kwargs)
            return op(*args, **kwargs)
        except RuntimeError as e:
            if "Expected a value of type" in str(e) or "expected a value of type" in str(e):
                raise TypeError(str(e).split("\nCast error")[0]) from None
            raise

    return call


_pre_op = _typed(torch.ops.mhc.pre.default, 4)
_post_op = _typed(torch.ops.mhc.post.default, 4)
_head_op = _typed(torch.ops.mhc.head.default, 4)
_fused_op = _typed(torch.ops.mhc.fused_post_pre.default, 7)


def pre(residual, fn, hc_scale, hc_base, rms_eps=_D["rms_eps"], hc_pre_eps=_D["hc_pre_eps"],
        hc_sinkhorn_eps=_D["hc_sinkhorn_eps"], hc_post_mult_value=_D["hc_post_mult_value"],
        sinkhorn_repeat=_D["sinkhorn_repeat"], *, backend=None):
    return _pre_op(residual, fn, hc_scale, hc_base, rms_eps, hc_pre_eps, hc_sinkhorn_eps,
                   hc_post_mult_value, sinkhorn_repeat, backend=backend)


def post(x, residual, post_mix, comb_mix, *, backend=None):
    return _post_op(x, residual, post_mix, comb_mix, backend=backend)


def head(residual, fn, hc_scale, hc_base, rms_eps=_D["rms_eps"], hc_eps=_D["hc_eps"], *, backend=None):
    return _head_op(residual, fn, hc_scale, hc_base, rms_eps, hc_eps, backend=backend)


def fused_post_pre(x, residual, post_mix, comb_mix, fn, hc_scale, hc_base, rms_eps=_D["rms_eps"],
                   hc_pre_eps=_D["hc_pre_eps"], hc_sinkhorn_eps=_D["hc_sinkhorn_eps"],
                   hc_post_mult_value=_D["hc_post_mult_value"], sinkhorn_repeat=_D["sinkhorn_repeat"], *,
                   backend=None):
    return _fused_op(x, residual, post_mix, comb_mix, fn, hc_scale, hc_base, rms_eps, hc_pre_eps,
                     hc_sinkhorn_eps, hc_post_mult_value, sinkhorn_repeat, backend=backend)


# One home for the math's docstrings: the reference's, plus what the dispatching API adds.
for _f, _r in ((pre, reference.pre), (post, reference.post), (head, reference.head),
               (fused_post_pre, reference.fused_post_pre)):
    _f.__doc__ = _r.__doc__.rstrip() + "\n" + _BACKEND_DOC


_CHECKS = {
    "pre": lambda a: validation.check_pre(*a[:4], a[8] if len(a) > 8 else _D["sinkhorn_repeat"]),
    "post": lambda a: validation.check_post(*a[:4]),
    "head": lambda a: validation.check_head(*a[:4]),
    "fused_post_pre": lambda a: validation.check_fused(*a[:7], a[11] if len(a) > 11 else _D["sinkhorn_repeat"]),
}


def explain(op: str, *args, backend: str | None = None) -> Explanation:
    """Which backend would serve ``op`` called with ``args`` (the op's positional arguments), and
    why every other backend would not. Runs no kernel. ``str()`` of the result is a report::

        print(mhc.explain("pre", residual, fn, hc_scale, hc_base))
    """
    if op not in _CHECKS:
        raise ValueError(f"unknown op {op!r}; ops: {', '.join(_CHECKS)}")
    _, T, n, H = _CHECKS[op](args)
    res = args[1] if op in ("post", "fused_post_pre") else args[0]
    from mhc import registry

    return registry.explain_problem(Problem(op, res.device, res.dtype, n, H, T), backend)


def list_backends() -> list[str]:
    """Names of every known backend (built-in and from the ``mhc.backends`` entry-point group)."""
    from mhc import registry

    return registry.backend_names()
