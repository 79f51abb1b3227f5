"""Backends and the helpers they share.

Every backend module exposes ``BACKEND``, an :class:`mhc.registry.Backend` record, and imports
nothing optional at module level. Its ``load()`` returns an object with these four callables,
which the op layer (``mhc/ops.py``) calls after validation, with T >= 1 and every tensor
contiguous and on one device:

``pre(residual, fn, hc_scale, hc_base, rms_eps, hc_pre_eps, hc_sinkhorn_eps, hc_post_mult_value, sinkhorn_repeat)``
    ``residual`` (T, n, H); ``fn`` (2n+n*n, n*H); ``hc_scale`` (3,); ``hc_base`` (2n+n*n,).
    Returns ``post_mix`` (T, n, 1), ``comb_mix`` (T, n, n) in fn's dtype, ``layer_input`` (T, H)
    in the residual's dtype.
    With the fused RMSNorm (``Capabilities.norm_ops``), two more positional arguments follow,
    ``norm_weight`` (H,) (the residual's dtype or fp32) and ``norm_eps``; they are passed only
    when a norm weight is given, likewise to ``fused_post_pre`` and (with ``norm_weight_grad``
    third, and a fifth gradient returned) to ``pre_backward``.
``post(x, residual, post_mix, comb_mix)``
    ``x`` (T, H); ``residual`` (T, n, H); ``post_mix`` (T, n, 1); ``comb_mix`` (T, n, n).
    Returns (T, n, H) in the residual's dtype.
``head(residual, fn, hc_scale, hc_base, rms_eps, hc_eps)``
    ``fn`` (n, n*H); ``hc_scale`` (1,); ``hc_base`` (n,). Returns (T, H).
``fused_post_pre(x, residual, post_mix, comb_mix, fn, hc_scale, hc_base, rms_eps, hc_pre_eps, hc_sinkhorn_eps, hc_post_mult_value, sinkhorn_repeat)``
    Returns ``(new_residual (T, n, H), post_mix, comb_mix, layer_input)``.

Every backend returns its outputs on the input's device, as tensors of their own (no view, no
alias of an input or of another output: DESIGN.md), and GPU backends launch inside
:func:`device_guard`. The Triton and TileLang launchers allocate their outputs with :func:`empty`
or :func:`empty_like`, so that tests can poison them (an element a kernel never writes then shows
as NaN). The others do not: the torch backend returns the tensors that its PyTorch math
(``mhc.reference``, ``mhc.backward``) makes, and AITER allocates ``pre``'s, ``head``'s and its
fused op's outputs itself (only ``post``'s ``out`` and the T == 0 outputs come from
:func:`empty`), so poisoning does not reach those.
"""

from __future__ import annotations

import contextlib

# Aliased: importing the submodule mhc.backends.torch (the torch backend's record) sets the
# attribute ``torch`` of this package, which is this module's global namespace, and would
# shadow ``import torch`` here (torch.empty -> AttributeError on mhc.backends.torch).
import torch as _torch

from mhc import state as _state
from mhc import torch_private as _torch_private

__all__ = ["empty", "empty_like", "device_guard"]


def _plain_empty(shape, dtype: _torch.dtype, device: _torch.device) -> _torch.Tensor:
    # empty_strided: torch.empty's argument parser tries several overloads first, which costs
    # more than computing the contiguous strides here.
    if len(shape) == 2:
        strides = (shape[1], 1)
    elif len(shape) == 3:
        strides = (shape[1] * shape[2], shape[2], 1)
    else:
        return _torch.empty(shape, dtype=dtype, device=device)
    return _torch.empty_strided(shape, strides, dtype=dtype, device=device)


# Tests swap this for an allocator that fills outputs with NaN, so that an element a kernel
# forgets to write shows up in the comparison. One indirection, no cost worth measuring.
_ALLOCATOR = _plain_empty


def _reset_allocator() -> None:
    global _ALLOCATOR
    _ALLOCATOR = _plain_empty


_state.register("backends.allocator", _ALLOCATOR, "(a switch: mhc.backends._ALLOCATOR)", _reset_allocator)


def empty(shape, dtype: _torch.dtype, device: _torch.device) -> _torch.Tensor:
    """Allocate an output tensor of ``shape``/``dtype`` on ``device`` (never the current device)."""
    return _ALLOCATOR(shape, dtype, device)


def empty_like(t: _torch.Tensor) -> _torch.Tensor:
    """:func:`empty` of ``t``'s shape, dtype and device, for a contiguous ``t`` (an output shaped
    as an input): ``torch.empty_like`` skips the shape's parsing, about half the host cost of
    ``torch.empty``."""
    if _ALLOCATOR is _plain_empty:
        return _torch.empty_like(t)
    return _ALLOCATOR(t.shape, t.dtype, t.device)


_NO_SWITCH = contextlib.nullcontext()
_cuda_current_device = _torch_private.cuda_current_device


def device_guard(device: _torch.device):
    """A context that makes ``device`` current for the launches inside it (a no-op off CUDA, and
    where ``device`` is current already: the usual call, which then costs no device switch).
    ``device``: a CUDA device (one with an index) or the CPU.

    Triton and TileLang launch on the *current* device, so without this a tensor on ``cuda:1``
    would be processed by a launch on ``cuda:0``'s stream.
    """
    # The usual call in few steps: a CPU device (the interpreter) has no index, and device.type
    # (a new string per read) costs more than the rest together; _cuda_getDevice is
    # torch.cuda.current_device() less its lazy init, which a CUDA tensor has done.
    index = device.index
    if index is None or index == _cuda_current_device() or device.type != "cuda":
        return _NO_SWITCH
    return _torch.cuda.device(device)
