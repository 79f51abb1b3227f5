"""The mHC math in plain PyTorch: the single source of truth.

Every backend, test, benchmark and ``python -m mhc`` compares against these functions; nothing
else restates the math. Accumulation is fp32 (fp64 when the residual is fp64, so that gradcheck
and the tests' fp64 oracle run through the same code). Outputs that carry activations
(``layer_input``, the new residual, ``head``'s output) take the residual's dtype; the mixes
(``post_mix``, ``comb_mix``) are fp32 (fp64 for an fp64 residual).

Notation: ``n`` streams (``hc_mult``), hidden size ``H``, ``n3 = 2n + n*n`` mix columns, any
leading dims (flattened to ``T`` tokens inside). Column ``k`` of a flattened residual row is
``i*H + h`` (stream-major), matching ``fn``'s second dim.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "DEFAULTS",
    "acc_dtype",
    "rms_factor",
    "prenorm_mixes",
    "mix_activations",
    "head_activation",
    "sinkhorn",
    "collapse",
    "rms_norm",
    "pre",
    "post",
    "head",
    "fused_post_pre",
]

#: DeepSeek-V4's values; the Python API's defaults.
DEFAULTS = dict(
    rms_eps=1e-6,
    hc_pre_eps=1e-6,
    hc_sinkhorn_eps=1e-6,
    hc_post_mult_value=2.0,
    sinkhorn_repeat=20,
    hc_eps=1e-6,
    norm_eps=1e-6,
)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype for a residual dtype: fp64 for fp64, else fp32. It is also the dtype
    of the parameters and mixes (fn, hc_scale, hc_base, post_mix, comb_mix) that the op layer
    requires (``mhc.validation.mix_dtype`` is this function)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def rms_factor(mean_sq: torch.Tensor, rms_eps: float) -> torch.Tensor:
    """The per-token RMS factor ``rsqrt(mean_sq + rms_eps)`` from the mean of squares, except that
    it is NaN where ``mean_sq`` is +inf (the token's sum of squares overflowed the accumulation
    dtype), not ``rsqrt(inf) = 0``: a 0 would turn every mix of that token into a finite, wrong
    value. Every backend follows this rule (DESIGN.md, "Numeric domain")."""
    return torch.where(mean_sq == math.inf, math.nan, torch.rsqrt(mean_sq + rms_eps))


def prenorm_mixes(residual: torch.Tensor, fn: torch.Tensor, rms_eps: float) -> torch.Tensor:
    """RMS-normalised mix logits.

    ``residual`` (T, n, H), any float dtype; ``fn`` (m, n*H). Returns ``mixes`` (T, m) in the
    accumulation dtype: ``(xf @ fn.T) * rsqrt(mean(xf**2, -1) + rms_eps)`` with
    ``xf = residual.view(T, n*H)``. The RMS factor is a per-token scalar, so applying it after
    the matmul is exact; kernels compute the sum of squares in the same pass as the GEMM. A token
    whose sum of squares overflows gets NaN mixes (:func:`rms_factor`).
    """
    acc = acc_dtype(residual.dtype)
    T = residual.shape[0]
    xf = residual.reshape(T, residual.shape[1] * residual.shape[2]).to(acc)
    rms = rms_factor(xf.square().mean(-1, keepdim=True), rms_eps)
    return (xf @ fn.to(acc).T) * rms


def sinkhorn(comb: torch.Tensor, repeat: int, eps: float) -> torch.Tensor:
    """Sinkhorn normalisation of comb logits ``comb`` (T, n, n) -> (T, n, n), same dtype.

    ``softmax`` over the last dim plus ``eps``, divide by column sums (+eps); then
    ``repeat - 1`` times: divide by row sums (+eps), then by column sums (+eps).
    Row index = source stream, column index = destination stream. ``repeat`` >= 1.
    """
    comb = comb.softmax(-1) + eps
    comb = comb / (comb.sum(-2, keepdim=True) + eps)
    for _ in range(repeat - 1):
        comb = comb / (comb.sum(-1, keepdim=True) + eps)
        comb = comb / (comb.sum(-2, keepdim=True) + eps)
    return comb


def mix_activations(
    mixes: torch.Tensor,
    hc_scale: torch.Tensor,
    hc_base: torch.Tensor,
    n: int,
    hc_pre_eps: float,
    hc_sinkhorn_eps: float,
    hc_post_mult_value: float,
    sinkhorn_repeat: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split ``mixes`` (T, 2n+n*n) into ``pre`` (T, n), ``post`` (T, n) and ``comb`` (T, n, n).

    ``pre = sigmoid(m[:, :n]*s0 + b[:n]) + hc_pre_eps``,
    ``post = sigmoid(m[:, n:2n]*s1 + b[n:2n]) * hc_post_mult_value``,
    ``comb = sinkhorn((m[:, 2n:]*s2 + b[2n:]).view(T, n, n))``. All in ``mixes``' dtype.
    """
    T = mixes.shape[0]
    scale = hc_scale.to(mixes.dtype)
    base = hc_base.to(mixes.dtype)
    pre_w = torch.sigmoid(mixes[:, :n] * scale[0] + base[:n]) + hc_pre_eps
    post_w = torch.sigmoid(mixes[:, n : 2 * n] * scale[1] + base[n : 2 * n]) * hc_post_mult_value
    comb = (mixes[:, 2 * n :] * scale[2] + base[2 * n :]).view(T, n, n)
    return pre_w, post_w, sinkhorn(comb, sinkhorn_repeat, hc_sinkhorn_eps)


def head_activation(
    mixes: torch.Tensor, hc_scale: torch.Tensor, hc_base: torch.Tensor, hc_eps: float
) -> torch.Tensor:
    """``head``'s weights: ``sigmoid(mixes * hc_scale[0] + hc_base) + hc_eps``; (T, n) -> (T, n)."""
    return torch.sigmoid(mixes * hc_scale.to(mixes.dtype)[0] + hc_base.to(mixes.dtype)) + hc_eps


def rms_norm(y: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Weighted RMSNorm of rows ``y`` (T, H) in their own (accumulation) dtype, no rounding:
    ``y * rms_factor(mean(y**2, -1), eps) * weight``; ``weight`` (H,) of any float dtype (its
    values are taken exactly). The factor follows :func:`rms_factor` (NaN for a row whose sum of
    squares overflows)."""
    return y * rms_factor(y.square().mean(-1, keepdim=True), eps) * weight.to(y.dtype)


def collapse(residual: torch.Tensor, weights: torch.Tensor, norm_weight: torch.Tensor | None = None,
             norm_eps: float = DEFAULTS["norm_eps"]) -> torch.Tensor:
    """``sum_i weights[:, i] * residual[:, i]`` with fp32 (fp64) accumulation.

    ``residual`` (T, n, H), ``weights`` (T, n) -> (T, H) in the residual's dtype. With
    ``norm_weight`` (H,): :func:`rms_norm` of the unrounded fp32 (fp64) sum, then the one
    rounding to the residual's dtype.
    """
    acc = acc_dtype(residual.dtype)
    out = (weights.to(acc).unsqueeze(-1) * residual.to(acc)).sum(1)
    if norm_weight is not None:
        out = rms_norm(out, norm_weight, norm_eps)
    return out.to(residual.dtype)


def _flat(residual: torch.Tensor) -> tuple[tuple[int, ...], torch.Tensor]:
    *lead, n, H = residual.shape
    return tuple(lead), residual.reshape(-1, n, H)


def pre(
    residual: torch.Tensor,
    fn: torch.Tensor,
    hc_scale: torch.Tensor,
    hc_base: torch.Tensor,
    rms_eps: float = DEFAULTS["rms_eps"],
    hc_pre_eps: float = DEFAULTS["hc_pre_eps"],
    hc_sinkhorn_eps: float = DEFAULTS["hc_sinkhorn_eps"],
    hc_post_mult_value: float = DEFAULTS["hc_post_mult_value"],
    sinkhorn_repeat: int = DEFAULTS["sinkhorn_repeat"],
    norm_weight: torch.Tensor | None = None,
    norm_eps: float = DEFAULTS["norm_eps"],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """mHC ``pre``: mix coefficients and the sublayer input.

    Args:
        residual: (..., n, H) float (bf16 in models).
        fn: (2n+n*n, n*H) fp32 mix projection.
        hc_scale: (3,) fp32; hc_base: (2n+n*n,) fp32.
        norm_weight: optional (H,), the residual's dtype or fp32 (fp64 with an fp64 residual):
            the weight of the sublayer's RMSNorm, fused into the collapse; ``norm_eps`` its eps.
    Returns:
        ``post_mix`` (..., n, 1) fp32, ``comb_mix`` (..., n, n) fp32 (Sinkhorn-normalised,
        ``comb_mix[..., i, j]``: source stream i to destination j) and ``layer_input``
        (..., H) in the residual's dtype: ``c = sum_i pre[..., i] * residual[..., i, :]``
        accumulated in fp32, rounded once. With ``norm_weight``, ``layer_input`` is
        ``c * rsqrt(mean(c**2) + norm_eps) * norm_weight`` computed from the unrounded fp32 ``c``
        and rounded once (transformers' DeepSeek-V4 rounds ``c`` to bf16 first, then the
        normalised row, then the product with its bf16 weight: three roundings to our one).
    """
    lead, r = _flat(residual)
    n, H = r.shape[1], r.shape[2]
    mixes = prenorm_mixes(r, fn, rms_eps)
    pre_w, post_w, comb = mix_activations(
        mixes, hc_scale, hc_base, n, hc_pre_eps, hc_sinkhorn_eps, hc_post_mult_value, sinkhorn_repeat
    )
    layer_input = collapse(r, pre_w, norm_weight, norm_eps)
    return post_w.view(*lead, n, 1), comb.view(*lead, n, n), layer_input.view(*lead, H)


def post(
    x: torch.Tensor, residual: torch.Tensor, post_mix: torch.Tensor, comb_mix: torch.Tensor
) -> torch.Tensor:
    """mHC ``post``: fold the sublayer output back into the n streams.

    ``out[t, j, h] = post_mix[t, j] * x[t, h] + sum_i comb_mix[t, i, j] * residual[t, i, h]``,
    fp32 (fp64) accumulation. ``x`` (..., H), ``residual`` (..., n, H) of one dtype,
    ``post_mix`` (..., n, 1), ``comb_mix`` (..., n, n). Returns (..., n, H) in the residual's dtype.
    """
    lead, r = _flat(residual)
    n, H = r.shape[1], r.shape[2]
    acc = acc_dtype(residual.dtype)
    xs = x.reshape(-1, 1, H).to(acc)
    pm = post_mix.reshape(-1, n, 1).to(acc)
    cm = comb_mix.reshape(-1, n, n).to(acc)
    out = pm * xs + torch.einsum("tij,tih->tjh", cm, r.to(acc))
    return out.to(residual.dtype).view(*lead, n, H)


def head(
    residual: torch.Tensor,
    fn: torch.Tensor,
    hc_scale: torch.Tensor,
    hc_base: torch.Tensor,
    rms_eps: float = DEFAULTS["rms_eps"],
    hc_eps: float = DEFAULTS["hc_eps"],
) -> torch.Tensor:
    """mHC ``head``: collapse the streams once before the LM head.

    ``residual`` (..., n, H); ``fn`` (n, n*H) fp32; ``hc_scale`` (1,) fp32; ``hc_base`` (n,) fp32.
    Weights ``sigmoid(prenorm_mixes * hc_scale[0] + hc_base) + hc_eps``; returns (..., H) in the
    residual's dtype.
    """
    lead, r = _flat(residual)
    H = r.shape[2]
    w = head_activation(prenorm_mixes(r, fn, rms_eps), hc_scale, hc_base, hc_eps)
    return collapse(r, w).view(*lead, H)


def fused_post_pre(
    x: torch.Tensor,
    residual: torch.Tensor,
    post_mix: torch.Tensor,
    comb_mix: torch.Tensor,
    fn: torch.Tensor,
    hc_scale: torch.Tensor,
    hc_base: torch.Tensor,
    rms_eps: float = DEFAULTS["rms_eps"],
    hc_pre_eps: float = DEFAULTS["hc_pre_eps"],
    hc_sinkhorn_eps: float = DEFAULTS["hc_sinkhorn_eps"],
    hc_post_mult_value: float = DEFAULTS["hc_post_mult_value"],
    sinkhorn_repeat: int = DEFAULTS["sinkhorn_repeat"],
    norm_weight: torch.Tensor | None = None,
    norm_eps: float = DEFAULTS["norm_eps"],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``post`` of one sublayer followed by ``pre`` of the next.

    Arguments as :func:`post` then :func:`pre` (``norm_weight``/``norm_eps``: pre's fused
    RMSNorm, applied to ``layer_input`` only). Returns ``(new_residual (..., n, H),
    post_mix (..., n, 1), comb_mix (..., n, n), layer_input (..., H))``. The new residual is
    rounded to the residual's dtype before ``pre`` reads it, as the unfused pair does.
    """
    new = post(x, residual, post_mix, comb_mix)
    return (new, *pre(new, fn, hc_scale, hc_base, rms_eps, hc_pre_eps, hc_sinkhorn_eps,
                      hc_post_mult_value, sinkhorn_repeat, norm_weight, norm_eps))
