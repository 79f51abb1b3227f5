"""The reference itself, checked against DESIGN.md's formulas written out per element.

The reference is the oracle for everything else, so it gets an independent check: a scalar
implementation with Python's ``math`` on tiny sizes, plus properties of the math.
"""

from __future__ import annotations

import math

import pytest
import torch

from mhc import checking, reference


def _scalar_pre(res, fn, scale, base, eps_rms, eps_pre, eps_sk, mult, repeat):
    """DESIGN.md's pre, one token at a time, in Python floats."""
    T, n, H = len(res), len(res[0]), len(res[0][0])
    posts, combs, lis = [], [], []
    for t in range(T):
        xf = [res[t][i][h] for i in range(n) for h in range(H)]
        rs = 1.0 / math.sqrt(sum(v * v for v in xf) / len(xf) + eps_rms)
        mixes = [sum(xf[k] * fn[j][k] for k in range(len(xf))) * rs for j in range(2 * n + n * n)]
        sig = lambda v: 1.0 / (1.0 + math.exp(-v))  # noqa: E731
        pre = [sig(mixes[i] * scale[0] + base[i]) + eps_pre for i in range(n)]
        post = [sig(mixes[n + i] * scale[1] + base[n + i]) * mult for i in range(n)]
        c = [[mixes[2 * n + i * n + j] * scale[2] + base[2 * n + i * n + j] for j in range(n)] for i in range(n)]
        for i in range(n):  # softmax over the destination index j
            mx = max(c[i])
            e = [math.exp(v - mx) for v in c[i]]
            c[i] = [v / sum(e) + eps_sk for v in e]

        def cols(c):
            s = [sum(c[i][j] for i in range(n)) + eps_sk for j in range(n)]
            return [[c[i][j] / s[j] for j in range(n)] for i in range(n)]

        def rows(c):
            return [[v / (sum(r) + eps_sk) for v in r] for r in c]

        c = cols(c)
        for _ in range(repeat - 1):
            c = cols(rows(c))
        li = [sum(pre[i] * res[t][i][h] for i in range(n)) for h in range(H)]
        posts.append(post), combs.append(c), lis.append(li)
    return posts, combs, lis


def test_pre_matches_the_formulas_of_design_md():
    (r, fn, s, b), kw = checking.make_inputs("pre", (3,), 2, 5, torch.float64, seed=11)
    kw["sinkhorn_repeat"] = 4
    p, c, li = reference.pre(r, fn, s, b, **kw)
    want = _scalar_pre(r.tolist(), fn.tolist(), s.tolist(), b.tolist(), kw["rms_eps"], kw["hc_pre_eps"],
                       kw["hc_sinkhorn_eps"], kw["hc_post_mult_value"], kw["sinkhorn_repeat"])
    torch.testing.assert_close(p.squeeze(-1), torch.tensor(want[0], dtype=torch.float64), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(c, torch.tensor(want[1], dtype=torch.float64), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(li, torch.tensor(want[2], dtype=torch.float64), rtol=1e-12, atol=1e-12)


def test_post_matches_the_formula_with_source_then_destination_index():
    (x, r, pm, cm), _ = checking.make_inputs("post", (2,), 3, 4, torch.float64, seed=12)
    out = reference.post(x, r, pm, cm)
    for t in range(2):
        for j in range(3):
            for h in range(4):
                want = pm[t, j, 0] * x[t, h] + sum(cm[t, i, j] * r[t, i, h] for i in range(3))
                assert abs(out[t, j, h].item() - want.item()) < 1e-12


def test_head_is_pre_weights_without_post_or_comb():
    (r, fn, s, b), kw = checking.make_inputs("head", (4,), 4, 8, torch.float64, seed=13)
    out = reference.head(r, fn, s, b, **kw)
    xf = r.reshape(4, -1)
    mixes = (xf @ fn.T) / torch.sqrt(xf.square().mean(-1, keepdim=True) + kw["rms_eps"])
    w = torch.sigmoid(mixes * s[0] + b) + kw["hc_eps"]
    torch.testing.assert_close(out, (w.unsqueeze(-1) * r).sum(1), rtol=1e-12, atol=1e-12)


def test_sinkhorn_output_is_close_to_doubly_stochastic():
    comb = torch.randn(64, 4, 4, dtype=torch.float64) * 3
    out = reference.sinkhorn(comb, 20, 1e-6)
    ones = torch.ones(64, 4, dtype=torch.float64)
    torch.testing.assert_close(out.sum(-2), ones, atol=1e-5, rtol=0)  # the last step normalises columns
    row_err = lambda c: (c.sum(-1) - 1).abs().max().item()  # noqa: E731
    assert row_err(out) < 0.5 * row_err(reference.sinkhorn(comb, 2, 1e-6))  # iterating converges
    assert (out > 0).all()


@pytest.mark.parametrize("c", [1e-3, 7.0])
def test_pre_mixes_do_not_depend_on_the_residual_scale(c):
    (r, fn, s, b), kw = checking.make_inputs("pre", (5,), 4, 32, torch.float64, seed=14)
    p1, c1, li1 = reference.pre(r, fn, s, b, **dict(kw, rms_eps=0.0))
    p2, c2, li2 = reference.pre(r * c, fn, s, b, **dict(kw, rms_eps=0.0))
    torch.testing.assert_close(p2, p1, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(c2, c1, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(li2, li1 * c, rtol=1e-10, atol=1e-12)


def test_fused_is_post_then_pre():
    args, kw = checking.make_inputs("fused_post_pre", (3, 2), 4, 16, torch.float64, seed=15)
    new, p, c, li = reference.fused_post_pre(*args, **kw)
    new2 = reference.post(*args[:4])
    p2, c2, li2 = reference.pre(new2, *args[4:], **kw)
    for a, b in ((new, new2), (p, p2), (c, c2), (li, li2)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_output_dtypes_follow_the_residual(dtype):
    args, kw = checking.make_inputs("pre", (2,), 4, 16, dtype, seed=16)
    p, c, li = reference.pre(*args, **kw)
    mix = torch.float64 if dtype == torch.float64 else torch.float32
    assert (p.dtype, c.dtype, li.dtype) == (mix, mix, dtype)
