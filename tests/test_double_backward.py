"""Double backward (``create_graph=True``): served by backends whose backward ops are
differentiable (torch), refused with a reason by the others, never a silent None.

Regression: with ``post_backward:triton`` the second-order gradient was None, with only PyTorch's
"autograd kernel was not registered" warning.
"""

from __future__ import annotations

import pytest
import torch

import mhc
from mhc import checking, registry
from mhc.registry import BackendError

from conftest import DEVICE, backend_reasons

pytestmark = pytest.mark.filterwarnings("ignore:.*an autograd kernel was not registered:UserWarning")

BWD = {"pre": "pre_backward", "post": "post_backward", "head": "head_backward"}


def _first_grad(op, backend_spec, dtype, seed=61):
    """(leaves, first-order gradients with create_graph=True) of ``op`` under ``backend_spec``."""
    args, kw = checking.make_inputs(op, (3,), 4, 32, dtype, DEVICE, seed=seed)
    leaves = [a.detach().clone().requires_grad_() for a in args]
    with mhc.use_backend(backend_spec):
        outs = checking.call(op, leaves, kw)
    g = torch.Generator().manual_seed(seed + 1)
    gos = [torch.randn(o.shape, generator=g).to(o.dtype).to(DEVICE) for o in outs]
    return leaves, torch.autograd.grad(outs, leaves, gos, create_graph=True)


@pytest.mark.parametrize("op", ["pre", "post", "head"])
def test_non_differentiable_backward_kernels_refuse_create_graph(op):
    if backend_reasons("triton", BWD[op]):
        pytest.skip("triton cannot serve here: " + "; ".join(backend_reasons("triton", BWD[op])))
    with pytest.raises(BackendError) as e:
        _first_grad(op, f"{BWD[op]}:triton", torch.bfloat16)
    msg = str(e.value)
    assert "triton" in msg and "create_graph=True" in msg and "double backward" in msg and "torch" in msg, msg


@pytest.mark.parametrize("op", ["pre", "post", "head"])
def test_plain_backward_still_uses_the_kernels(op):
    """Without create_graph the Triton backward serves as before."""
    if backend_reasons("triton", BWD[op]):
        pytest.skip("triton cannot serve here")
    args, kw = checking.make_inputs(op, (3,), 4, 32, torch.bfloat16, DEVICE, seed=62)
    leaves = [a.detach().clone().requires_grad_() for a in args]
    with mhc.use_backend(f"{BWD[op]}:triton"):
        outs = checking.call(op, leaves, kw)
    grads = torch.autograd.grad(outs, leaves, [torch.ones_like(o) for o in outs])
    assert all(g is not None and g.isfinite().all() for g in grads)


def test_auto_moves_on_to_a_backend_that_can(monkeypatch):
    """auto skips a backend whose backward kernels cannot record history, for that call only."""
    if backend_reasons("triton", "post_backward"):
        pytest.skip("triton cannot serve here")
    monkeypatch.setattr(registry, "auto_order", lambda platform, op, T: ("triton", "torch"))
    registry._STATE.decisions.clear()
    try:
        leaves, (gx, *_) = _first_grad("post", "post_backward:auto", torch.bfloat16)
        assert gx.requires_grad
        (gg,) = torch.autograd.grad(gx.float().square().sum(), leaves[2])  # d/d post_mix of |grad_x|^2
        assert gg is not None and gg.isfinite().all() and gg.abs().sum() > 0
        p = registry.Problem("post_backward", DEVICE, torch.bfloat16, 4, 32, 3, create_graph=True)
        ex = registry.explain_problem(p, "auto")
        assert ex.chosen == "torch" and any("double backward" in w for w in ex.reasons["triton"])
    finally:
        registry._STATE.decisions.clear()


@pytest.mark.parametrize("op", ["post", "head"])
def test_torch_backend_double_backward_is_right(op):
    """gradgradcheck in fp64 through the torch backend's backward ops."""
    args, kw = checking.make_inputs(op, (2,), 2, 3, torch.float64, seed=63)
    leaves = [a.detach().clone().requires_grad_() for a in args]
    with mhc.use_backend(f"torch,{BWD[op]}:torch"):
        assert torch.autograd.gradgradcheck(lambda *a: getattr(mhc, op)(*a, **kw), leaves)
