"""torch.library.opcheck on every op (schema, fake impl, dynamic-shape AOT dispatch), and
torch.compile(fullgraph=True) tracing a small mHC block with no graph break."""

from __future__ import annotations

import pytest
import torch

import mhc
from mhc import checking, registry


@pytest.mark.parametrize("op", registry.OPS)
@pytest.mark.parametrize("lead", [(3,), (2, 3)])
def test_opcheck(op, lead):
    args, kwargs = checking.make_inputs(op, lead, 4, 32, torch.bfloat16, seed=7)
    torch.library.opcheck(getattr(torch.ops.mhc, op).default, args, kwargs)


def test_opcheck_fp64():
    args, kwargs = checking.make_inputs("fused_post_pre", (3,), 2, 8, torch.float64, seed=8)
    torch.library.opcheck(torch.ops.mhc.fused_post_pre.default, args, kwargs)


def test_compile_fullgraph_block_matches_eager():
    (r, fn, s, b), kw = checking.make_inputs("pre", (5,), 4, 32, torch.bfloat16, seed=9)
    lin = torch.nn.Linear(32, 32, dtype=torch.bfloat16)

    def block(res):
        for _ in range(2):
            post_mix, comb_mix, x = mhc.pre(res, fn, s, b)
            res = mhc.post(lin(x), res, post_mix, comb_mix)
        return res

    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager", dynamic=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(r), block(r), rtol=0, atol=0)


@pytest.mark.parametrize("op", registry.OPS)
def test_wrappers_skip_autograd_only_when_no_gradient_can_flow(op):
    """The public wrappers go below the (Python) autograd kernel when nothing requires grad: same
    outputs, no graph. When an input requires grad they keep the autograd path."""
    args, kwargs = checking.make_inputs(op, (3,), 4, 32, torch.bfloat16, seed=10)
    plain = checking.call(op, args, kwargs)
    assert all(o.grad_fn is None and not o.requires_grad for o in plain)
    via_op = getattr(torch.ops.mhc, op).default(*args, **kwargs)
    for a, b in zip(plain, via_op if isinstance(via_op, tuple) else (via_op,)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    tracked = [a.detach().clone().requires_grad_(i == 0) for i, a in enumerate(args)]
    outs = checking.call(op, tuple(tracked), kwargs)
    assert any(o.grad_fn is not None for o in outs)
    with torch.no_grad():
        assert all(o.grad_fn is None for o in checking.call(op, tuple(tracked), kwargs))
    with torch.inference_mode():
        assert len(checking.call(op, args, kwargs)) == len(plain)
