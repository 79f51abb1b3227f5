"""``torch.autocast`` changes nothing: every op and every backward op computes the same thing
inside an autocast region as outside (DESIGN.md, "The contract every backend keeps").

Regression: the ops' body ran with autocast on, so the torch backend's prenorm matmul ran in bf16
(pre with an fp32 residual: mixes off by ~1.5e-3, still fp32; fused_post_pre with a bf16
residual: post_mix and comb_mix off by 1.3e-3, over the 1e-3 tolerance).
"""

from __future__ import annotations

import pytest
import torch

import mhc
from mhc import checking, registry

from conftest import DEVICE


def _autocast():
    return torch.autocast(DEVICE.type, dtype=torch.bfloat16)


def _dtypes(backend):
    caps = registry.get(backend).capabilities
    return [d for d in (torch.bfloat16, torch.float32) if d in caps.dtypes]


@pytest.mark.parametrize("op", registry.OPS)
def test_forward_is_the_same_inside_autocast(backend, op):
    for dtype in _dtypes(backend):
        args, kw = checking.make_inputs(op, (3,), 4, 64, dtype, DEVICE, seed=21)
        plain = checking.call(op, args, kw, backend)
        with _autocast():
            auto = checking.call(op, args, kw, backend)
        for (name, _), p, a in zip(checking.OUTPUTS[op], plain, auto):
            assert a.dtype == p.dtype, f"{backend}.{op}.{name} ({dtype}): {a.dtype} under autocast"
            assert torch.equal(a, p), (f"{backend}.{op}.{name} ({dtype}): differs under autocast by "
                                       f"{(a.double() - p.double()).abs().max().item():.2e}")
        for name, err, tol in checking.compare(op, auto, checking.oracle(op, args, kw), dtype):
            assert err <= tol, f"{backend}.{op}.{name} ({dtype}) under autocast: {err:.2e} > {tol:g}"


def _backward_served(backend, op, dtype):
    bwd = "post_backward" if op == "post" else ("head_backward" if op == "head" else "pre_backward")
    return not registry.reasons_for(backend, registry.Problem(bwd, DEVICE, dtype, 4, 64, 3))


@pytest.mark.parametrize("op", registry.OPS)
def test_backward_is_the_same_inside_autocast(backend, op):
    """The backward ops run where loss.backward() is called: inside the region here."""
    ran = False
    for dtype in _dtypes(backend):
        if not _backward_served(backend, op, dtype):
            continue
        ran = True
        args, kw = checking.make_inputs(op, (3,), 4, 64, dtype, DEVICE, seed=22)
        g = torch.Generator().manual_seed(23)
        outs = checking.oracle(op, args, kw)
        grads_out = [torch.randn(o.shape, generator=g, dtype=torch.float64) for o in outs]
        results = []
        for region in (None, _autocast):
            leaves = [a.detach().clone().requires_grad_() for a in args]
            with mhc.use_backend(f"{backend},{op.replace('fused_post_', '')}_backward:{backend}"):
                got = checking.call(op, leaves, kw)
            gos = [go.to(o.dtype).to(o.device) for go, o in zip(grads_out, got)]
            if region is None:
                results.append(torch.autograd.grad(got, leaves, gos))
            else:
                with region():
                    results.append(torch.autograd.grad(got, leaves, gos))
        for i, (p, a) in enumerate(zip(*results)):
            assert a.dtype == p.dtype and torch.equal(a, p), f"{backend}.{op} grad {i} ({dtype}) differs under autocast"
    if not ran:
        pytest.skip(f"{backend} serves no backward op for {op}")
