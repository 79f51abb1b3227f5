"""The Triton backward kernels (``mhc/backends/triton/backward.py``) against the fp64 backward math,
directly and through autograd (on CPU they run under the Triton interpreter, which conftest
switches on). Sizes are small: the interpreter runs each kernel program in numpy."""

from __future__ import annotations

import pytest
import torch

import mhc
from mhc import backward, checking

from conftest import DEVICE, backend_reasons

_why = backend_reasons("triton")
pytestmark = pytest.mark.skipif(bool(_why), reason="triton cannot serve here: " + "; ".join(_why))

TOL = checking.GRAD_TOLERANCES[torch.bfloat16]  # the inputs below are bf16
KINDS = {"pre": ("act", "mix", "mix", "mix"), "head": ("act", "mix", "mix", "mix"),
         "post": ("act", "act", "mix", "mix")}


def _tb():
    from mhc.backends.triton import backward as tb

    return tb


def _f64(t):
    return None if t is None else t.detach().to("cpu", torch.float64)


def _args(op, T, n, H, repeat, mask, seed, act=torch.bfloat16):
    """``(args of <op>_backward)`` for the Triton launcher, flattened as the op layer passes them;
    ``act``: the residual's and the activation gradients' dtype."""
    fwd, kw = checking.make_inputs(op, (T,), n, H, act, device=DEVICE, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)

    def rnd(*shape, dt=torch.float32):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dt).to(DEVICE)

    if op == "pre":
        kw["sinkhorn_repeat"] = repeat
        return (rnd(T, n, 1), rnd(T, n, n), rnd(T, H, dt=act), *fwd, *kw.values(), mask)
    if op == "head":
        return (rnd(T, H, dt=act), *fwd, *kw.values(), mask)
    return (rnd(T, n, H, dt=act), *fwd, mask)


@pytest.mark.parametrize("op,T,n,H,repeat", [
    ("pre", 5, 4, 64, 20),   # DeepSeek-V4's n and repeat, one token block
    ("pre", 37, 4, 48, 3),   # several token blocks, a partial one, H not a multiple of the tiles
    ("pre", 3, 2, 16, 1),
    ("pre", 2, 1, 8, 2),
    ("head", 37, 4, 48, None),
    ("head", 3, 1, 16, None),
    ("post", 7, 4, 300, None),  # one hidden block, masked at its end
    ("post", 5, 4, 2300, None),  # three hidden blocks, the last one partial: partials summed
    ("post", 2, 1, 8, None),
    ("post", 3, 3, 40, None),
])
def test_triton_backward_matches_fp64_math(op, T, n, H, repeat):
    args = _args(op, T, n, H, repeat, [True] * 4, seed=T + n)
    ours = getattr(_tb(), f"{op}_backward")(*args)
    refs = getattr(backward, f"{op}_backward")(*[_f64(a) if isinstance(a, torch.Tensor) else a for a in args])
    for k, (o, r, kind) in enumerate(zip(ours, refs, KINDS[op])):
        assert o.device == args[0].device
        err = checking.rel_error(o, r)
        assert err < TOL[kind], f"{op} gradient {k}: rel error {err:.2e} (tolerance {TOL[kind]:.0e})"


@pytest.mark.parametrize("op", ["pre", "head", "post"])
def test_triton_backward_fp16_matches_fp64_math(op):
    """An fp16 residual, which the kernels split in bf16 hi + lo parts where a bf16 one enters the
    GEMMs as loaded (the stats pass's and grad_fn's other branch), within fp16's bounds."""
    T, n, H = 37, 4, 48
    args = _args(op, T, n, H, 3 if op == "pre" else None, [True] * 4, seed=11, act=torch.float16)
    ours = getattr(_tb(), f"{op}_backward")(*args)
    refs = getattr(backward, f"{op}_backward")(*[_f64(a) if isinstance(a, torch.Tensor) else a for a in args])
    tol = checking.GRAD_TOLERANCES[torch.float16]
    for k, (o, r, kind) in enumerate(zip(ours, refs, KINDS[op])):
        assert o.dtype == (torch.float16 if kind == "act" else torch.float32), (k, o.dtype)
        err = checking.rel_error(o, r)
        assert err < tol[kind], f"{op} gradient {k}: rel error {err:.2e} (tolerance {tol[kind]:.0e})"


@pytest.mark.parametrize("T,n,H,post_mask", [
    (37, 4, 48, (True, True, True, True)),   # several token blocks and hidden tiles, partial ones
    (5, 4, 64, (False, True, False, True)),
    (3, 2, 16, (True, False, True, False)),
])
@pytest.mark.parametrize("norm", [False, True])
def test_triton_fused_and_norm_backward_match_fp64_math(T, n, H, post_mask, norm):
    """pre's backward with the fused RMSNorm, and fused_post_pre's backward (pre's with the new
    residual's own gradient added in its last kernel, then post's), against the torch backward in
    fp64, every gradient the masks ask for."""
    fwd, kw = checking.make_inputs("pre", (T,), n, H, torch.bfloat16, device=DEVICE, seed=T + H)
    kw["sinkhorn_repeat"] = 3
    g = torch.Generator().manual_seed(T * 7 + n)

    def rnd(*shape, dt=torch.bfloat16, s=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * s).to(dt).to(DEVICE)

    new = fwd[0]
    up = (rnd(T, n, 1, dt=torch.float32), rnd(T, n, n, dt=torch.float32), rnd(T, H))
    nrm = (rnd(H, s=0.2) + 1.0, 1e-6, True) if norm else ()
    post = (rnd(T, H), rnd(T, n, H), torch.rand(T, n, 1, generator=g).to(DEVICE),
            torch.rand(T, n, n, generator=g).to(DEVICE))
    mask = [*post_mask, True, False, True]
    args = (rnd(T, n, H), *up, new, *post, *fwd[1:], *kw.values(), mask, *nrm)
    ours = _tb().fused_post_pre_backward(*args)
    refs = backward.fused_post_pre_backward(*[_f64(a) if isinstance(a, torch.Tensor) else a for a in args])
    # post_mix's and comb_mix's gradients come from the new residual's, held in bf16 as autograd of
    # the unfused pair holds it (checking.GRAD_INPUTS): they carry its rounding
    kinds = ("act", "act", "act", "act", "mix", "mix", "mix", "act")
    assert [o is not None for o in ours] == [r is not None for r in refs] == mask + ([True] if norm else [])
    for k, (o, r, kind) in enumerate(zip(ours, refs, kinds)):
        if o is not None:
            err = checking.rel_error(o, r)
            assert err < TOL[kind], f"gradient {k}: rel error {err:.2e} (tolerance {TOL[kind]:.0e})"
    pre = _tb().pre_backward(*up, new, *fwd[1:], *kw.values(), [True] * 4, *nrm)
    pre_ref = backward.pre_backward(*[_f64(a) if isinstance(a, torch.Tensor) else a
                                      for a in (*up, new, *fwd[1:], *kw.values(), [True] * 4, *nrm)])
    for k, (o, r, kind) in enumerate(zip(pre, pre_ref, ("act", "mix", "mix", "mix", "act"))):
        err = checking.rel_error(o, r)
        assert err < TOL[kind], f"pre gradient {k}: rel error {err:.2e} (tolerance {TOL[kind]:.0e})"


@pytest.mark.parametrize("op", ["pre", "fused_post_pre"])
def test_triton_backward_writes_everything_and_repeats_bitwise(op, monkeypatch):
    """Every buffer the launchers allocate (outputs, partials, scratch) starts as NaN, so an element
    that no kernel writes shows in the gradients; and the reductions over tokens (grad_fn,
    grad_hc_scale, grad_hc_base, grad_norm_weight, post's mix gradients) have a fixed order: two
    runs on the same inputs give the same bits."""
    tb = _tb()
    monkeypatch.setattr(tb, "empty", lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype,
                                                                             device=device))
    T, n, H = 70, 4, 96
    args = _args("pre", T, n, H, 2, [True] * 4, seed=11)
    nrm = (torch.rand(H).to(torch.bfloat16).to(DEVICE) + 0.5, 1e-6, True)
    if op == "pre":
        run = lambda: tb.pre_backward(*args, *nrm)  # noqa: E731
    else:
        g = torch.Generator().manual_seed(12)
        post = (torch.randn(T, n, H, generator=g).bfloat16(), torch.randn(T, H, generator=g).bfloat16(),
                torch.randn(T, n, H, generator=g).bfloat16(), torch.rand(T, n, 1, generator=g),
                torch.rand(T, n, n, generator=g))
        post = [t.to(DEVICE) for t in post]
        run = lambda: tb.fused_post_pre_backward(post[0], *args[:4], *post[1:], *args[4:-1], [True] * 7,  # noqa: E731
                                                 *nrm)
    first, second = run(), run()
    assert len(first) == (5 if op == "pre" else 8)
    for a, b in zip(first, second):
        assert torch.isfinite(a.float()).all()
        assert torch.equal(a, b)


@pytest.mark.parametrize("op,mask", [("pre", [False, True, False, True]), ("pre", [True, False, True, False]),
                                     ("head", [True, False, False, False]), ("post", [True, False, False, True]),
                                     ("post", [False, True, True, False])])
def test_triton_backward_output_mask(op, mask):
    args = list(_args(op, 20, 4, 32, 2, mask, seed=5))
    if op == "post":  # the op layer passes None for the inputs no asked-for gradient needs
        needs = {1: mask[2], 2: mask[3], 3: mask[0], 4: mask[1]}  # x, residual, post_mix, comb_mix
        args = [None if k in needs and not needs[k] else a for k, a in enumerate(args)]
    ours = getattr(_tb(), f"{op}_backward")(*args)
    refs = getattr(backward, f"{op}_backward")(*[_f64(a) if isinstance(a, torch.Tensor) else a for a in args])
    assert [o is not None for o in ours] == mask
    for o, r, kind in zip(ours, refs, KINDS[op]):
        if o is not None:
            assert checking.rel_error(o, r) < TOL[kind]


def test_triton_backward_through_autograd():
    """A pre -> post -> fused -> head chain: the gradients with the Triton backward ops equal the
    torch backend's. fp16, not bf16: the Triton interpreter rounds fp32 -> bf16 by truncation (half
    of all casts differ from round-to-nearest-even; GPUs round to nearest), which over four ops of
    bf16 gradients adds ~1e-2 of noise that would hide a real error."""
    (r, fn, s, b), kw = checking.make_inputs("pre", (6,), 4, 32, torch.float16, device=DEVICE, seed=3)
    kw["sinkhorn_repeat"] = 3
    (_, hfn, hs, hb), hkw = checking.make_inputs("head", (6,), 4, 32, torch.float16, device=DEVICE, seed=4)

    def grads():
        ins = [t.detach().clone().requires_grad_() for t in (r, fn, s, b, hfn)]
        res, fn_, s_, b_, hfn_ = ins
        pm, cm, x = mhc.pre(res, fn_, s_, b_, **kw)
        new, pm, cm, x = mhc.fused_post_pre(x * 2, res, pm, cm, fn_, s_, b_, **kw)
        out = mhc.head(mhc.post(x, new, pm, cm), hfn_, hs, hb, **hkw)
        return torch.autograd.grad(out.float().square().sum(), ins)

    expected = grads()
    # the triton backend's own record, which lists the backward ops
    with mhc.use_backend(pre_backward="triton", post_backward="triton", head_backward="triton"):
        got = grads()
    tol = checking.GRAD_TOLERANCES[torch.float16]
    for name, g, e in zip(("residual", "fn", "hc_scale", "hc_base", "head fn"), got, expected):
        err = checking.rel_error(g, _f64(e))
        bound = tol["act" if name == "residual" else "mix"]
        assert err < bound, f"{name}: {err:.2e} (tolerance {bound:.0e})"


@pytest.mark.parametrize("op", ["pre", "head", "post", "fused_post_pre"])
def test_triton_backward_of_an_empty_batch(op):
    """T = 0 through the public API with Triton forward and backward: token gradients are empty,
    the parameters' gradients (sums over no tokens) are zeros of their shapes."""
    args, kwargs = checking.make_inputs(op, (0,), 4, 16, torch.bfloat16, DEVICE, seed=0)
    ins = [a.detach().clone().requires_grad_(a.is_floating_point()) for a in args]
    with mhc.use_backend("triton"):
        outs = getattr(mhc, op)(*ins, **kwargs)
        outs = outs if isinstance(outs, tuple) else (outs,)
        sum(o.float().sum() for o in outs).backward()
    for (name, _), a in zip(checking.GRAD_INPUTS[op], ins):
        assert a.grad is not None and a.grad.shape == a.shape and a.grad.dtype == a.dtype, name
        assert (a.grad == 0).all(), f"{name}: a sum over no tokens is zero"


def test_backward_plans_are_reused_and_stay_few_as_T_varies():
    """The backward launchers keep one launch plan per kind of call (``backward.backward_plan``,
    in ``mhc.plans.PLANS``): a warm call builds none, another T with the same bucket and step
    counts reuses it, and the step counts that key the plans take few values over any range of T
    (a training run with sequences of every length compiles a handful of variants, not one per T)."""
    from mhc.backends.triton import configs
    from mhc.plans import PLANS, t_bucket

    tb = _tb()
    args = _args("pre", 40, 4, 48, 2, [True] * 4, seed=3)
    tb.pre_backward(*args)
    builds = PLANS.builds
    tb.pre_backward(*args)
    assert PLANS.builds == builds
    other = _args("pre", 41, 4, 48, 2, [True] * 4, seed=4)  # one more token: the same bucket and steps
    row = configs.backward_row(False, False, False, 41)
    assert configs.backward_steps(row, 4, 48, 41) == configs.backward_steps(row, 4, 48, 40)
    tb.pre_backward(*other)
    assert PLANS.builds == builds
    for head, fused in ((False, False), (True, False), (False, True)):
        for H in (4096, 7168):
            row = configs.backward_row(head, fused, False, 1 << 20)
            kinds = {(t_bucket(T), configs.backward_steps(row, 4, H, T)) for T in range(1, 1 << 17, 3)}
            assert len(kinds) <= 24, (head, fused, H, sorted(kinds))
