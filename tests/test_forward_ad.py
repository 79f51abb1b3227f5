"""Forward-mode AD (``torch.autograd.forward_ad``) through both ways in, on every backend that
serves here: every output's tangent is there and matches ``torch.func.jvp`` of the fp64
reference (``mhc.checking.reference_f64``) within the forward tolerances (``mhc.checking.TOLERANCES``:
a tangent is rounded to its output's dtype, as the output is). ``torch.func.jvp`` through the
ops is refused with an error that names it, instead of zero tangents."""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD

import mhc
from mhc import checking, registry

from conftest import DEVICE

H = 64


def _inputs(op: str, norm: bool):
    args, kwargs = checking.make_inputs(op, (2, 3), 4, H, torch.bfloat16, DEVICE, seed=31)
    if norm:
        g = torch.Generator().manual_seed(32)
        kwargs = dict(kwargs, norm_weight=(torch.randn(H, generator=g) * 0.5 + 1).to(DEVICE), norm_eps=1e-5)
    g = torch.Generator().manual_seed(33)
    tangents = [torch.randn(a.shape, generator=g).to(a.dtype).to(DEVICE) for a in args]
    return args, kwargs, tangents


_CASES = [(op, False) for op in registry.OPS] + [("pre", True), ("fused_post_pre", True)]


@pytest.mark.parametrize("op,norm", _CASES, ids=[f"{op}{'-norm' if norm else ''}" for op, norm in _CASES])
@pytest.mark.parametrize("way", ["mhc", "torch.ops"])
def test_forward_ad_tangents_match_the_reference(backend, op, norm, way):
    if norm and op not in registry.get(backend).capabilities.norm_ops:
        pytest.skip(f"{backend} does not fuse the RMSNorm into {op}")
    args, kwargs, tangents = _inputs(op, norm)
    res_dtype = args[1].dtype if op == "fused_post_pre" else args[0].dtype
    f64 = {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    _, want = torch.func.jvp(lambda *a: checking.reference_f64(op, a, f64, res_dtype),
                             tuple(a.double() for a in args), tuple(t.double() for t in tangents))
    f = getattr(mhc, op) if way == "mhc" else getattr(torch.ops.mhc, op)
    with fwAD.dual_level():
        outs = f(*(fwAD.make_dual(a, t) for a, t in zip(args, tangents)), **kwargs, backend=backend)
        outs = outs if isinstance(outs, tuple) else (outs,)
        got = [fwAD.unpack_dual(o).tangent for o in outs]
    for (name, _), t, o in zip(checking.OUTPUTS[op], got, outs):
        assert t is not None, f"{backend}.{op}.{name}: tangent dropped"
        assert t.dtype == o.dtype and t.shape == o.shape, name
    for name, err, tol in checking.compare(op, tuple(got), want, res_dtype):
        assert err <= tol, f"{backend}.{op}.{name} tangent: rel. error {err:.3e} > {tol:g}"


def test_forward_ad_tangent_of_one_input_only(backend):
    """A tangent on ``fn`` alone (the residual has none) still reaches every output of pre."""
    args, kwargs, tangents = _inputs("pre", False)
    _, want = torch.func.jvp(lambda fn: checking.reference_f64("pre", (args[0].double(), fn, *(a.double() for a in args[2:])),
                                                               kwargs, args[0].dtype),
                             (args[1].double(),), (tangents[1].double(),))
    with fwAD.dual_level():
        outs = mhc.pre(args[0], fwAD.make_dual(args[1], tangents[1]), *args[2:], **kwargs, backend=backend)
        got = tuple(fwAD.unpack_dual(o).tangent for o in outs)
    for name, err, tol in checking.compare("pre", got, want, args[0].dtype):
        assert err <= tol, f"{backend}.pre.{name} tangent: rel. error {err:.3e} > {tol:g}"


@pytest.mark.parametrize("way", ["mhc", "torch.ops"])
def test_torch_func_jvp_is_refused_not_zero(way):
    args, kwargs, tangents = _inputs("post", False)
    f = mhc.post if way == "mhc" else torch.ops.mhc.post
    with pytest.raises(NotImplementedError, match="torch.autograd.forward_ad"):
        torch.func.jvp(lambda *a: f(*a, backend="torch"), tuple(args), tuple(tangents))
