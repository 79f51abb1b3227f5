"""Stand-in for AMD AITER's ``aiter.ops.mhc``: its API and quirks, with ``mhc.reference``'s math.

It lets the tests check mhc's *adapter* (``mhc/backends/aiter.py``) on a CPU; it says nothing
about AMD's kernels. The math is imported from ``mhc.reference`` (never restated here); what this
module adds is AITER's calling convention and the quirks of the release named by the installed
``amd-aiter`` metadata:

- every release: ``mhc_pre(residual, fn, hc_scale, hc_base, rms_eps, hc_pre_eps, hc_sinkhorn_eps,
  hc_post_mult_value, sinkhorn_repeat)`` returns ``(post_mix (m,4,1) fp32, comb_mix (m,4,4) fp32,
  layer_input (m,H) bf16)``; ``mhc_post(out, x, residual, post_layer_mix, comb_res_mix)`` writes
  ``out`` and returns None; ``assert`` for n != 4, H % 256 != 0, non-bf16 residual; a
  ``ZeroDivisionError`` at m == 0 (AITER's split-K heuristic divides by ``ceil(0)``);
- <= 0.1.13: outputs are allocated with ``torch.empty(shape, dtype=...)`` and no ``device=``, so
  they land on torch's *default* device; ``fn`` must have the full 2n+n*n rows (no compact head);
- >= 0.1.14: outputs on ``residual.device``; ``sinkhorn_repeat=0`` with an (n, n*H) ``fn`` computes
  only ``layer_input`` (head); ``post_mix``/``comb_mix`` are then left unwritten (NaN here);
- >= 0.1.15: ``mhc_pre(..., norm_weight=None, norm_eps=1e-6)``: with a weight, the sublayer's
  RMSNorm fused into the collapse (``mhc_pre_big_fuse_rmsnorm``), computed as AITER's kernel does
  (csrc/kernels/mhc_kernels.cu, the same from v0.1.15 to v0.1.20.post1): the collapse ``c`` is
  summed in fp32 and *rounded to bf16* into shared memory; the sum of squares is taken of the
  unrounded fp32 ``c``; ``rms = rsqrtf(sumsq / H + norm_eps)`` (no NaN for an overflowed sum:
  rsqrt(inf) = 0); ``out = bf16(float(bf16(c)) * float(w) * rms)``, the weight read as bf16 (the
  kernel's element type is the output's: the buffer's bytes are read as bf16 whatever the tensor's
  dtype, with no check); H must be 1280, 2560, 4096 or 7168 (a RuntimeError otherwise, AITER's
  ``AITER_CHECK``). So two roundings to bf16 where mhc's contract has one;
- >= 0.1.16: ``mhc_fused_post_pre(layer_input, residual_in, post_layer_mix, comb_res_mix, fn,
  hc_scale, hc_base, <pre's scalars>, norm_weight=None, norm_eps=1e-6)`` returning
  ``(post_mix, comb_mix, layer_input_out, next_residual)`` — note the order; the norm as in
  ``mhc_pre``.

``CALLS`` records each entry point called, with the facts tests check (rows of fn,
sinkhorn_repeat), so a test can tell which AITER path the adapter took.
"""

import importlib.metadata as _md
import math
import re

import torch

from mhc import reference

VERSION = tuple(int(v) for v in re.match(r"(\d+)\.(\d+)\.(\d+)", _md.version("amd-aiter")).groups())
CALLS = []

_DEVICE_AWARE = VERSION >= (0, 1, 14)
_COMPACT_HEAD = VERSION >= (0, 1, 14)
_NORM = VERSION >= (0, 1, 15)
_NORM_H = (1280, 2560, 4096, 7168)  # mhc_pre_big_fuse_rmsnorm's kernel instances


def _split_k(m, hc_hidden_size):
    # The shape of AITER's split-K heuristic (get_mhc_pre_splitk): a fill score normalised by
    # its own ceiling, which is 0 when m == 0 -> ZeroDivisionError, as in AITER.
    num_cu, tile_m = 80, 64
    num_tg_m = (m + tile_m - 1) // tile_m
    score = num_tg_m / (4 * num_cu)
    return score / math.ceil(score)


def _alloc(shape, dtype, device):
    if _DEVICE_AWARE:
        return torch.empty(shape, dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype)  # <= 0.1.13: follows torch's default device


def _check(residual, x=None):
    m, hc_mult, hidden_size = residual.shape
    assert hc_mult == 4, f"hc_mult must be 4, got {hc_mult}"
    assert hidden_size % 256 == 0, f"hidden_size must be a multiple of 256, got {hidden_size}"
    assert residual.dtype == torch.bfloat16
    assert x is None or x.shape == (m, hidden_size)
    _split_k(m, hc_mult * hidden_size)
    return m, hc_mult, hidden_size


def _rmsnorm(residual, pre_w, norm_weight, norm_eps):
    """``mhc_pre_big_fuse_rmsnorm``'s layer_input (see the module docstring): (m, H) bf16."""
    H = residual.shape[2]
    if H not in _NORM_H:
        raise RuntimeError("hidden_size only supports 7168, 4096, 2560 and 1280")
    c = reference.collapse(residual.float(), pre_w)  # fp32 in, fp32 out: the unrounded sum
    w = norm_weight.contiguous().view(torch.uint8)[: 2 * H].view(torch.bfloat16).float()
    rms = torch.rsqrt(c.square().sum(-1, keepdim=True) / H + norm_eps)
    return (c.bfloat16().float() * w * rms).bfloat16()


def _pre(residual, fn, hc_scale, hc_base, rms_eps, hc_pre_eps, hc_sinkhorn_eps, hc_post_mult_value,
         sinkhorn_repeat, norm_weight, norm_eps):
    """``(post_mix, comb_mix, layer_input)`` of pre's full layout, AITER's norm if a weight is given."""
    n = residual.shape[1]
    if norm_weight is None:
        return reference.pre(residual, fn, hc_scale, hc_base, rms_eps, hc_pre_eps, hc_sinkhorn_eps,
                             hc_post_mult_value, sinkhorn_repeat)
    mixes = reference.prenorm_mixes(residual, fn, rms_eps)
    pre_w, post_w, comb = reference.mix_activations(mixes, hc_scale, hc_base, n, hc_pre_eps, hc_sinkhorn_eps,
                                                    hc_post_mult_value, sinkhorn_repeat)
    return post_w.unsqueeze(-1), comb, _rmsnorm(residual, pre_w, norm_weight, norm_eps)


def mhc_pre(residual, fn, hc_scale, hc_base, rms_eps=1e-6, hc_pre_eps=1e-6, hc_sinkhorn_eps=1e-6,
            hc_post_mult_value=1.0, sinkhorn_repeat=20, norm_weight=None, norm_eps=1e-6):
    if norm_weight is not None and not _NORM:  # releases before 0.1.15 have no such parameter
        raise TypeError("mhc_pre() got an unexpected keyword argument 'norm_weight'")
    m, n, H = _check(residual)
    rows = fn.size(0)
    if _COMPACT_HEAD:
        assert rows == 2 * n + n * n or (rows == n and sinkhorn_repeat == 0)
    else:
        assert rows == 2 * n + n * n
    CALLS.append(("mhc_pre", {"rows": rows, "sinkhorn_repeat": sinkhorn_repeat, "norm": norm_weight is not None}))
    post_mix = _alloc((m, n, 1), torch.float32, residual.device)
    comb_mix = _alloc((m, n, n), torch.float32, residual.device)
    layer_input = _alloc((m, H), torch.bfloat16, residual.device)
    if rows == n:  # head: pre weights only, no post, no comb, no Sinkhorn
        w = reference.head_activation(reference.prenorm_mixes(residual, fn, rms_eps), hc_scale, hc_base, hc_pre_eps)
        layer_input.copy_(reference.collapse(residual, w))
        post_mix.fill_(float("nan"))
        comb_mix.fill_(float("nan"))
    else:
        p, c, li = _pre(residual, fn, hc_scale, hc_base, rms_eps, hc_pre_eps, hc_sinkhorn_eps, hc_post_mult_value,
                        sinkhorn_repeat, norm_weight, norm_eps)
        post_mix.copy_(p)
        comb_mix.copy_(c)
        layer_input.copy_(li)
    return post_mix, comb_mix, layer_input


def mhc_post(out, x, residual, post_layer_mix, comb_res_mix, store_nt=-1):
    _check(residual, x)
    assert out.shape == residual.shape and out.dtype == residual.dtype
    CALLS.append(("mhc_post", {}))
    out.copy_(reference.post(x, residual, post_layer_mix, comb_res_mix))


if VERSION >= (0, 1, 16):

    def mhc_fused_post_pre(layer_input, residual_in, post_layer_mix, comb_res_mix, fn, hc_scale, hc_base,
                           rms_eps=1e-6, hc_pre_eps=1e-6, hc_sinkhorn_eps=1e-6, hc_post_mult_value=1.0,
                           sinkhorn_repeat=20, norm_weight=None, norm_eps=1e-6):
        m, n, H = _check(residual_in, layer_input)
        assert fn.size(0) == 2 * n + n * n
        CALLS.append(("mhc_fused_post_pre", {"rows": fn.size(0), "sinkhorn_repeat": sinkhorn_repeat,
                                             "norm": norm_weight is not None}))
        new = reference.post(layer_input, residual_in, post_layer_mix, comb_res_mix)
        p, c, li = _pre(new, fn, hc_scale, hc_base, rms_eps, hc_pre_eps, hc_sinkhorn_eps, hc_post_mult_value,
                        sinkhorn_repeat, norm_weight, norm_eps)
        dev = residual_in.device
        outs = (_alloc((m, n, 1), torch.float32, dev), _alloc((m, n, n), torch.float32, dev),
                _alloc((m, H), torch.bfloat16, dev), torch.empty_like(residual_in))
        for o, v in zip(outs, (p, c, li, new)):
            o.copy_(v)
        return outs
