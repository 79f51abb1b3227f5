"""``torch.ops.mhc.*``: the op definitions, their kernels, fake (meta) impls, and the gate of the public functions.

Registration uses ``torch.library.Library.define`` + ``impl`` rather than
``torch.library.custom_op``: the latter wraps every call in extra Python layers, several times the
cost of the dispatch here (``python benchmarks/bench.py --overhead`` measures both; figures in
docs/tuning/host.md). One
``CompositeExplicitAutograd`` kernel per op serves every device: it validates (``mhc.validation``),
picks the backend (``mhc.registry.select``: a dict lookup once warm; also for T == 0, so that a
call is accepted or refused the same way whatever T is), returns empty outputs for T == 0
without calling it, flattens the leading dims and restores them. The public functions
(``mhc.pre`` ...) call that same kernel themselves where :func:`direct_ok` finds that the
dispatcher would do nothing else; its autograd is ``mhc.autograd``'s.

Autocast: every op (and every backward op, ``mhc.autograd``) also has a kernel at the autocast
dispatch keys that runs the op with autocast switched off, so that ``torch.autocast`` changes
neither the inputs nor the math inside: the ops compute in the dtypes DESIGN.md states whatever
autocast region they are called in. It costs nothing outside autocast (the key is not visited).

Each op takes a keyword-only ``backend`` (``None`` = the current selection, see
``mhc.registry``), so that a choice made in model code survives ``torch.compile``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from mhc import reference, registry, torch_private, validation

__all__ = ["SCHEMAS", "SPECS", "Spec", "direct_ok", "forward_ad_active", "pre", "post", "head", "fused_post_pre"]

#: The scalars' defaults have one home, ``mhc.reference.DEFAULTS``: the schemas and the Python
#: signatures below take them from there.
_D = reference.DEFAULTS
# norm_weight/norm_eps: the sublayer's RMSNorm fused into pre's collapse (mhc.reference.pre).
_PRE_SCALARS = (f"float rms_eps={_D['rms_eps']!r}, float hc_pre_eps={_D['hc_pre_eps']!r}, "
                f"float hc_sinkhorn_eps={_D['hc_sinkhorn_eps']!r}, float hc_post_mult_value={_D['hc_post_mult_value']!r}, "
                f"int sinkhorn_repeat={_D['sinkhorn_repeat']!r}, Tensor? norm_weight=None, "
                f"float norm_eps={_D['norm_eps']!r}")
SCHEMAS = {
    "pre": ("pre(Tensor residual, Tensor fn, Tensor hc_scale, Tensor hc_base, " + _PRE_SCALARS
            + ", *, str? backend=None) -> (Tensor post_mix, Tensor comb_mix, Tensor layer_input)"),
    "post": ("post(Tensor x, Tensor residual, Tensor post_mix, Tensor comb_mix, *, str? backend=None) -> Tensor"),
    "head": ("head(Tensor residual, Tensor fn, Tensor hc_scale, Tensor hc_base, "
             f"float rms_eps={_D['rms_eps']!r}, float hc_eps={_D['hc_eps']!r}, *, str? backend=None) -> Tensor"),
    "fused_post_pre": ("fused_post_pre(Tensor x, Tensor residual, Tensor post_mix, Tensor comb_mix, Tensor fn, "
                       "Tensor hc_scale, Tensor hc_base, " + _PRE_SCALARS + ", *, str? backend=None) -> "
                       "(Tensor new_residual, Tensor post_mix, Tensor comb_mix, Tensor layer_input)"),
}

_LIB = torch.library.Library("mhc", "DEF")
for _schema in SCHEMAS.values():
    _LIB.define(_schema)


def _pre_outputs(residual: torch.Tensor, lead, n: int, H: int):
    mdt = validation.mix_dtype(residual.dtype)
    return (residual.new_empty((*lead, n, 1), dtype=mdt), residual.new_empty((*lead, n, n), dtype=mdt),
            residual.new_empty((*lead, H)))


# --- the ops' kernel (every device): validate, select, T == 0, flatten, call, restore ----------------
# One kernel per op serves every caller: the dispatcher (CompositeExplicitAutograd), the public
# functions where the dispatcher would do nothing else (:func:`direct_ok`), and ``mhc.autograd``'s
# functions. Backends get (T, n, H) contiguous tensors (``mhc/backends/__init__.py``); reshape and
# view each cost about as much as a validation check on CPU, so the common 3-D (T, n, H) call
# skips them.


def _c(t: torch.Tensor, *shape: int) -> torch.Tensor:
    """``t`` as a contiguous tensor of ``shape`` (no-op for the common already-flat call)."""
    if t.dim() != len(shape):
        t = t.reshape(shape)
    return t.contiguous()


def _own(t: torch.Tensor, *shape: int) -> torch.Tensor:
    """A backend's output ``t`` restored to ``shape``, as a tensor of its own rather than a view.
    An op's output that is a view (even of a tensor nobody else holds) is refused an in-place
    update by autograd (a view made inside a custom Function); ``detach()`` drops the view
    relation and shares the storage, so it costs no copy. Autograd is below this layer, so
    there is no history to lose."""
    return t.view(shape).detach()


def pre(residual, fn, hc_scale, hc_base, rms_eps=_D["rms_eps"], hc_pre_eps=_D["hc_pre_eps"],
        hc_sinkhorn_eps=_D["hc_sinkhorn_eps"], hc_post_mult_value=_D["hc_post_mult_value"],
        sinkhorn_repeat=_D["sinkhorn_repeat"], norm_weight=None, norm_eps=_D["norm_eps"], *, backend=None):
    lead, T, n, H = validation.check_pre(residual, fn, hc_scale, hc_base, sinkhorn_repeat, rms_eps, hc_pre_eps,
                                         hc_sinkhorn_eps, hc_post_mult_value, norm_weight, norm_eps)
    impl = registry.select("pre", residual.device, residual.dtype, n, H, T, backend, norm=norm_weight is not None)
    if T == 0:  # selected first all the same: a call is accepted or refused whatever T is
        return _pre_outputs(residual, lead, n, H)
    flat = len(lead) == 1
    res = residual.contiguous() if flat else _c(residual, T, n, H)
    # The fused RMSNorm's arguments only when given: a backend without them is called as before.
    norm = () if norm_weight is None else (norm_weight.contiguous(), norm_eps)
    p, c, li = impl(res, fn.contiguous(), hc_scale.contiguous(), hc_base.contiguous(), rms_eps, hc_pre_eps,
                    hc_sinkhorn_eps, hc_post_mult_value, sinkhorn_repeat, *norm)
    if flat:
        return p, c, li
    return _own(p, *lead, n, 1), _own(c, *lead, n, n), _own(li, *lead, H)


def post(x, residual, post_mix, comb_mix, *, backend=None):
    lead, T, n, H = validation.check_post(x, residual, post_mix, comb_mix)
    impl = registry.select("post", residual.device, residual.dtype, n, H, T, backend)
    if T == 0:
        return residual.new_empty(residual.shape)
    if len(lead) == 1:
        return impl(x.contiguous(), residual.contiguous(), post_mix.contiguous(), comb_mix.contiguous())
    return _own(impl(_c(x, T, H), _c(residual, T, n, H), _c(post_mix, T, n, 1), _c(comb_mix, T, n, n)),
                *residual.shape)


def head(residual, fn, hc_scale, hc_base, rms_eps=_D["rms_eps"], hc_eps=_D["hc_eps"], *, backend=None):
    lead, T, n, H = validation.check_head(residual, fn, hc_scale, hc_base, rms_eps, hc_eps)
    impl = registry.select("head", residual.device, residual.dtype, n, H, T, backend)
    if T == 0:
        return residual.new_empty((*lead, H))
    flat = len(lead) == 1
    out = impl(residual.contiguous() if flat else _c(residual, T, n, H), fn.contiguous(), hc_scale.contiguous(),
               hc_base.contiguous(), rms_eps, hc_eps)
    return out if flat else _own(out, *lead, H)


def fused_post_pre(x, residual, post_mix, comb_mix, fn, hc_scale, hc_base, rms_eps=_D["rms_eps"],
                   hc_pre_eps=_D["hc_pre_eps"], hc_sinkhorn_eps=_D["hc_sinkhorn_eps"],
                   hc_post_mult_value=_D["hc_post_mult_value"], sinkhorn_repeat=_D["sinkhorn_repeat"],
                   norm_weight=None, norm_eps=_D["norm_eps"], *, backend=None):
    lead, T, n, H = validation.check_fused(x, residual, post_mix, comb_mix, fn, hc_scale, hc_base,
                                           sinkhorn_repeat, rms_eps, hc_pre_eps, hc_sinkhorn_eps,
                                           hc_post_mult_value, norm_weight, norm_eps)
    impl = registry.select("fused_post_pre", residual.device, residual.dtype, n, H, T, backend,
                           norm=norm_weight is not None)
    if T == 0:
        return (residual.new_empty(residual.shape), *_pre_outputs(residual, lead, n, H))
    flat = len(lead) == 1
    if flat:
        ins = (x.contiguous(), residual.contiguous(), post_mix.contiguous(), comb_mix.contiguous())
    else:
        ins = (_c(x, T, H), _c(residual, T, n, H), _c(post_mix, T, n, 1), _c(comb_mix, T, n, n))
    norm = () if norm_weight is None else (norm_weight.contiguous(), norm_eps)
    new, p, c, li = impl(*ins, fn.contiguous(), hc_scale.contiguous(), hc_base.contiguous(), rms_eps, hc_pre_eps,
                         hc_sinkhorn_eps, hc_post_mult_value, sinkhorn_repeat, *norm)
    if flat:
        return new, p, c, li
    return _own(new, *residual.shape), _own(p, *lead, n, 1), _own(c, *lead, n, n), _own(li, *lead, H)


# --- the one way in: the public functions' gate ------------------------------------------------

_TENSOR, _PARAMETER, _STRIDED = torch.Tensor, torch.nn.Parameter, torch.strided
_is_compiling = torch.compiler.is_compiling
_tracing = torch_private.tracing_state
_dispatch_modes = torch_private.dispatch_mode_depth
_function_modes = torch_private.function_mode_enabled
_autocast = torch_private.any_autocast_enabled
_profiling = torch_private.profiler_enabled
_functorch_level = torch_private.functorch_interpreter


def forward_ad_active() -> bool:
    """Whether a forward-mode AD level is open (``torch.autograd.forward_ad.dual_level``, which
    ``torch.func.jvp`` opens too): then a call must go through the op's ``autograd.Function``
    (``mhc.autograd``), whose ``jvp`` gives the outputs' tangents; the kernels would drop them."""
    return torch_private.forward_ad_level() >= 0


class Spec(NamedTuple):
    """One forward op as its callers need it: the ``OpOverload``, its kernel (the function the
    dispatcher calls below autograd), and, from its schema, the positions of its tensor, float
    and int arguments and the defaults of its positional arguments (all of them, in order; the
    dispatcher strips trailing ones equal to their default before an autograd kernel sees them)."""

    op: torch._ops.OpOverload
    kernel: Callable
    tensors: tuple[int, ...]
    floats: tuple[int, ...]
    ints: tuple[int, ...]
    defaults: tuple


def _spec(name: str, kernel: Callable) -> Spec:
    op = getattr(torch.ops.mhc, name).default
    args = [a for a in op._schema.arguments if not a.kwarg_only]
    kinds = [str(a.type) for a in args]
    return Spec(op, kernel, tuple(i for i, k in enumerate(kinds) if k in ("Tensor", "Optional[Tensor]")),
                tuple(i for i, k in enumerate(kinds) if k == "float"), tuple(i for i, k in enumerate(kinds) if k == "int"),
                tuple(a.default_value if a.has_default_value() else None for a in args))


def direct_ok(args: tuple, spec: Spec) -> bool:
    """Whether ``spec.kernel(*args)`` gives what the dispatcher would give for ``spec.op(*args)``
    (``args``: every positional argument): the dispatcher would then only box the arguments,
    step through autograd and call that kernel, a large share of a decode call's host time
    (``benchmarks/host_profile.py``; figures in docs/tuning/host.md).

    Its other kernels serve what this refuses, so those calls must go through it: nothing being
    compiled or traced (``torch.jit.trace`` records the op, with sizes that are tensors), no
    dispatch or function mode (``FakeTensorMode``, ``torch.device`` as a context), no functorch
    transform (``vmap``), autocast region (``register_no_autocast``), profiler (which records
    the op by name) or forward-mode AD level (:func:`forward_ad_active`: the op's autograd
    kernel gives the tangents); tensors that are plain dense ``Tensor``/``Parameter`` objects (not a
    subclass, not meta, sparse or nested: ``register_dense_only``) without a negative bit (which
    the dispatcher materialises before any kernel sees the tensor: a view such as
    ``complex.conj().imag`` carries one; the conjugate bit needs no test, as only complex tensors
    carry it and the kernel's validation refuses their dtype as the dispatcher's path would); and
    scalars of exactly the schema's types (a Python ``float`` where it says float, an ``int``
    where it says int: the dispatcher converts or refuses anything else)."""
    if (_is_compiling() or _tracing() is not None or _dispatch_modes() or _function_modes() or _autocast()
            or _profiling() or _functorch_level() is not None or forward_ad_active()):
        return False
    for i in spec.tensors:
        t = args[i]
        if t is None:
            continue
        c = t.__class__
        if (c is not _TENSOR and c is not _PARAMETER) or t.layout is not _STRIDED or t.is_nested or t.is_meta or t.is_neg():
            return False
    for i in spec.floats:
        if args[i].__class__ is not float:
            return False
    for i in spec.ints:
        if args[i].__class__ is not int:
            return False
    return True


# --- fake impls: shapes and dtypes only, same validation ---------------------------------------


def _pre_fake(residual, fn, hc_scale, hc_base, rms_eps=_D["rms_eps"], hc_pre_eps=_D["hc_pre_eps"],
              hc_sinkhorn_eps=_D["hc_sinkhorn_eps"], hc_post_mult_value=_D["hc_post_mult_value"],
              sinkhorn_repeat=_D["sinkhorn_repeat"], norm_weight=None, norm_eps=_D["norm_eps"], *, backend=None):
    lead, _, n, H = validation.check_pre(residual, fn, hc_scale, hc_base, sinkhorn_repeat, rms_eps, hc_pre_eps,
                                                  hc_sinkhorn_eps, hc_post_mult_value, norm_weight, norm_eps)
    return _pre_outputs(residual, lead, n, H)


def _post_fake(x, residual, post_mix, comb_mix, *, backend=None):
    validation.check_post(x, residual, post_mix, comb_mix)
    return residual.new_empty(residual.shape)


def _head_fake(residual, fn, hc_scale, hc_base, rms_eps=_D["rms_eps"], hc_eps=_D["hc_eps"], *, backend=None):
    lead, _, n, H = validation.check_head(residual, fn, hc_scale, hc_base, rms_eps, hc_eps)
    return residual.new_empty((*lead, H))


def _fused_fake(x, residual, post_mix, comb_mix, fn, hc_scale, hc_base, rms_eps=_D["rms_eps"],
                hc_pre_eps=_D["hc_pre_eps"], hc_sinkhorn_eps=_D["hc_sinkhorn_eps"],
                hc_post_mult_value=_D["hc_post_mult_value"], sinkhorn_repeat=_D["sinkhorn_repeat"],
                norm_weight=None, norm_eps=_D["norm_eps"],
                *, backend=None):
    lead, _, n, H = validation.check_fused(x, residual, post_mix, comb_mix, fn, hc_scale, hc_base,
                                           sinkhorn_repeat, rms_eps, hc_pre_eps, hc_sinkhorn_eps,
                                           hc_post_mult_value, norm_weight, norm_eps)
    return (residual.new_empty(residual.shape), *_pre_outputs(residual, lead, n, H))


# --- autocast: run the op as if no autocast region were active ------------------------------------

#: Every autocast dispatch key this torch build has (one per device type).
_AUTOCAST_KEYS = tuple(k for k in dir(torch_private.DispatchKey) if k.startswith("Autocast"))
_NO_AUTOCAST = torch_private.DispatchKeySet(torch_private.DispatchKey.Undefined)
for _key in _AUTOCAST_KEYS:
    _NO_AUTOCAST = _NO_AUTOCAST | torch_private.DispatchKeySet(getattr(torch_private.DispatchKey, _key))


def register_no_autocast(lib: torch.library.Library, name: str) -> None:
    """Give ``mhc::<name>`` a kernel at every autocast key that redispatches with autocast off.

    Without it, a call inside ``torch.autocast`` reaches the op's body with autocast on, and the
    torch backend's matmul (the reference's) runs in bf16: mixes off by ~1e-3 and still labelled
    fp32. Inputs are not cast: the op's own dtype rules apply (as ``register_autocast`` would
    not allow: it casts every floating input to one dtype)."""
    op = getattr(getattr(torch.ops.mhc, name), "default")

    def run_without_autocast(*args, **kwargs):
        with torch_private.ExcludeDispatchKeyGuard(_NO_AUTOCAST):
            return op(*args, **kwargs)

    for key in _AUTOCAST_KEYS:
        lib.impl(name, run_without_autocast, key)


# --- sparse and nested tensors: a TypeError naming the argument -------------------------------------

#: The dispatch keys of sparse (COO, compressed) and nested tensors; the op's composite kernel
#: would meet them as an unexplained "unsupported memory format" (sparse) or not at all (nested).
_NON_DENSE_KEYS = tuple(k for kind in ("Sparse", "SparseCsr", "NestedTensor")
                        for k in (kind + dev for dev in ("CPU", "CUDA", "Meta", "XPU"))
                        if hasattr(torch_private.DispatchKey, k)) + ("AutogradNestedTensor",)


def register_dense_only(lib: torch.library.Library, name: str) -> None:
    """Give ``mhc::<name>`` a kernel at every sparse and nested dispatch key that raises the
    ``TypeError`` of :func:`mhc.validation.non_dense` for the offending argument."""
    names = [a.name for a in getattr(getattr(torch.ops.mhc, name), "default")._schema.arguments]

    def refuse(*args, **kwargs):
        raise validation.non_dense(names, args, kwargs) or TypeError(f"mhc::{name} takes dense (strided) tensors")

    for key in _NON_DENSE_KEYS:
        lib.impl(name, refuse, key)


_KERNELS = {"pre": (pre, _pre_fake), "post": (post, _post_fake), "head": (head, _head_fake),
            "fused_post_pre": (fused_post_pre, _fused_fake)}
for _name, (_real, _fake) in _KERNELS.items():
    _LIB.impl(_name, _real, "CompositeExplicitAutograd")
    torch.library.register_fake(f"mhc::{_name}", _fake, lib=_LIB)
    register_no_autocast(_LIB, _name)
    register_dense_only(_LIB, _name)

#: Each forward op's :class:`Spec`, for the public functions (``mhc.pre`` ...) and ``mhc.autograd``.
SPECS = {name: _spec(name, real) for name, (real, _) in _KERNELS.items()}
