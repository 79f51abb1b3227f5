"""torch.library.opcheck on every op (schema, fake impl, dynamic-shape AOT dispatch), and
torch.compile(fullgraph=True) tracing a small mHC block with no graph break: forward, and a
training step through the backward ops (the GPU suite compiles a block with inductor per backend)."""

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


@pytest.mark.parametrize("train", [False, True], ids=["forward-bf16", "training-fp32"])
def test_compile_fullgraph_block_matches_eager(train):
    """pre -> Linear -> post twice, then head, compiled with fullgraph=True (a graph break raises)
    and T dynamic: the forward equals eager bitwise; a training step's gradients (through the
    backward ops) equal eager's within fp32 rounding."""
    dtype = torch.float32 if train else torch.bfloat16
    (r, fn, s, b), kw = checking.make_inputs("pre", (5,), 4, 32, dtype, seed=9)
    lin = torch.nn.Linear(32, 32, dtype=dtype)
    hfn = torch.randn(4, 128, generator=torch.Generator().manual_seed(9)) / 12
    hs, hb = torch.ones(1), torch.zeros(4)

    def block(res, fn, s, b):
        for _ in range(2):
            post_mix, comb_mix, x = mhc.pre(res, fn, s, b, **kw)
            res = mhc.post(lin(x), res, post_mix, comb_mix)
        return mhc.head(res, hfn, hs, hb)

    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager", dynamic=True)
    if not train:
        with torch.no_grad():
            torch.testing.assert_close(compiled(r, fn, s, b), block(r, fn, s, b), rtol=0, atol=0)
        return

    def grads(f):
        ins = [a.detach().clone().requires_grad_() for a in (r, fn, s, b)]
        return torch.autograd.grad(f(*ins).square().sum(), ins)

    for c, e in zip(grads(compiled), grads(block)):
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-6)
