"""Input checks shared by every backend: run once in the op layer, before selection.

Each check raises ``TypeError`` (wrong type or dtype) or ``ValueError`` (wrong shape, device,
range) with a message that names the argument and says what was expected. They run on fake
tensors too (the fake impls call them), so a bad call fails at trace time under
``torch.compile``. Backends add their own limits as *reasons* (see ``mhc.registry``), not here.
"""

from __future__ import annotations

import torch

__all__ = ["ACT_DTYPES", "MAX_N", "check_pre", "check_post", "check_head", "check_fused", "mix_dtype"]

#: Residual / activation dtypes the op layer accepts; backends narrow this in their capabilities.
ACT_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
MAX_N = 8


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def mix_dtype(residual_dtype: torch.dtype) -> torch.dtype:
    """dtype of fn, hc_scale, hc_base, post_mix and comb_mix: fp32, or fp64 with an fp64 residual."""
    return torch.float64 if residual_dtype == torch.float64 else torch.float32


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


def _same_device(residual: torch.Tensor, **others: torch.Tensor) -> None:
    dev = residual.device
    for name, t in others.items():
        if t.device != dev:
            raise ValueError(f"{name} is on {t.device} but residual is on {dev}; move them to one device")


def _exact(name: str, t, shape: tuple[int, ...], dtype: torch.dtype, what: str) -> None:
    # Hot path: one shape and one dtype comparison; messages are built only on failure.
    if not isinstance(t, torch.Tensor):
        _tensor(name, t)
    if t.shape != shape:
        raise ValueError(f"{name} must have shape {shape} ({what}), got {tuple(t.shape)}")
    if t.dtype != dtype:
        raise TypeError(f"{name} must be {_name(dtype)}, got {_name(t.dtype)}")


def _weights(fn, hc_scale, hc_base, n: int, H: int, m: int, n_scale: int, mdt: torch.dtype) -> None:
    _exact("fn", fn, (m, n * H), mdt, f"{m} mix rows x n*H")
    _exact("hc_scale", hc_scale, (n_scale,), mdt, f"{n_scale} scales")
    _exact("hc_base", hc_base, (m,), mdt, f"{m} biases")


def _mixes(post_mix, comb_mix, lead: tuple[int, ...], n: int, mdt: torch.dtype) -> None:
    _exact("post_mix", post_mix, (*lead, n, 1), mdt, "residual's leading dims, n, 1")
    _exact("comb_mix", comb_mix, (*lead, n, n), mdt, "residual's leading dims, n, n")


def _pre_scalars(sinkhorn_repeat) -> None:
    if isinstance(sinkhorn_repeat, bool) or not isinstance(sinkhorn_repeat, int) or sinkhorn_repeat < 1:
        raise ValueError(f"sinkhorn_repeat must be an int >= 1, got {sinkhorn_repeat!r}")


def check_pre(residual, fn, hc_scale, hc_base, sinkhorn_repeat) -> tuple[tuple[int, ...], int, int, int]:
    """Validate ``pre``'s tensors; returns ``(lead_dims, T, n, H)``."""
    lead, T, n, H = _residual(residual)
    _weights(fn, hc_scale, hc_base, n, H, 2 * n + n * n, 3, mix_dtype(residual.dtype))
    _same_device(residual, fn=fn, hc_scale=hc_scale, hc_base=hc_base)
    _pre_scalars(sinkhorn_repeat)
    return lead, T, n, H


def check_post(x, residual, post_mix, comb_mix) -> tuple[tuple[int, ...], int, int, int]:
    """Validate ``post``'s tensors; returns ``(lead_dims, T, n, H)``."""
    lead, T, n, H = _residual(residual)
    _exact("x", x, (*lead, H), residual.dtype, "residual's leading dims, H; residual's dtype")
    _mixes(post_mix, comb_mix, lead, n, mix_dtype(residual.dtype))
    _same_device(residual, x=x, post_mix=post_mix, comb_mix=comb_mix)
    return lead, T, n, H


def check_head(residual, fn, hc_scale, hc_base) -> tuple[tuple[int, ...], int, int, int]:
    """Validate ``head``'s tensors; returns ``(lead_dims, T, n, H)``."""
    lead, T, n, H = _residual(residual)
    _weights(fn, hc_scale, hc_base, n, H, n, 1, mix_dtype(residual.dtype))
    _same_device(residual, fn=fn, hc_scale=hc_scale, hc_base=hc_base)
    return lead, T, n, H


def check_fused(x, residual, post_mix, comb_mix, fn, hc_scale, hc_base, sinkhorn_repeat):
    """Validate ``fused_post_pre``'s tensors; returns ``(lead_dims, T, n, H)``."""
    out = check_post(x, residual, post_mix, comb_mix)
    n, H = out[2], out[3]
    _weights(fn, hc_scale, hc_base, n, H, 2 * n + n * n, 3, mix_dtype(residual.dtype))
    _same_device(residual, fn=fn, hc_scale=hc_scale, hc_base=hc_base)
    _pre_scalars(sinkhorn_repeat)
    return out
