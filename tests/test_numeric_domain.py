"""The numeric domain (DESIGN.md): a token whose fp32 sum of squares overflows gets NaN outputs
from everything its RMS factor feeds, on every backend; tokens just inside the domain, and the
other tokens of the same call, stay exact.

Regression: the RMS factor was ``rsqrt(inf) = 0``, so every mix of such a token was 0 and the
outputs finite and plausible (``post_mix == 2 * sigmoid(hc_base)`` exactly, 32-42 % off the fp64
value) at |x| ~ 1.4e17 for n = 4, H = 4096.
"""

from __future__ import annotations

import pytest
import torch

from mhc import checking, registry

from conftest import DEVICE

FLT_MAX = torch.finfo(torch.float32).max
#: Per token, the fp64 sum of squares of the RMS-normalised input as a multiple of FLT_MAX: an
#: ordinary token (None: left as drawn), then either side of the edge, near and far.
TARGETS = (None, 1.1, 0.9, 4.0, 0.25)
N, H = 4, 32
#: Token counts that take the Triton kernels' different paths: T = 1 (the last program's tail),
#: T = 5 (chunked), T = 130 (the two-pass path); TARGETS repeat over the tokens.
T_VALUES = (1, 5, 130)


def _targets(T):
    return (4.0,) if T == 1 else tuple(TARGETS[t % len(TARGETS)] for t in range(T))


def _pre_input(op, args, kw):
    """What the RMS factor is computed from, in fp64: the residual, or fused's rounded new residual."""
    if op == "fused_post_pre":
        return checking.oracle("post", args[:4], {})[0].to(args[1].dtype).double()
    return args[0].double()


def _scaled_inputs(op, targets, seed):
    """Inputs whose token t has a sum of squares of targets[t] * FLT_MAX (fused: of the new
    residual, by scaling x and the old residual of that token together)."""
    args, kw = checking.make_inputs(op, (len(targets),), N, H, torch.bfloat16, "cpu", seed=seed)
    ssq = _pre_input(op, args, kw).square().sum((-2, -1))
    scale = torch.tensor([1.0 if t is None else (t * FLT_MAX / s.item()) ** 0.5 for t, s in zip(targets, ssq)],
                         dtype=torch.float64)
    args = list(args)
    acts = (0, 1) if op == "fused_post_pre" else (0,)
    for i in acts:
        shape = (-1,) + (1,) * (args[i].dim() - 1)
        args[i] = (args[i].double() * scale.view(shape)).to(args[i].dtype)
    ssq = _pre_input(op, args, kw).square().sum((-2, -1)) / FLT_MAX  # after bf16 rounding
    return args, kw, ssq


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the Triton interpreter's numpy
@pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning")
@pytest.mark.parametrize("T", T_VALUES)
@pytest.mark.parametrize("op", ["pre", "head", "fused_post_pre"])
def test_overflowing_sum_of_squares_gives_nan_for_that_token_only(backend, op, T):
    if registry.reasons_for(backend, registry.Problem(op, DEVICE, torch.bfloat16, N, H, T)):
        pytest.skip(f"{backend} cannot serve {op} with n={N}, H={H}")
    targets = _targets(T)
    args, kw, ssq = _scaled_inputs(op, targets, seed=31 + T)
    over = ssq > 1.01
    # the inputs land clearly on the side of the edge they aim at
    assert over.tolist() == [t is not None and t > 1 for t in targets], ssq
    assert ((ssq < 0.99) | over).all(), ssq
    outs = checking.call(op, tuple(a.to(DEVICE) for a in args), kw, backend)
    refs = checking.oracle(op, args, kw)
    tol = checking.TOLERANCES[torch.bfloat16]
    for (name, kind), o, r in zip(checking.OUTPUTS[op], outs, refs):
        o = o.cpu()
        for t in range(T):
            if over[t] and name != "new_residual":  # new_residual is post's output: no RMS factor
                assert o[t].isnan().all(), f"{backend}.{op}.{name}: token {t} (sum of squares " \
                    f"{ssq[t]:.2f} x FLT_MAX) is not NaN: {o[t].flatten()[:4].tolist()}"
            else:
                err = checking.rel_error(o[t], r[t])
                assert err <= tol[kind], f"{backend}.{op}.{name}: token {t} ({ssq[t]:.2f} x FLT_MAX): " \
                    f"rel. error {err:.2e} > {tol[kind]:g}"


def test_the_issue_reproducer_is_nan_not_plausible():
    import mhc

    g = torch.Generator().manual_seed(32)
    r = (torch.randn(3, 4, 32, generator=g, dtype=torch.float64) * 1e20).bfloat16()
    b = torch.randn(24, generator=g) * 0.5
    pm, cm, li = mhc.pre(r, torch.randn(24, 128, generator=g) / 11.3, torch.ones(3), b, backend="torch")
    assert pm.isnan().all() and cm.isnan().all() and li.isnan().all()


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning")
@pytest.mark.parametrize("op", ["pre", "head"])
def test_backward_follows_the_same_rule(backend, op):
    """The backward ops recompute the RMS factor: the overflowing token's gradient is NaN too
    (not the finite gradient of a zero mix), and the other tokens' stay finite."""
    bwd = f"{op}_backward"
    if registry.reasons_for(backend, registry.Problem(bwd, DEVICE, torch.bfloat16, N, H, len(TARGETS))):
        pytest.skip(f"{backend} does not serve {bwd} here")
    args, kw, ssq = _scaled_inputs(op, TARGETS, seed=41)
    over = ssq > 1.01
    leaves = [a.to(DEVICE).requires_grad_() for a in args]
    import mhc

    with mhc.use_backend(f"{bwd}:{backend}"):
        outs = checking.call(op, leaves, kw, backend)
    g = torch.Generator().manual_seed(42)
    gos = [torch.randn(o.shape, generator=g).to(o.dtype).to(DEVICE) for o in outs]
    grad_res = torch.autograd.grad(outs, leaves[0], gos)[0].cpu()
    assert grad_res[over].isnan().all(), f"{backend}.{bwd}: overflowing tokens' gradient is not NaN"
    assert grad_res[~over].isfinite().all(), f"{backend}.{bwd}: other tokens' gradient is not finite"
