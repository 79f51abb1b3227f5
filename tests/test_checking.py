"""The checking helpers that the GPU tests and the benchmarks judge gradients with: hc_scale's
sum error (``checking.sum_error``, ``per_token``) and fused_post_pre's oracle reading the stored
new residual (``checking.reference_f64``'s ``new_residual``)."""

from __future__ import annotations

import math

import torch

from mhc import checking, reference


def test_sum_error_is_the_error_over_the_sum_of_the_terms_sizes():
    g = torch.Generator().manual_seed(3)
    terms = torch.randn(3, 50, generator=g, dtype=torch.float64)
    exact = terms.sum(1)
    assert checking.sum_error(exact.float(), terms) < 1e-6  # fp32 rounding of the sums only
    size = terms.abs().sum(1)
    off = exact.clone()
    off[1] += 1e-3 * size[1]
    assert math.isclose(checking.sum_error(off, terms), 1e-3, rel_tol=1e-9)
    nan = exact.clone()
    nan[0] = float("nan")
    assert checking.sum_error(nan, terms) == math.inf
    assert checking.sum_error(exact[:2], terms) == math.inf


def test_per_token_gradients_sum_to_the_parameter_gradient():
    args, kw = checking.make_inputs("pre", (6,), 2, 8, torch.float64, seed=4)
    ups = [torch.randn_like(o) for o in reference.pre(*args, **kw)]
    whole = torch.autograd.grad(reference.pre(args[0], args[1], args[2].requires_grad_(), args[3], **kw),
                                args[2], ups)[0]
    _, per = checking.grad_oracle("pre", args, kw, ups)
    terms = per[2]
    assert terms.shape == (3, 6)
    torch.testing.assert_close(terms.sum(1), whole, rtol=1e-12, atol=1e-12)
    assert checking.sum_error(whole, terms) < 1e-15


def test_fused_oracle_reads_the_given_new_residual_and_differentiates_through_post():
    args, kw = checking.make_inputs("fused_post_pre", (5,), 2, 16, torch.bfloat16, seed=9)
    f64 = [a.double().requires_grad_() for a in args]
    rounded = checking.reference_f64("fused_post_pre", f64, kw, torch.bfloat16)
    stored = rounded[0].detach().to(torch.bfloat16)
    same = checking.reference_f64("fused_post_pre", f64, kw, torch.bfloat16, stored)
    for a, b in zip(rounded, same):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # one element an ulp off, as a forward that rounds an fp32 value may store it: pre reads it
    bumped = stored.clone()
    bumped[2, 1, 3] = stored[2, 1, 3] * (1 + 2 ** -7)  # bf16 keeps 7 mantissa bits: the next value
    assert bumped[2, 1, 3] != stored[2, 1, 3]
    moved = checking.reference_f64("fused_post_pre", f64, kw, torch.bfloat16, bumped)
    want = reference.pre(bumped.double(), *f64[4:], **kw)
    for a, b in zip(moved[1:], want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(moved[3], rounded[3])
    # the gradient of x still flows through post, as autograd of the unfused pair has it
    g = torch.autograd.grad(moved[3].sum(), f64[0])[0]
    assert g.abs().sum() > 0
