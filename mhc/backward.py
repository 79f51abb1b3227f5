"""The mHC backward math in plain PyTorch, derived by hand from :mod:`mhc.reference`.

This is the torch backend's ``pre_backward``, ``post_backward`` and ``head_backward`` (see
:mod:`mhc.autograd` for the op schemas and how autograd calls them), and the oracle that faster
backward kernels are tested against (together with ``torch.autograd`` through the reference).
Inputs arrive flattened and contiguous, T >= 1, as the forward backends get them (see
``mhc/backends/__init__.py``). Accumulation is fp32 (fp64 for an fp64 residual), as in the
forward. Gradients of activations (residual, x) take the activation's dtype; gradients of
parameters and mixes (fn, hc_scale, hc_base, post_mix, comb_mix) take the mix dtype.

Derivation, per token (``K = n*H``, ``m = 2n + n*n`` mix columns):

* Prenorm: ``z = fn @ xf``, ``r = (|xf|^2 / K + rms_eps)^(-1/2)``, ``mixes = z * r``. Given
  ``g = dL/dmixes``: ``dL/dfn = sum_t (g*r) xf^T``, and, since ``dr/dxf = -r^3 xf / K``,
  ``dL/dxf = r * fn^T g - (g . mixes) * r^2 / K * xf``.
* Activations: ``a = mixes * scale[group] + base``; ``dL/da`` is the upstream gradient times
  ``sigmoid'(a) = s (1 - s)`` (pre, post, head) or Sinkhorn's backward (comb). Then
  ``dL/dmixes = dL/da * scale[group]``, ``dL/dbase = sum_t dL/da``,
  ``dL/dscale[group] = sum_t sum_group dL/da * mixes``.
* Collapse ``y = sum_i w_i x_i``: ``dL/dw_i = g_y . x_i``, ``dL/dx_i = w_i g_y``.
* Fused RMSNorm ``z = u * nw`` with ``u = y * r``, ``r = (|y|^2 / H + eps)^(-1/2)``: given
  ``g_z``, ``dL/dnw = sum_t g_z * u``, and with ``g_u = g_z * nw``,
  ``dL/dy = r * (g_u - u * (g_u . u) / H)``, which then enters the collapse's backward.
* Sinkhorn: each normalisation is ``y = x / S`` with ``S = sum(x along one axis) + eps``, whose
  backward is ``dL/dx = (dL/dy - sum(dL/dy * y along the axis)) / S``; the softmax's is
  ``dL/dc = p * (dL/dp - sum_j dL/dp_j p_j)`` (``+ eps`` passes the gradient through).

The forward ops return no intermediate, so backward **recomputes** the mixes (one more read of
the residual, which backward reads anyway for ``dL/dfn``) and the Sinkhorn iterations from the
recomputed logits. :func:`sinkhorn_backward` keeps every iterate of that recomputation while it
runs (``2 * sinkhorn_repeat`` (T, n, n) tensors: 2.5 KB a token at n=4 and 20 repeats, under a
tenth of a bf16 residual row at H=4096), so its cost is linear in ``sinkhorn_repeat``; nothing is
kept between forward and backward, so training memory is the forward's inputs only.
"""

from __future__ import annotations

import torch

from mhc.reference import acc_dtype, rms_factor
from mhc.validation import mix_dtype

__all__ = ["sinkhorn_backward", "prenorm_backward", "rms_norm_backward", "pre_backward", "post_backward",
           "head_backward", "fused_post_pre_backward"]


def sinkhorn_backward(grad: torch.Tensor, logits: torch.Tensor, repeat: int, eps: float) -> torch.Tensor:
    """``dL/dlogits`` for ``comb = reference.sinkhorn(logits, repeat, eps)`` given ``grad = dL/dcomb``.

    ``grad``, ``logits``: (T, n, n), one float dtype (fp32/fp64). Returns (T, n, n) of that dtype.
    Recomputes the forward iterations, keeping each normalised iterate and its divisor, then
    walks them backwards.
    """
    p = logits.softmax(-1)
    steps = []  # (output y, divisor S, axis) of every normalisation, in forward order
    y = p + eps
    for axis in (-2,) + (-1, -2) * (repeat - 1):
        s = y.sum(axis, keepdim=True) + eps
        y = y / s
        steps.append((y, s, axis))
    g = grad
    for y, s, axis in reversed(steps):
        g = (g - (g * y).sum(axis, keepdim=True)) / s
    return p * (g - (g * p).sum(-1, keepdim=True))


def _prenorm(residual: torch.Tensor, fn: torch.Tensor, rms_eps: float):
    """Recompute ``(xf (T, K), r (T, 1), mixes (T, m))`` exactly as ``reference.prenorm_mixes``."""
    acc = acc_dtype(residual.dtype)
    T, n, H = residual.shape
    xf = residual.reshape(T, n * H).to(acc)
    r = rms_factor(xf.square().mean(-1, keepdim=True), rms_eps)
    return xf, r, (xf @ fn.to(acc).T) * r


def prenorm_backward(g_mixes: torch.Tensor, xf: torch.Tensor, r: torch.Tensor, mixes: torch.Tensor,
                     fn: torch.Tensor, need_x: bool, need_fn: bool):
    """Backward of ``mixes = (xf @ fn.T) * rsqrt(mean(xf**2, -1) + eps)``.

    ``g_mixes``, ``mixes`` (T, m); ``xf`` (T, K); ``r`` (T, 1) the rsqrt factor; ``fn`` (m, K).
    All in the accumulation dtype. Returns ``(dL/dxf (T, K) or None, dL/dfn (m, K) or None)``.
    """
    g_z = g_mixes * r
    g_fn = g_z.T @ xf if need_fn else None
    g_xf = None
    if need_x:
        rms_term = (g_mixes * mixes).sum(-1, keepdim=True) * r.square() / xf.shape[1]
        g_xf = g_z @ fn.to(xf.dtype) - rms_term * xf
    return g_xf, g_fn


def rms_norm_backward(g_z: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, eps: float):
    """Backward of ``z = reference.rms_norm(y, weight, eps)``.

    ``g_z``, ``y`` (T, H) in the accumulation dtype; ``weight`` (H,) any float dtype. Returns
    ``(dL/dy (T, H), dL/dweight (H,))`` in the accumulation dtype.
    """
    r = rms_factor(y.square().mean(-1, keepdim=True), eps)
    u = y * r
    g_u = g_z * weight.to(y.dtype)
    g_y = r * (g_u - u * (g_u * u).mean(-1, keepdim=True))
    return g_y, (g_z * u).sum(0)


def _mixes_tail(residual, fn, xf, r, mixes, g_a, scale_of_col, groups, w, g_out, mask):
    """Shared tail of pre and head backward, from ``dL/da`` to the four input gradients.

    ``g_a`` (T, m): dL/d(activation argument) for every mix column; ``scale_of_col`` (m,): the
    hc_scale value that multiplies each column; ``groups``: ``(start, stop)`` of the columns that
    share each hc_scale entry, in hc_scale order; ``w`` (T, n): the collapse weights; ``g_out``
    (T, H): the collapse's upstream gradient. ``mask``: which of (residual, fn, hc_scale,
    hc_base) need a gradient. Returns those gradients (None where not asked for).
    """
    T, n, H = residual.shape
    need_res, need_fn, need_scale, need_base = mask
    g_scale = torch.stack([(g_a[:, a:b] * mixes[:, a:b]).sum() for a, b in groups]) if need_scale else None
    g_base = g_a.sum(0) if need_base else None
    g_xf, g_fn = prenorm_backward(g_a * scale_of_col, xf, r, mixes, fn, need_res, need_fn)
    g_res = None
    if need_res:
        # the collapse's direct term: dL/dx_i += w_i * g_out
        g_res = (g_xf.view(T, n, H) + w.unsqueeze(-1) * g_out.unsqueeze(1)).to(residual.dtype)
    mdt = fn.dtype
    return (g_res, None if g_fn is None else g_fn.to(mdt), None if g_scale is None else g_scale.to(mdt),
            None if g_base is None else g_base.to(mdt))


def pre_backward(grad_post_mix, grad_comb_mix, grad_layer_input, residual, fn, hc_scale, hc_base, rms_eps,
                 hc_pre_eps, hc_sinkhorn_eps, hc_post_mult_value, sinkhorn_repeat, output_mask, *norm):
    """Gradients of ``reference.pre``.

    ``grad_post_mix`` (T, n, 1), ``grad_comb_mix`` (T, n, n) in the mix dtype; ``grad_layer_input``
    (T, H) in the residual's dtype; ``residual`` (T, n, H); ``fn`` (2n+n*n, n*H); ``hc_scale``
    (3,); ``hc_base`` (2n+n*n,); the scalars as in the forward. ``output_mask``: four bools, which
    of the outputs to compute. Returns ``(grad_residual (T, n, H) residual dtype, grad_fn,
    grad_hc_scale, grad_hc_base)`` (mix dtype), None where the mask is false.
    ``norm``: empty, or ``(norm_weight (H,), norm_eps, norm_weight_grad)`` for a forward with the
    fused RMSNorm; then a fifth gradient follows, ``grad_norm_weight`` (H,) in norm_weight's dtype
    (None unless ``norm_weight_grad``).
    """
    T, n, H = residual.shape
    xf, r, mixes = _prenorm(residual, fn, rms_eps)
    acc = xf.dtype
    scale, base = hc_scale.to(acc), hc_base.to(acc)
    s_pre = torch.sigmoid(mixes[:, :n] * scale[0] + base[:n])
    s_post = torch.sigmoid(mixes[:, n:2 * n] * scale[1] + base[n:2 * n])
    logits = (mixes[:, 2 * n:] * scale[2] + base[2 * n:]).view(T, n, n)
    g_out = grad_layer_input.to(acc)
    w = s_pre + hc_pre_eps
    g_nw = None
    if norm:  # layer_input = rms_norm(collapse): its gradient w.r.t. the unrounded collapse
        norm_weight, norm_eps, nw_grad = norm
        y = (w.unsqueeze(-1) * xf.view(T, n, H)).sum(1)
        g_out, g_nw = rms_norm_backward(g_out, y, norm_weight, norm_eps)
        g_nw = g_nw.to(norm_weight.dtype) if nw_grad else None
    g_pre = _collapse_backward(g_out, xf.view(T, n, H))
    g_a = torch.cat([
        g_pre * s_pre * (1 - s_pre),
        grad_post_mix.reshape(T, n).to(acc) * hc_post_mult_value * s_post * (1 - s_post),
        sinkhorn_backward(grad_comb_mix.to(acc), logits, sinkhorn_repeat, hc_sinkhorn_eps).reshape(T, n * n),
    ], -1)
    groups = ((0, n), (n, 2 * n), (2 * n, 2 * n + n * n))
    scale_of_col = torch.cat([scale[0].expand(n), scale[1].expand(n), scale[2].expand(n * n)])
    grads = _mixes_tail(residual, fn, xf, r, mixes, g_a, scale_of_col, groups, w, g_out, output_mask)
    return (*grads, g_nw) if norm else grads


def head_backward(grad_out, residual, fn, hc_scale, hc_base, rms_eps, hc_eps, output_mask):
    """Gradients of ``reference.head``.

    ``grad_out`` (T, H) in the residual's dtype; ``residual`` (T, n, H); ``fn`` (n, n*H);
    ``hc_scale`` (1,); ``hc_base`` (n,). ``output_mask``: four bools. Returns ``(grad_residual
    (T, n, H), grad_fn, grad_hc_scale, grad_hc_base)``, None where the mask is false.
    """
    T, n, H = residual.shape
    xf, r, mixes = _prenorm(residual, fn, rms_eps)
    acc = xf.dtype
    scale = hc_scale.to(acc)
    s = torch.sigmoid(mixes * scale[0] + hc_base.to(acc))
    g_out = grad_out.to(acc)
    g_a = _collapse_backward(g_out, xf.view(T, n, H)) * s * (1 - s)
    return _mixes_tail(residual, fn, xf, r, mixes, g_a, scale[0].expand(n), ((0, n),), s + hc_eps, g_out,
                       output_mask)


def post_backward(grad_out, x, residual, post_mix, comb_mix, output_mask):
    """Gradients of ``reference.post``: ``out[t,j] = post_mix[t,j] x[t] + sum_i comb_mix[t,i,j] residual[t,i]``.

    ``grad_out`` (T, n, H) in the residual's dtype. ``x`` (T, H), ``residual`` (T, n, H),
    ``post_mix`` (T, n, 1), ``comb_mix`` (T, n, n); each may be None when no gradient asked for
    in ``output_mask`` (four bools: x, residual, post_mix, comb_mix) needs it: grad_x needs
    post_mix, grad_residual comb_mix, grad_post_mix x, grad_comb_mix residual. Returns
    ``(grad_x (T, H), grad_residual (T, n, H))`` in the activation dtype and ``(grad_post_mix
    (T, n, 1), grad_comb_mix (T, n, n))`` in the mix dtype, None where the mask is false.
    """
    T, n, H = grad_out.shape
    acc = acc_dtype(grad_out.dtype)
    g = grad_out.to(acc)
    need_x, need_res, need_pm, need_cm = output_mask
    g_x = g_res = g_pm = g_cm = None
    if need_x:
        g_x = torch.einsum("tj,tjh->th", post_mix.reshape(T, n).to(acc), g).to(grad_out.dtype)
    if need_res:
        g_res = torch.einsum("tij,tjh->tih", comb_mix.to(acc), g).to(grad_out.dtype)
    if need_pm:
        g_pm = torch.einsum("tjh,th->tj", g, x.to(acc)).unsqueeze(-1).to(mix_dtype(grad_out.dtype))
    if need_cm:
        g_cm = torch.einsum("tih,tjh->tij", residual.to(acc), g).to(mix_dtype(grad_out.dtype))
    return g_x, g_res, g_pm, g_cm


def fused_post_pre_backward(grad_new_residual, grad_post_mix, grad_comb_mix, grad_layer_input, new_residual, x,
                            residual, post_mix, comb_mix, fn, hc_scale, hc_base, rms_eps, hc_pre_eps,
                            hc_sinkhorn_eps, hc_post_mult_value, sinkhorn_repeat, output_mask, *norm):
    """Gradients of ``reference.fused_post_pre``: :func:`pre_backward` on the new residual, whose
    gradient (plus ``grad_new_residual``, the new residual's own upstream gradient) then enters
    :func:`post_backward`.

    ``grad_new_residual`` and ``new_residual`` (T, n, H); the other gradients and inputs as in
    those two functions (``x``, ``residual``, ``post_mix``, ``comb_mix`` may be None where
    post_backward would not need them). ``output_mask``: seven bools (x, residual, post_mix,
    comb_mix, fn, hc_scale, hc_base). Returns the seven gradients in that order, None where the
    mask is false, then ``grad_norm_weight`` when ``norm`` is given (as pre_backward).
    """
    post_mask = [bool(b) for b in output_mask[:4]]
    need_post = any(post_mask)
    g_new_pre, *params = pre_backward(grad_post_mix, grad_comb_mix, grad_layer_input, new_residual, fn, hc_scale,
                                      hc_base, rms_eps, hc_pre_eps, hc_sinkhorn_eps, hc_post_mult_value,
                                      sinkhorn_repeat, [need_post, *output_mask[4:7]], *norm)
    post_grads = (None,) * 4
    if need_post:
        post_grads = post_backward(grad_new_residual + g_new_pre, x, residual, post_mix, comb_mix, post_mask)
    return (*post_grads, *params)


def _collapse_backward(g_out: torch.Tensor, x3: torch.Tensor) -> torch.Tensor:
    """``dL/dw`` (T, n) for ``out = sum_i w[:, i] * x3[:, i]`` given ``g_out`` (T, H), ``x3`` (T, n, H)."""
    return torch.einsum("th,tih->ti", g_out, x3)
