"""Input checks shared by every backend: run once in the op layer, before selection.

Each check raises ``TypeError`` (a tensor argument that is not a tensor, a wrong dtype,
``sinkhorn_repeat`` not an int) or ``ValueError`` (wrong shape, device, range) with a message that
names the argument and says what was expected. The float scalars (the eps values,
``hc_post_mult_value``) are checked for range only, with ``ValueError``: their type is the op
schema's (``float``), which the dispatcher enforces with a ``TypeError`` before these checks run. They run on fake
tensors too (the fake impls call them), so a bad call fails at trace time under
``torch.compile``. Backends add their own limits as *reasons* (see ``mhc.registry``), not here.
"""

from __future__ import annotations

import math

import torch

# The dtype of fn, hc_scale, hc_base, post_mix and comb_mix for a residual dtype is the reference's
# accumulation dtype (fp32, or fp64 with an fp64 residual): one rule, one home.
from mhc.reference import acc_dtype as mix_dtype
from mhc.reference import DEFAULTS as _D  # the scalars' defaults (one home)

__all__ = ["ACT_DTYPES", "MIX_DTYPES", "MAX_N", "MAX_SINKHORN_REPEAT", "check_pre", "check_post", "check_head", "check_fused",
           "check_sinkhorn_repeat", "check_norm", "check_tensor", "check_backend", "non_dense", "mix_dtype"]

#: Residual / activation dtypes the op layer accepts; backends narrow this in their capabilities.
ACT_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
#: The mix dtype of each accepted residual dtype (:func:`mix_dtype`), for lookups in hot paths.
MIX_DTYPES = {d: mix_dtype(d) for d in ACT_DTYPES}
MAX_N = 8
#: Largest ``sinkhorn_repeat`` accepted. DeepSeek-V4 uses 20 and the normalisation has converged
#: to fp32 precision long before 1000; the bound keeps a typo (10**9) from running for minutes
#: and every value inside a C int (the kernels' loop counter).
MAX_SINKHORN_REPEAT = 1000


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def _residual(residual) -> tuple[tuple[int, ...], int, int, int]:
    if not isinstance(residual, torch.Tensor):
        _tensor("residual", residual)
    shape = residual.shape
    if len(shape) < 2:
        raise ValueError(f"residual must have shape (..., n, H), got {tuple(shape)}")
    if residual.dtype not in ACT_DTYPES:
        raise TypeError(
            f"residual dtype {_name(residual.dtype)} unsupported; use one of "
            + ", ".join(_name(d) for d in ACT_DTYPES)
        )
    lead, n, H = shape[:-2], shape[-2], shape[-1]
    if not 1 <= n <= MAX_N:
        raise ValueError(f"residual: n (dim -2, the stream count) must be in [1, {MAX_N}], got {n}")
    if H < 1:
        raise ValueError(f"residual: H (dim -1) must be >= 1, got {H}")
    T = lead[0] if len(lead) == 1 else lead.numel()
    return tuple(lead), T, n, H


def _device(name: str, t: torch.Tensor, device: torch.device) -> None:
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but residual is on {device}; move them to one device")


def _same_device(residual: torch.Tensor, **others: torch.Tensor) -> None:
    for name, t in others.items():
        _device(name, t, residual.device)


def check_tensor(name: str, t, shape: tuple[int, ...], dtype: torch.dtype, what: str,
                 device: torch.device | None = None) -> None:
    """``t`` is a tensor of exactly ``shape`` (described by ``what``) and ``dtype``, and on
    ``device`` if one is given (the residual's); the error names ``name``."""
    # Hot path: one shape and one dtype comparison; messages are built only on failure.
    if not isinstance(t, torch.Tensor):
        _tensor(name, t)
    if t.shape != shape:
        raise ValueError(f"{name} must have shape {shape} ({what}), got {tuple(t.shape)}")
    if t.dtype != dtype:
        raise TypeError(f"{name} must be {_name(dtype)}, got {_name(t.dtype)}")
    if device is not None:
        _device(name, t, device)


def _weights(fn, hc_scale, hc_base, n: int, H: int, m: int, n_scale: int, mdt: torch.dtype) -> None:
    check_tensor("fn", fn, (m, n * H), mdt, f"{m} mix rows x n*H")
    check_tensor("hc_scale", hc_scale, (n_scale,), mdt, f"{n_scale} scales")
    check_tensor("hc_base", hc_base, (m,), mdt, f"{m} biases")


def _mixes(post_mix, comb_mix, lead: tuple[int, ...], n: int, mdt: torch.dtype) -> None:
    check_tensor("post_mix", post_mix, (*lead, n, 1), mdt, "residual's leading dims, n, 1")
    check_tensor("comb_mix", comb_mix, (*lead, n, n), mdt, "residual's leading dims, n, n")


def check_sinkhorn_repeat(sinkhorn_repeat) -> None:
    """``sinkhorn_repeat`` is an int (not a bool) in [1, MAX_SINKHORN_REPEAT]. The Python API
    checks it before dispatch too, where the dispatcher would take ``True`` as 1 and reject
    ``2**63`` with an unreadable message."""
    if isinstance(sinkhorn_repeat, bool) or not isinstance(sinkhorn_repeat, int):
        raise TypeError(f"sinkhorn_repeat must be an int in [1, {MAX_SINKHORN_REPEAT}], got {sinkhorn_repeat!r} "
                        f"({type(sinkhorn_repeat).__name__})")
    if not 1 <= sinkhorn_repeat <= MAX_SINKHORN_REPEAT:
        raise ValueError(f"sinkhorn_repeat must be an int in [1, {MAX_SINKHORN_REPEAT}], got {sinkhorn_repeat!r}")


def _eps(name: str, value) -> None:
    # Negative eps gave finite garbage (torch) or an all-NaN comb (Triton). Symbolic floats
    # (torch.compile) are not checked here: they were checked where they were concrete.
    if isinstance(value, (int, float)) and not 0.0 <= value < math.inf:  # NaN fails too
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def _pre_scalars(sinkhorn_repeat, rms_eps, hc_pre_eps, hc_sinkhorn_eps, hc_post_mult_value) -> None:
    # Hot path: the usual call (an int and plain floats in range) in a few comparisons, a third of
    # the cost of the calls below, which find the argument to name otherwise.
    if (sinkhorn_repeat.__class__ is int and 1 <= sinkhorn_repeat <= MAX_SINKHORN_REPEAT
            and rms_eps.__class__ is float and 0.0 <= rms_eps < math.inf
            and hc_pre_eps.__class__ is float and 0.0 <= hc_pre_eps < math.inf
            and hc_sinkhorn_eps.__class__ is float and 0.0 <= hc_sinkhorn_eps < math.inf
            and hc_post_mult_value.__class__ is float and -math.inf < hc_post_mult_value < math.inf):
        return
    check_sinkhorn_repeat(sinkhorn_repeat)
    _eps("rms_eps", rms_eps)
    _eps("hc_pre_eps", hc_pre_eps)
    _eps("hc_sinkhorn_eps", hc_sinkhorn_eps)
    if isinstance(hc_post_mult_value, (int, float)) and not -math.inf < hc_post_mult_value < math.inf:
        raise ValueError(f"hc_post_mult_value must be finite, got {hc_post_mult_value!r}")


def check_norm(norm_weight, norm_eps, residual: torch.Tensor, H: int) -> None:
    """The fused RMSNorm's arguments of ``pre``/``fused_post_pre``: ``norm_weight`` None or a
    (H,) tensor in the residual's dtype or the mix dtype (fp32; fp64 with an fp64 residual) on
    the residual's device; ``norm_eps`` finite and >= 0 (checked whether or not a weight is given)."""
    if norm_eps.__class__ is not float or not 0.0 <= norm_eps < math.inf:
        _eps("norm_eps", norm_eps)
    if norm_weight is None:
        return
    if not isinstance(norm_weight, torch.Tensor):
        _tensor("norm_weight", norm_weight)
    if norm_weight.shape != (H,):
        raise ValueError(f"norm_weight must have shape ({H},) (H, the residual's last dim), "
                         f"got {tuple(norm_weight.shape)}")
    mdt = mix_dtype(residual.dtype)
    if norm_weight.dtype != residual.dtype and norm_weight.dtype != mdt:
        allowed = _name(residual.dtype) + ("" if mdt == residual.dtype else f" (the residual's dtype) or {_name(mdt)}")
        raise TypeError(f"norm_weight must be {allowed}, got {_name(norm_weight.dtype)}")
    if norm_weight.device != residual.device:
        raise ValueError(f"norm_weight is on {norm_weight.device} but residual is on {residual.device}; "
                         "move them to one device")


def check_backend(backend) -> None:
    """``backend`` is None (the current selection) or a non-empty str (a name, or "auto")."""
    if backend is not None and not isinstance(backend, str):
        raise TypeError(f"backend must be a str (a backend name or 'auto') or None, got {type(backend).__name__}")
    if backend == "":
        raise ValueError("backend='' names no backend: pass None for the current selection, 'auto', "
                         "or a backend name (mhc.list_backends())")


def non_dense(names, args, kwargs) -> TypeError | None:
    """The ``TypeError`` for the first sparse or nested tensor among ``args`` (named by ``names``,
    the schema's argument names) and ``kwargs``, or None. Used where such tensors are refused:
    the op's kernels at the sparse and nested dispatch keys (``mhc.ops``), and the Python API."""
    for name, t in (*zip(names, args), *kwargs.items()):
        if isinstance(t, torch.Tensor) and (t.is_nested or t.layout != torch.strided):
            kind = "a nested tensor" if t.is_nested else f"a tensor of layout {t.layout}"
            return TypeError(f"{name} must be a dense (strided) torch.Tensor, got {kind}; convert it first "
                             "(e.g. .to_dense() or .unbind())")
    return None


def _weights_ok(fn, hc_scale, hc_base, shapes: tuple, mdt: torch.dtype, dev: torch.device) -> bool:
    """The usual call's parameters in one expression (the hot path, about half the time of the
    checks that name the argument, which run when this is False)."""
    return (isinstance(fn, torch.Tensor) and isinstance(hc_scale, torch.Tensor) and isinstance(hc_base, torch.Tensor)
            and fn.shape == shapes[0] and hc_scale.shape == shapes[1] and hc_base.shape == shapes[2]
            and fn.dtype == mdt and hc_scale.dtype == mdt and hc_base.dtype == mdt
            and fn.device == dev and hc_scale.device == dev and hc_base.device == dev)


def _check_weights(residual, fn, hc_scale, hc_base, n: int, H: int, m: int, n_scale: int) -> None:
    mdt = mix_dtype(residual.dtype)
    if not _weights_ok(fn, hc_scale, hc_base, ((m, n * H), (n_scale,), (m,)), mdt, residual.device):
        _weights(fn, hc_scale, hc_base, n, H, m, n_scale, mdt)
        _same_device(residual, fn=fn, hc_scale=hc_scale, hc_base=hc_base)


def check_pre(residual, fn, hc_scale, hc_base, sinkhorn_repeat, rms_eps=_D["rms_eps"],
              hc_pre_eps=_D["hc_pre_eps"], hc_sinkhorn_eps=_D["hc_sinkhorn_eps"],
              hc_post_mult_value=_D["hc_post_mult_value"], norm_weight=None,
              norm_eps=_D["norm_eps"]) -> tuple[tuple[int, ...], int, int, int]:
    """Validate ``pre``'s arguments; returns ``(lead_dims, T, n, H)``."""
    lead, T, n, H = _residual(residual)
    _check_weights(residual, fn, hc_scale, hc_base, n, H, 2 * n + n * n, 3)
    _pre_scalars(sinkhorn_repeat, rms_eps, hc_pre_eps, hc_sinkhorn_eps, hc_post_mult_value)
    check_norm(norm_weight, norm_eps, residual, H)
    return lead, T, n, H


def check_post(x, residual, post_mix, comb_mix) -> tuple[tuple[int, ...], int, int, int]:
    """Validate ``post``'s tensors; returns ``(lead_dims, T, n, H)``."""
    lead, T, n, H = _residual(residual)
    mdt, dev = mix_dtype(residual.dtype), residual.device
    if not (isinstance(x, torch.Tensor) and isinstance(post_mix, torch.Tensor) and isinstance(comb_mix, torch.Tensor)
            and x.shape == (*lead, H) and post_mix.shape == (*lead, n, 1) and comb_mix.shape == (*lead, n, n)
            and x.dtype == residual.dtype and post_mix.dtype == mdt and comb_mix.dtype == mdt
            and x.device == dev and post_mix.device == dev and comb_mix.device == dev):
        check_tensor("x", x, (*lead, H), residual.dtype, "residual's leading dims, H; residual's dtype")
        _mixes(post_mix, comb_mix, lead, n, mdt)
        _same_device(residual, x=x, post_mix=post_mix, comb_mix=comb_mix)
    return lead, T, n, H


def check_head(residual, fn, hc_scale, hc_base, rms_eps=_D["rms_eps"],
               hc_eps=_D["hc_eps"]) -> tuple[tuple[int, ...], int, int, int]:
    """Validate ``head``'s arguments; returns ``(lead_dims, T, n, H)``."""
    lead, T, n, H = _residual(residual)
    _check_weights(residual, fn, hc_scale, hc_base, n, H, n, 1)
    _eps("rms_eps", rms_eps)
    _eps("hc_eps", hc_eps)
    return lead, T, n, H


def check_fused(x, residual, post_mix, comb_mix, fn, hc_scale, hc_base, sinkhorn_repeat, rms_eps=_D["rms_eps"],
                hc_pre_eps=_D["hc_pre_eps"], hc_sinkhorn_eps=_D["hc_sinkhorn_eps"],
                hc_post_mult_value=_D["hc_post_mult_value"], norm_weight=None, norm_eps=_D["norm_eps"]):
    """Validate ``fused_post_pre``'s arguments; returns ``(lead_dims, T, n, H)``."""
    out = check_post(x, residual, post_mix, comb_mix)
    n, H = out[2], out[3]
    _check_weights(residual, fn, hc_scale, hc_base, n, H, 2 * n + n * n, 3)
    _pre_scalars(sinkhorn_repeat, rms_eps, hc_pre_eps, hc_sinkhorn_eps, hc_post_mult_value)
    check_norm(norm_weight, norm_eps, residual, H)
    return out
