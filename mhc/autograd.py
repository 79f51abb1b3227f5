"""Autograd for the mhc ops: the backward ops, and one ``autograd.Function`` per forward op.

Each forward op's formulas (what to save, which backward ops to call) are one entry of
:data:`FORMULAS`; :data:`FUNCTIONS` holds the ``autograd.Function`` built from each, which both
ways in use: the op's autograd kernel (``torch.ops.mhc.<op>``, registered here at the
``Autograd`` dispatch key, as ``torch.library.register_autograd`` would, so that
``torch.compile`` and CUDA graphs see the same op) and the public function (``mhc.<op>``), which
applies it directly where the dispatcher would do nothing else (``mhc.ops.direct_ok``).

Backward ops are ``torch.library`` ops of their own (``torch.ops.mhc.pre_backward``,
``post_backward``, ``head_backward``), dispatched through :mod:`mhc.registry` exactly like the
forward ops, so that a backend can serve them with fast kernels; the torch backend serves them on
every device with :mod:`mhc.backward` (the hand-derived math). ``fused_post_pre_backward`` is
pre's backward on the new residual followed by post's, one op, so that a backend can fuse them.

Each backward op takes an ``output_mask`` (which gradients to compute: the autograd passes
``ctx.needs_input_grad``) and returns ``None`` for the gradients it was not asked for. The
forward inputs it needs are saved, and nothing else: ``pre``/``head`` save their four tensor
inputs and the norm weight, if any (every gradient needs the mixes, recomputed from residual and
fn; ``pre_backward`` takes ``norm_weight``/``norm_eps``/``norm_weight_grad`` and returns a fifth
gradient, ``grad_norm_weight``, None without a norm weight); ``post`` saves, per
gradient asked for, the one tensor it needs (grad_x: post_mix, grad_residual: comb_mix,
grad_post_mix: x, grad_comb_mix: residual).

Which backend serves the backward is decided when the forward runs (``registry.current_choice``
for the backward op, see :mod:`mhc.registry`) and kept on ``ctx``: ``loss.backward()`` usually
runs outside the ``use_backend`` block of the forward, and on CUDA in the autograd engine's own
thread, where the block's context variable is not set. The forward's ``backend=`` argument names
a forward kernel and gets no gradient. The backward ops have no autograd kernel of their own:
double backward (``create_graph=True``) works only where their body is made of differentiable
torch ops (the torch backend, ``Capabilities.double_backward``), through PyTorch's autograd
fallback (which warns); a backend whose backward kernels are not is refused for such a call with
a reason (an explicit choice raises ``BackendError``, auto moves on to torch), instead of giving
a second-order gradient of None.

Forward-mode AD: each Function has a ``jvp`` (:func:`_jvp`, the reference differentiated at the
inputs' values), and while a dual level is open (``mhc.ops.forward_ad_active``) every call goes
through the Function, so no output loses its tangent. ``torch.func.jvp`` is refused
(:data:`_FUNC_JVP`).
"""

from __future__ import annotations

import torch

from mhc import reference, registry, torch_private, validation
from mhc import ops as _ops
from mhc.ops import _c, forward_ad_active, register_dense_only, register_no_autocast

__all__ = ["SCHEMAS", "FORMULAS", "FUNCTIONS"]

_MASK_OUT = ("Tensor? grad_residual, Tensor? grad_fn, Tensor? grad_hc_scale, Tensor? grad_hc_base")
SCHEMAS = {
    "pre_backward": (
        "pre_backward(Tensor grad_post_mix, Tensor grad_comb_mix, Tensor grad_layer_input, Tensor residual, "
        "Tensor fn, Tensor hc_scale, Tensor hc_base, float rms_eps, float hc_pre_eps, float hc_sinkhorn_eps, "
        "float hc_post_mult_value, int sinkhorn_repeat, bool[4] output_mask, Tensor? norm_weight=None, "
        f"float norm_eps={reference.DEFAULTS['norm_eps']!r}, bool norm_weight_grad=False, *, str? backend=None) -> ("
        + _MASK_OUT + ", Tensor? grad_norm_weight)"),
    "post_backward": (
        "post_backward(Tensor grad_out, Tensor? x, Tensor? residual, Tensor? post_mix, Tensor? comb_mix, "
        "bool[4] output_mask, *, str? backend=None) -> (Tensor? grad_x, Tensor? grad_residual, "
        "Tensor? grad_post_mix, Tensor? grad_comb_mix)"),
    "head_backward": (
        "head_backward(Tensor grad_out, Tensor residual, Tensor fn, Tensor hc_scale, Tensor hc_base, "
        "float rms_eps, float hc_eps, bool[4] output_mask, *, str? backend=None) -> (" + _MASK_OUT + ")"),
    "fused_post_pre_backward": (
        "fused_post_pre_backward(Tensor grad_new_residual, Tensor grad_post_mix, Tensor grad_comb_mix, "
        "Tensor grad_layer_input, Tensor new_residual, Tensor? x, Tensor? residual, Tensor? post_mix, "
        "Tensor? comb_mix, Tensor fn, Tensor hc_scale, Tensor hc_base, float rms_eps, float hc_pre_eps, "
        "float hc_sinkhorn_eps, float hc_post_mult_value, int sinkhorn_repeat, bool[7] output_mask, "
        f"Tensor? norm_weight=None, float norm_eps={reference.DEFAULTS['norm_eps']!r}, bool norm_weight_grad=False, "
        "*, str? backend=None) -> (Tensor? grad_x, Tensor? grad_residual, Tensor? grad_post_mix, "
        "Tensor? grad_comb_mix, Tensor? grad_fn, Tensor? grad_hc_scale, Tensor? grad_hc_base, "
        "Tensor? grad_norm_weight)"),
}

_LIB = torch.library.Library("mhc", "FRAGMENT")
for _schema in SCHEMAS.values():
    _LIB.define(_schema)


# --- validation of what the forward checks do not cover: the incoming gradients ----------------


def _grad(name: str, g, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> None:
    validation.check_tensor(name, g, shape, dtype, "the forward output's", device)


def _mask(output_mask, size: int = 4) -> list[bool]:
    if len(output_mask) != size:
        raise ValueError(f"output_mask must have {size} entries, got {len(output_mask)}")
    return [bool(b) for b in output_mask]


def _check_pre_backward(g_pm, g_cm, g_li, residual, fn, hc_scale, hc_base, scalars, output_mask,
                        norm_weight=None, norm_eps=reference.DEFAULTS["norm_eps"]):
    """``scalars``: rms_eps, hc_pre_eps, hc_sinkhorn_eps, hc_post_mult_value, sinkhorn_repeat."""
    lead, T, n, H = validation.check_pre(residual, fn, hc_scale, hc_base, scalars[4], *scalars[:4], norm_weight,
                                         norm_eps)
    mdt, dev = validation.mix_dtype(residual.dtype), residual.device
    _grad("grad_post_mix", g_pm, (*lead, n, 1), mdt, dev)
    _grad("grad_comb_mix", g_cm, (*lead, n, n), mdt, dev)
    _grad("grad_layer_input", g_li, (*lead, H), residual.dtype, dev)
    return lead, T, n, H, _mask(output_mask)


def _check_head_backward(g, residual, fn, hc_scale, hc_base, rms_eps, hc_eps, output_mask):
    lead, T, n, H = validation.check_head(residual, fn, hc_scale, hc_base, rms_eps, hc_eps)
    _grad("grad_out", g, (*lead, H), residual.dtype, residual.device)
    return lead, T, n, H, _mask(output_mask)


# grad_x needs post_mix, grad_residual comb_mix, grad_post_mix x, grad_comb_mix residual.
_POST_NEEDS = (("grad_x", "post_mix"), ("grad_residual", "comb_mix"), ("grad_post_mix", "x"),
               ("grad_comb_mix", "residual"))


def _check_post_backward(g, x, residual, post_mix, comb_mix, output_mask):
    if not isinstance(g, torch.Tensor):
        raise TypeError(f"grad_out must be a torch.Tensor, got {type(g).__name__}")
    if g.dim() < 2 or g.dtype not in validation.ACT_DTYPES or not 1 <= g.shape[-2] <= validation.MAX_N:
        raise ValueError(f"grad_out must be a (..., n, H) float tensor with 1 <= n <= {validation.MAX_N}, "
                         f"got {tuple(g.shape)} {g.dtype}")
    *lead, n, H = g.shape
    lead = tuple(lead)
    mask = _mask(output_mask)
    mdt = validation.mix_dtype(g.dtype)
    given = {"x": (x, (*lead, H), g.dtype), "residual": (residual, (*lead, n, H), g.dtype),
             "post_mix": (post_mix, (*lead, n, 1), mdt), "comb_mix": (comb_mix, (*lead, n, n), mdt)}
    for want, (grad_name, needs) in zip(mask, _POST_NEEDS):
        if want and given[needs][0] is None:
            raise ValueError(f"{grad_name} is asked for in output_mask but {needs} (which it needs) is None")
    for name, (t, shape, dtype) in given.items():
        if t is not None:
            _grad(name, t, shape, dtype, g.device)
    T = lead[0] if len(lead) == 1 else torch.Size(lead).numel()
    return lead, T, n, H, mask


def _check_fused_backward(g_new, g_pm, g_cm, g_li, new, x, residual, post_mix, comb_mix, fn, hc_scale, hc_base,
                          scalars, output_mask, norm_weight=None, norm_eps=reference.DEFAULTS["norm_eps"]):
    """pre's checks on the new residual, then post's on the post inputs that the mask needs."""
    mask = _mask(output_mask, 7)
    lead, T, n, H, _ = _check_pre_backward(g_pm, g_cm, g_li, new, fn, hc_scale, hc_base, scalars, mask[:4],
                                           norm_weight, norm_eps)
    _grad("grad_new_residual", g_new, tuple(new.shape), new.dtype, new.device)
    _check_post_backward(g_new, x, residual, post_mix, comb_mix, mask[:4])
    return lead, T, n, H, mask


# --- real kernels (every device): validate, select, T == 0, flatten, restore ---------------------


def _create_graph(*tensors) -> bool:
    """Whether this backward call must record autograd history: grad mode is on (the engine turns
    it on for ``create_graph=True``) and an input requires grad. Selection then refuses backends
    whose backward kernels cannot (``Capabilities.double_backward``), instead of letting them
    return outputs whose own gradient is silently None."""
    if not torch.is_grad_enabled():
        return False
    for t in tensors:
        if t is not None and t.requires_grad:
            return True
    return False


def _param_grads(fn, hc_scale, hc_base, mask):
    """Zero gradients for the parameters asked for (the T == 0 answer: a sum over no tokens)."""
    return tuple(torch.zeros_like(t) if want else None for t, want in zip((fn, hc_scale, hc_base), mask[1:]))


def _pre_backward(grad_post_mix, grad_comb_mix, grad_layer_input, residual, fn, hc_scale, hc_base, rms_eps,
                  hc_pre_eps, hc_sinkhorn_eps, hc_post_mult_value, sinkhorn_repeat, output_mask, norm_weight=None,
                  norm_eps=reference.DEFAULTS["norm_eps"], norm_weight_grad=False, *, backend=None):
    lead, T, n, H, mask = _check_pre_backward(grad_post_mix, grad_comb_mix, grad_layer_input, residual, fn,
                                              hc_scale, hc_base, (rms_eps, hc_pre_eps, hc_sinkhorn_eps,
                                                                  hc_post_mult_value, sinkhorn_repeat), output_mask,
                                              norm_weight, norm_eps)
    norm = norm_weight is not None
    nw_grad = norm and bool(norm_weight_grad)
    impl = registry.select("pre_backward", residual.device, residual.dtype, n, H, T, backend,
                           _create_graph(grad_post_mix, grad_comb_mix, grad_layer_input, residual, fn, hc_scale,
                                         hc_base, norm_weight), norm=norm)
    if T == 0:  # selected first all the same: accepted or refused whatever T is
        return (residual.new_empty(residual.shape) if mask[0] else None, *_param_grads(fn, hc_scale, hc_base, mask),
                torch.zeros_like(norm_weight) if nw_grad else None)
    # The fused RMSNorm's arguments only when given: a backend without them is called as before.
    norm_args = (norm_weight.contiguous(), norm_eps, nw_grad) if norm else ()
    g_res, *rest = impl(_c(grad_post_mix, T, n, 1), _c(grad_comb_mix, T, n, n), _c(grad_layer_input, T, H),
                        _c(residual, T, n, H), fn.contiguous(), hc_scale.contiguous(), hc_base.contiguous(),
                        rms_eps, hc_pre_eps, hc_sinkhorn_eps, hc_post_mult_value, sinkhorn_repeat, mask, *norm_args)
    if not norm:
        rest.append(None)
    return (None if g_res is None else g_res.view(residual.shape), *rest)


def _head_backward(grad_out, residual, fn, hc_scale, hc_base, rms_eps, hc_eps, output_mask, *, backend=None):
    lead, T, n, H, mask = _check_head_backward(grad_out, residual, fn, hc_scale, hc_base, rms_eps, hc_eps,
                                               output_mask)
    impl = registry.select("head_backward", residual.device, residual.dtype, n, H, T, backend,
                           _create_graph(grad_out, residual, fn, hc_scale, hc_base))
    if T == 0:
        return (residual.new_empty(residual.shape) if mask[0] else None, *_param_grads(fn, hc_scale, hc_base, mask))
    g_res, *rest = impl(_c(grad_out, T, H), _c(residual, T, n, H), fn.contiguous(), hc_scale.contiguous(),
                        hc_base.contiguous(), rms_eps, hc_eps, mask)
    return (None if g_res is None else g_res.view(residual.shape), *rest)


def _post_backward(grad_out, x, residual, post_mix, comb_mix, output_mask, *, backend=None):
    lead, T, n, H, mask = _check_post_backward(grad_out, x, residual, post_mix, comb_mix, output_mask)
    shapes = ((*lead, H), (*lead, n, H), (*lead, n, 1), (*lead, n, n))
    impl = registry.select("post_backward", grad_out.device, grad_out.dtype, n, H, T, backend,
                           _create_graph(grad_out, x, residual, post_mix, comb_mix))
    if T == 0:
        mdt = validation.mix_dtype(grad_out.dtype)
        dts = (grad_out.dtype, grad_out.dtype, mdt, mdt)
        return tuple(grad_out.new_empty(s, dtype=d) if want else None for s, d, want in zip(shapes, dts, mask))
    flat = ((T, H), (T, n, H), (T, n, 1), (T, n, n))
    ins = [None if t is None else _c(t, *s) for t, s in zip((x, residual, post_mix, comb_mix), flat)]
    outs = impl(_c(grad_out, T, n, H), *ins, mask)
    return tuple(None if g is None else g.view(s) for g, s in zip(outs, shapes))


def _fused_post_pre_backward(grad_new_residual, grad_post_mix, grad_comb_mix, grad_layer_input, new_residual, x,
                             residual, post_mix, comb_mix, fn, hc_scale, hc_base, rms_eps, hc_pre_eps,
                             hc_sinkhorn_eps, hc_post_mult_value, sinkhorn_repeat, output_mask, norm_weight=None,
                             norm_eps=reference.DEFAULTS["norm_eps"], norm_weight_grad=False, *, backend=None):
    scalars = (rms_eps, hc_pre_eps, hc_sinkhorn_eps, hc_post_mult_value, sinkhorn_repeat)
    lead, T, n, H, mask = _check_fused_backward(grad_new_residual, grad_post_mix, grad_comb_mix, grad_layer_input,
                                                new_residual, x, residual, post_mix, comb_mix, fn, hc_scale, hc_base,
                                                scalars, output_mask, norm_weight, norm_eps)
    norm = norm_weight is not None
    nw_grad = norm and bool(norm_weight_grad)
    impl = registry.select("fused_post_pre_backward", new_residual.device, new_residual.dtype, n, H, T, backend,
                           _create_graph(grad_new_residual, grad_post_mix, grad_comb_mix, grad_layer_input,
                                         new_residual, x, residual, post_mix, comb_mix, fn, hc_scale, hc_base,
                                         norm_weight), norm=norm)
    shapes = ((*lead, H), (*lead, n, H), (*lead, n, 1), (*lead, n, n))
    if T == 0:
        mdt = validation.mix_dtype(new_residual.dtype)
        dts = (new_residual.dtype, new_residual.dtype, mdt, mdt)
        post = tuple(new_residual.new_empty(s, dtype=d) if want else None for s, d, want in zip(shapes, dts, mask))
        return (*post, *_param_grads(fn, hc_scale, hc_base, [False, *mask[4:]]),
                torch.zeros_like(norm_weight) if nw_grad else None)
    flat = ((T, H), (T, n, H), (T, n, 1), (T, n, n))
    ins = [None if t is None else _c(t, *f) for t, f in zip((x, residual, post_mix, comb_mix), flat)]
    norm_args = (norm_weight.contiguous(), norm_eps, nw_grad) if norm else ()
    outs = list(impl(_c(grad_new_residual, T, n, H), _c(grad_post_mix, T, n, 1), _c(grad_comb_mix, T, n, n),
                     _c(grad_layer_input, T, H), _c(new_residual, T, n, H), *ins, fn.contiguous(),
                     hc_scale.contiguous(), hc_base.contiguous(), *scalars, mask, *norm_args))
    if not norm:
        outs.append(None)
    return (*(None if g is None else g.view(s) for g, s in zip(outs[:4], shapes)), *outs[4:])


# --- fake impls: shapes and dtypes only, same validation ------------------------------------------


def _pre_backward_fake(grad_post_mix, grad_comb_mix, grad_layer_input, residual, fn, hc_scale, hc_base, rms_eps,
                       hc_pre_eps, hc_sinkhorn_eps, hc_post_mult_value, sinkhorn_repeat, output_mask, norm_weight=None,
                       norm_eps=reference.DEFAULTS["norm_eps"], norm_weight_grad=False, *, backend=None):
    *_, mask = _check_pre_backward(grad_post_mix, grad_comb_mix, grad_layer_input, residual, fn, hc_scale,
                                   hc_base, (rms_eps, hc_pre_eps, hc_sinkhorn_eps, hc_post_mult_value,
                                             sinkhorn_repeat), output_mask, norm_weight, norm_eps)
    g_nw = norm_weight.new_empty(norm_weight.shape) if norm_weight is not None and norm_weight_grad else None
    return (*(t.new_empty(t.shape) if want else None for t, want in zip((residual, fn, hc_scale, hc_base), mask)),
            g_nw)


def _head_backward_fake(grad_out, residual, fn, hc_scale, hc_base, rms_eps, hc_eps, output_mask, *, backend=None):
    *_, mask = _check_head_backward(grad_out, residual, fn, hc_scale, hc_base, rms_eps, hc_eps, output_mask)
    return tuple(t.new_empty(t.shape) if want else None for t, want in zip((residual, fn, hc_scale, hc_base), mask))


def _post_backward_fake(grad_out, x, residual, post_mix, comb_mix, output_mask, *, backend=None):
    lead, _, n, H, mask = _check_post_backward(grad_out, x, residual, post_mix, comb_mix, output_mask)
    mdt = validation.mix_dtype(grad_out.dtype)
    specs = (((*lead, H), grad_out.dtype), ((*lead, n, H), grad_out.dtype), ((*lead, n, 1), mdt),
             ((*lead, n, n), mdt))
    return tuple(grad_out.new_empty(s, dtype=d) if want else None for (s, d), want in zip(specs, mask))


def _fused_post_pre_backward_fake(grad_new_residual, grad_post_mix, grad_comb_mix, grad_layer_input, new_residual,
                                  x, residual, post_mix, comb_mix, fn, hc_scale, hc_base, rms_eps, hc_pre_eps,
                                  hc_sinkhorn_eps, hc_post_mult_value, sinkhorn_repeat, output_mask,
                                  norm_weight=None, norm_eps=reference.DEFAULTS["norm_eps"], norm_weight_grad=False,
                                  *, backend=None):
    lead, _, n, H, mask = _check_fused_backward(grad_new_residual, grad_post_mix, grad_comb_mix, grad_layer_input,
                                                new_residual, x, residual, post_mix, comb_mix, fn, hc_scale, hc_base,
                                                (rms_eps, hc_pre_eps, hc_sinkhorn_eps, hc_post_mult_value,
                                                 sinkhorn_repeat), output_mask, norm_weight, norm_eps)
    mdt = validation.mix_dtype(new_residual.dtype)
    act = new_residual.dtype
    specs = (((*lead, H), act), ((*lead, n, H), act), ((*lead, n, 1), mdt), ((*lead, n, n), mdt))
    post = tuple(new_residual.new_empty(s, dtype=d) if want else None for (s, d), want in zip(specs, mask))
    params = tuple(t.new_empty(t.shape) if want else None for t, want in zip((fn, hc_scale, hc_base), mask[4:]))
    g_nw = norm_weight.new_empty(norm_weight.shape) if norm_weight is not None and norm_weight_grad else None
    return (*post, *params, g_nw)


#: Each backward op's kernel and fake impl. Adding a backward op: its schema in :data:`SCHEMAS`,
#: its entry here and its name in ``mhc.registry.BACKWARD_OPS`` (which backends' capabilities and
#: ``MHC_BACKEND`` read); the formula of the forward op that calls it is in :data:`FORMULAS`.
BACKWARD_KERNELS = {"pre_backward": (_pre_backward, _pre_backward_fake),
                    "post_backward": (_post_backward, _post_backward_fake),
                    "head_backward": (_head_backward, _head_backward_fake),
                    "fused_post_pre_backward": (_fused_post_pre_backward, _fused_post_pre_backward_fake)}
if set(SCHEMAS) != set(BACKWARD_KERNELS) or set(SCHEMAS) != set(registry.BACKWARD_OPS):
    raise ImportError(f"mhc.autograd: the backward ops' schemas {sorted(SCHEMAS)}, kernels {sorted(BACKWARD_KERNELS)} "
                      f"and mhc.registry.BACKWARD_OPS {sorted(registry.BACKWARD_OPS)} must name the same ops")
for _name, (_real, _fake) in BACKWARD_KERNELS.items():
    _LIB.impl(_name, _real, "CompositeExplicitAutograd")
    torch.library.register_fake(f"mhc::{_name}", _fake, lib=_LIB)
    register_no_autocast(_LIB, _name)  # backward under autocast: the same math as outside
    register_dense_only(_LIB, _name)


# --- the forward ops' autograd: one formula per op, one autograd.Function per op ---------------------
# Each forward op has a ``setup(ctx, inputs, output)`` (what to save) and a ``backward(ctx, *grads)``
# (which backward ops to call), indexed by the op's positional arguments; :data:`FORMULAS` is
# their one table, and :func:`_function` turns each entry into the op's ``autograd.Function``.


def _pre_setup(ctx, inputs, output):
    # every gradient needs the recomputed mixes; norm_weight (inputs[9], or None) the fused norm's
    ctx.save_for_backward(*inputs[:4], inputs[9])
    ctx.scalars = inputs[4:9]
    ctx.norm_eps = inputs[10]
    ctx.bwd_backend = registry.current_choice("pre_backward")


def _norm_kwargs(ctx, norm_weight, grad_index: int) -> dict:
    """pre_backward's fused-norm arguments: none without a norm weight; with one, its eps and
    whether its gradient is asked for (``ctx.needs_input_grad[grad_index]``)."""
    if norm_weight is None:
        return {}
    return dict(norm_weight=norm_weight, norm_eps=ctx.norm_eps,
                norm_weight_grad=bool(ctx.needs_input_grad[grad_index]))


def _pre_bwd(ctx, g_pm, g_cm, g_li):
    # Every upstream gradient is a tensor: autograd.Function materializes an unused output's as
    # zeros (its default, set_materialize_grads(True)), which the backward kernels read as such.
    residual, fn, hc_scale, hc_base, norm_weight = ctx.saved_tensors
    *grads, g_nw = torch.ops.mhc.pre_backward(g_pm, g_cm, g_li, residual, fn, hc_scale, hc_base, *ctx.scalars,
                                              list(ctx.needs_input_grad[:4]), **_norm_kwargs(ctx, norm_weight, 9),
                                              backend=ctx.bwd_backend)
    return (*grads, *(None,) * len(ctx.scalars), g_nw, None)


def _head_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:4])
    ctx.scalars = inputs[4:6]
    ctx.bwd_backend = registry.current_choice("head_backward")


def _head_bwd(ctx, g):
    residual, fn, hc_scale, hc_base = ctx.saved_tensors
    grads = torch.ops.mhc.head_backward(g, residual, fn, hc_scale, hc_base, *ctx.scalars,
                                        list(ctx.needs_input_grad[:4]), backend=ctx.bwd_backend)
    return (*grads, *(None,) * len(ctx.scalars))


def _post_saved(x, residual, post_mix, comb_mix, need):
    """The tensors post's backward needs for the gradients in ``need``; None for the others."""
    need_x, need_res, need_pm, need_cm = need
    return (x if need_pm else None, residual if need_cm else None, post_mix if need_x else None,
            comb_mix if need_res else None)


def _post_setup(ctx, inputs, output):
    x, residual, post_mix, comb_mix = inputs[:4]
    ctx.save_for_backward(*_post_saved(x, residual, post_mix, comb_mix, ctx.needs_input_grad[:4]))
    ctx.bwd_backend = registry.current_choice("post_backward")


def _post_bwd(ctx, g):
    return torch.ops.mhc.post_backward(g, *ctx.saved_tensors, list(ctx.needs_input_grad[:4]),
                                       backend=ctx.bwd_backend)


def _fused_setup(ctx, inputs, output):
    x, residual, post_mix, comb_mix, fn, hc_scale, hc_base = inputs[:7]
    need = ctx.needs_input_grad
    # pre's half needs the new residual (an output: what pre read), its parameters and the norm
    # weight (inputs[12], or None) whatever is asked for; post's half what post's backward needs.
    ctx.save_for_backward(output[0], fn, hc_scale, hc_base, inputs[12],
                          *_post_saved(x, residual, post_mix, comb_mix, need[:4]))
    ctx.scalars = inputs[7:12]
    ctx.norm_eps = inputs[13]
    ctx.bwd_backend = registry.current_choice("fused_post_pre_backward")


def _fused_bwd(ctx, g_new, g_pm, g_cm, g_li):
    # every upstream gradient a tensor, as in _pre_bwd
    new, fn, hc_scale, hc_base, norm_weight, *post_saved = ctx.saved_tensors
    need = ctx.needs_input_grad
    *grads, g_nw = torch.ops.mhc.fused_post_pre_backward(
        g_new, g_pm, g_cm, g_li, new, *post_saved, fn, hc_scale, hc_base, *ctx.scalars, list(need[:7]),
        **_norm_kwargs(ctx, norm_weight, 12), backend=ctx.bwd_backend)
    return (*grads, *(None,) * len(ctx.scalars), g_nw, None)


#: Each forward op's autograd formulas, ``(setup, backward)``: their one home. ``setup(ctx, inputs,
#: output)`` saves what the backward needs (``inputs``: every positional argument of the op);
#: ``backward(ctx, *grads)`` returns one gradient (or None) per positional argument.
FORMULAS = {"pre": (_pre_setup, _pre_bwd), "post": (_post_setup, _post_bwd), "head": (_head_setup, _head_bwd),
            "fused_post_pre": (_fused_setup, _fused_bwd)}

_BELOW_AUTOGRAD = torch_private.AutoDispatchBelowAutograd
_AFTER_AUTOGRAD = torch_private.after_autograd_keyset
_any_requires_grad = torch_private.any_requires_grad


def _jvp(name: str, inputs, tangents) -> tuple:
    """Forward-mode rule of forward op ``name``: the tangents of its outputs, given every
    positional argument ``inputs`` and their ``tangents`` (None where there is none), computed
    by the reference (:mod:`mhc.reference`, accumulating in fp32, fp64 for fp64) at the
    inputs' values, in the outputs' dtypes. The Function's jvp runs with forward AD switched
    off and a dual level already open (nesting is not supported), so the reference is
    differentiated with reverse mode twice (``torch.autograd.functional.jvp``), not with
    ``torch.func.jvp``. It costs a few forward passes of the reference: forward AD is for
    checking, not for speed."""
    idx = [i for i in _ops.SPECS[name].tensors if inputs[i] is not None and tangents[i] is not None]
    ref = getattr(reference, name)

    def f(*xs):
        args = list(inputs)
        for i, x in zip(idx, xs):
            args[i] = x
        out = ref(*args)
        return out if isinstance(out, tuple) else (out,)

    _, out = torch.autograd.functional.jvp(f, tuple(inputs[i].detach() for i in idx),
                                          tuple(tangents[i] for i in idx))
    return out if len(out) > 1 else out[0]


def _function(name: str, setup, bwd) -> type[torch.autograd.Function]:
    """The ``autograd.Function`` of forward op ``name``, for both ways in: ``apply(*args, backend,
    keyset)`` with ``args`` every positional argument of the op. ``keyset`` None: the public
    function's call, which :func:`mhc.ops.direct_ok` has cleared, so the forward calls the op's
    kernel itself; a ``DispatchKeySet``: the call came through the dispatcher (the op's
    autograd kernel, :func:`_register`), and the forward redispatches below autograd, as
    ``torch.library.register_autograd`` does. ``backend`` and ``keyset`` get no gradient."""
    spec = _ops.SPECS[name]
    op, kernel = spec.op, spec.kernel

    def forward(ctx, *args):
        *inputs, backend, keyset = args
        if keyset is None:
            out = kernel(*inputs, backend=backend)
        else:
            with _BELOW_AUTOGRAD():
                out = op.redispatch(keyset & _AFTER_AUTOGRAD, *inputs, backend=backend)
        setup(ctx, inputs, out)
        if forward_ad_active():  # what jvp needs: every argument, the tensors saved for it
            ctx.save_for_forward(*(inputs[i] for i in spec.tensors))
            ctx.jvp_args = [None if i in spec.tensors else a for i, a in enumerate(inputs)]
        return out

    def backward(ctx, *grads):
        return (*bwd(ctx, *grads), None, None)

    def jvp(ctx, *tangents):
        args = list(ctx.jvp_args)
        for i, t in zip(spec.tensors, ctx.saved_tensors):
            args[i] = t
        return _jvp(name, args, tangents)

    return type(f"Mhc_{name}", (torch.autograd.Function,),
                {"forward": staticmethod(forward), "backward": staticmethod(backward), "jvp": staticmethod(jvp)})


#: The ``autograd.Function`` of each forward op (see :func:`_function`).
FUNCTIONS = {name: _function(name, setup, bwd) for name, (setup, bwd) in FORMULAS.items()}


#: Why ``torch.func.jvp`` is refused: an ``autograd.Function`` applied from an op's autograd
#: kernel cannot take part in functorch's transforms, and without it the tangents would be zeros.
_FUNC_JVP = ("mhc.{name}: forward-mode AD through torch.func (jvp, jacfwd, hessian) is not supported: it would "
             "give zero tangents; use torch.autograd.forward_ad (dual_level, make_dual), which mhc's ops support")


def _register(name: str) -> None:
    """The autograd kernel of ``torch.ops.mhc.<name>``: :data:`FUNCTIONS`'s where a gradient can
    flow, else the op below autograd. The dispatcher strips trailing arguments equal to their
    defaults; the formulas index every positional argument, so they are filled back in."""
    spec = _ops.SPECS[name]
    op, defaults, apply = spec.op, spec.defaults, FUNCTIONS[name].apply

    def autograd_kernel(keyset, *args, backend=None):
        if len(args) < len(defaults):
            args = (*args, *defaults[len(args):])
        if forward_ad_active():
            if torch_private.functorch_transforms_active():
                raise NotImplementedError(_FUNC_JVP.format(name=name))
            return apply(*args, backend, keyset)
        if torch.is_grad_enabled() and _any_requires_grad(*args):
            return apply(*args, backend, keyset)
        with _BELOW_AUTOGRAD():
            return op.redispatch(keyset & _AFTER_AUTOGRAD, *args, backend=backend)

    _LIB.impl(name, autograd_kernel, "Autograd", with_keyset=True)


for _name in FORMULAS:
    _register(_name)
