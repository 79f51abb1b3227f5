"""The sublayer's RMSNorm fused into ``pre`` and ``fused_post_pre`` (``norm_weight``, ``norm_eps``).

The reference against an fp64 formula written out here; every backend that serves it against the
fp64 oracle (outputs poisoned by conftest, inputs fresh random draws, norm weights random, not
ones); a backend that does not serve it gives a reason and ``auto`` skips it; autograd (gradcheck
in fp64, agreement with the fp64 reference's autograd in bf16/fp32, opcheck); bad arguments.
"""

from __future__ import annotations

import math

import pytest
import torch

import mhc
from mhc import checking, reference, registry
from mhc.registry import Backend, BackendError, Capabilities

from conftest import DEVICE

NORM_OPS = ("pre", "fused_post_pre")


def _norm_weight(H, dtype, seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(H, generator=g, dtype=torch.float64) * 0.5 + 1.0).to(dtype).to(device)


def _inputs(op, lead, n, H, dtype, seed, w_dtype=None, device="cpu"):
    args, kw = checking.make_inputs(op, lead, n, H, dtype, device=device, seed=seed)
    kw = dict(kw, norm_weight=_norm_weight(H, w_dtype or dtype, seed + 100, device), norm_eps=1e-5)
    return args, kw


def _rel(a, b):
    return checking.rel_error(a, b)


# --- the reference ----------------------------------------------------------------------------------


@pytest.mark.parametrize("n,H", [(1, 1), (2, 7), (4, 64)])
def test_reference_against_fp64_formula(n, H):
    """``layer_input`` with a norm weight is the RMSNorm of the unrounded collapse, in fp64 here."""
    args, kw = _inputs("pre", (5,), n, H, torch.float64, seed=n * 31 + H)
    nw, eps = kw.pop("norm_weight"), kw.pop("norm_eps")
    post_mix, comb_mix, c = reference.pre(*args, **kw)  # fp64: the collapse, unrounded
    want = c / torch.sqrt(c.pow(2).mean(-1, keepdim=True) + eps) * nw
    got = reference.pre(*args, **kw, norm_weight=nw, norm_eps=eps)
    torch.testing.assert_close(got[2], want, rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(got[0], post_mix, rtol=0, atol=0)  # the mixes do not change
    torch.testing.assert_close(got[1], comb_mix, rtol=0, atol=0)


def test_reference_rounds_once():
    """bf16: the norm is taken from the fp32 collapse and rounded once, so the result is the fp64
    value correctly rounded (all but the rare element where fp32 accumulation decides a tie or a
    cancelling sum: measured 1 in 16384), which the model's three roundings are not (65 %)."""
    args, kw = _inputs("pre", (64,), 4, 256, torch.bfloat16, seed=5)
    f64_args = [a.double() for a in args]
    want = reference.pre(*f64_args, **dict(kw, norm_weight=kw["norm_weight"].double()))[2].to(torch.bfloat16)
    got = reference.pre(*args, **kw)[2]
    assert (got == want).float().mean() > 0.999
    c = reference.pre(*args, **{k: v for k, v in kw.items() if not k.startswith("norm")})[2]  # bf16 collapse
    model = kw["norm_weight"] * (c.float() * torch.rsqrt(c.float().pow(2).mean(-1, keepdim=True) + 1e-5)).to(
        torch.bfloat16)  # transformers' DeepseekV4RMSNorm on it
    assert (model == want).float().mean() < 0.9


def test_fused_reference_applies_norm_to_layer_input_only():
    args, kw = _inputs("fused_post_pre", (3,), 4, 32, torch.float64, seed=9)
    plain = reference.fused_post_pre(*args, **{k: v for k, v in kw.items() if not k.startswith("norm")})
    normed = reference.fused_post_pre(*args, **kw)
    for a, b in zip(plain[:3], normed[:3]):
        assert torch.equal(a, b)
    c = plain[3]
    want = c * torch.rsqrt(c.pow(2).mean(-1, keepdim=True) + kw["norm_eps"]) * kw["norm_weight"]
    torch.testing.assert_close(normed[3], want, rtol=1e-13, atol=1e-14)


# --- every backend that serves it, against the fp64 oracle ------------------------------------------

#: (lead dims, n, H): T = 1 (Triton's single-launch tail), T <= 128 (chunked), T > 128 (two-pass);
#: odd H for the masks.
_SHAPES = [((1,), 4, 96), ((2, 3), 4, 100), ((5,), 2, 7), ((130,), 4, 64), ((131,), 1, 1)]


def _serves(backend, op, dtype, n, H, T):
    return registry.reasons_for(backend, registry.Problem(op, DEVICE, dtype, n, H, T, norm=True))


@pytest.mark.parametrize("op", NORM_OPS)
@pytest.mark.parametrize("lead,n,H", _SHAPES)
@pytest.mark.parametrize("w_fp32", [False, True], ids=["w_act", "w_fp32"])
def test_backend_matches_fp64_oracle(backend, op, lead, n, H, w_fp32):
    caps = registry.get(backend).capabilities
    dtype = torch.bfloat16 if torch.bfloat16 in caps.dtypes else sorted(caps.dtypes, key=str)[0]
    T = math.prod(lead)
    why = _serves(backend, op, dtype, n, H, T)
    if why:
        with pytest.raises(BackendError, match="norm_weight|cannot serve"):
            checking.call(op, *_inputs(op, lead, n, H, dtype, seed=T + H, device=DEVICE), backend=backend)
        pytest.skip(f"{backend} cannot serve {op} with norm_weight here: {'; '.join(why)}")
    args, kw = _inputs(op, lead, n, H, dtype, seed=T + H, w_dtype=torch.float32 if w_fp32 else dtype,
                       device=DEVICE)
    outs = checking.call(op, args, kw, backend=backend)
    refs = checking.oracle(op, args, kw)
    for name, err, tol in checking.compare(op, outs, refs, dtype):
        assert err <= tol, f"{backend}.{op}.{name}: rel. error {err:.3e} > {tol:g}"
    assert outs[-1].dtype == dtype and outs[-1].shape == (*lead, H)
    # the norm did run: the un-normalised layer input is far from it
    plain = checking.oracle(op, args, {k: v for k, v in kw.items() if not k.startswith("norm")})[-1]
    assert _rel(outs[-1], plain) > 0.1


def test_backend_without_norm_gives_a_reason_and_auto_skips_it():
    calls = []

    class Plain:  # the reference without norm parameters, as a third-party backend written before them
        def pre(self, *a):
            calls.append(len(a))
            return reference.pre(*a)

    caps = Capabilities(frozenset({"cpu"}), frozenset({torch.float32}))
    registry.register(Backend("plainpre", None, caps, load=lambda: Plain()))
    try:
        args, kw = _inputs("pre", (3,), 4, 32, torch.float32, seed=1)
        why = registry.reasons_for("plainpre", registry.Problem("pre", torch.device("cpu"), torch.float32, 4, 32, 3,
                                                                norm=True))
        assert why == ["does not fuse the RMSNorm (norm_weight) into pre"]
        with pytest.raises(BackendError, match=r"plainpre.*does not fuse the RMSNorm \(norm_weight\) into pre"):
            mhc.pre(*args, **kw, backend="plainpre")
        plain_kw = {k: v for k, v in kw.items() if not k.startswith("norm")}
        mhc.pre(*args, **plain_kw, backend="plainpre")  # without a norm weight it serves, called as before
        assert calls == [9]
        assert "norm_weight" in mhc.explain("pre", *args, *plain_kw.values(), kw["norm_weight"]).problem.describe()
    finally:
        registry.unregister("plainpre")


# --- autograd ---------------------------------------------------------------------------------------


def _leaves(ts):
    return [t.detach().clone().requires_grad_() for t in ts]


@pytest.mark.parametrize("op", NORM_OPS)
@pytest.mark.parametrize("n,repeat,fast", [(1, 1, False), (2, 3, False), (4, 20, True)])
def test_gradcheck_fp64(op, n, repeat, fast):
    args, kw = _inputs(op, (2,), n, 5, torch.float64, seed=n)
    kw["sinkhorn_repeat"] = repeat
    nw = kw.pop("norm_weight")
    ins = _leaves([*args, nw])
    assert torch.autograd.gradcheck(lambda *a: getattr(mhc, op)(*a[:-1], **kw, norm_weight=a[-1]), ins,
                                     fast_mode=fast)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("op", NORM_OPS)
def test_gradients_match_fp64_reference(op, dtype):
    """Every input's gradient, the norm weight's included, against autograd of the reference in
    fp64, within the gradient table's tolerances."""
    args, kw = _inputs(op, (2, 3), 4, 64, dtype, seed=21, w_dtype=torch.float32)
    nw = kw.pop("norm_weight")
    ins = _leaves([*args, nw])
    outs = getattr(mhc, op)(*ins[:-1], **kw, norm_weight=ins[-1])
    g = torch.Generator().manual_seed(22)
    gouts = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.dtype) for o in outs]
    ours = torch.autograd.grad(outs, ins, gouts)

    f64 = [a.detach().double().requires_grad_() for a in [*args, nw]]
    if op == "fused_post_pre":
        new = reference.post(*f64[:4])
        ref_outs = (new, *reference.pre(new.to(dtype).double(), *f64[4:7], **kw, norm_weight=f64[-1]))
    else:
        ref_outs = reference.pre(*f64[:4], **kw, norm_weight=f64[-1])
    refs = torch.autograd.grad(ref_outs, f64, [go.double() for go in gouts])
    n_act = 2 if op == "fused_post_pre" else 1
    # fused's post_mix/comb_mix gradients come through the bf16 new residual (test_autograd.py)
    kinds = ["act"] * (4 if op == "fused_post_pre" else 1) + ["mix"] * 3 + ["mix"]
    assert len(kinds) == len(ins) and n_act
    for i, (o, r, kind) in enumerate(zip(ours, refs, kinds)):
        assert o.dtype == ins[i].dtype and o.shape == ins[i].shape
        tol = checking.GRAD_TOLERANCES[dtype][kind]
        if i == len(ins) - 1:  # the norm weight's: a sum over T of bf16-rounded upstream terms
            tol = max(tol, 1e-3 if dtype == torch.bfloat16 else tol)
        assert checking.rel_error(o, r) < tol, (op, i, checking.rel_error(o, r), tol)


def test_weight_without_grad_and_ones_weight():
    """A norm weight that needs no gradient gets none; a weight of ones is the plain RMSNorm."""
    args, kw = _inputs("pre", (4,), 4, 32, torch.float64, seed=3)
    kw["norm_weight"] = torch.ones(32, dtype=torch.float64)
    ins = _leaves(args)
    out = mhc.pre(*ins, **kw)[2]
    c = reference.pre(*args, **{k: v for k, v in kw.items() if not k.startswith("norm")})[2]
    torch.testing.assert_close(out.detach(), c * torch.rsqrt(c.pow(2).mean(-1, keepdim=True) + kw["norm_eps"]))
    out.sum().backward()
    assert all(t.grad is not None for t in ins) and kw["norm_weight"].grad is None


@pytest.mark.parametrize("op", NORM_OPS)
def test_opcheck(op):
    args, kw = _inputs(op, (2, 3), 4, 32, torch.float32, seed=4)
    nw = kw.pop("norm_weight")
    scalars = tuple(kw.values())  # rms_eps ... sinkhorn_repeat, norm_eps
    ins = (*_leaves(args), *scalars[:-1], nw.clone().requires_grad_(), scalars[-1])
    torch.library.opcheck(getattr(torch.ops.mhc, op).default, ins)


def test_opcheck_pre_backward_with_norm():
    args, kw = _inputs("pre", (3,), 4, 32, torch.bfloat16, seed=6)
    outs = reference.pre(*args, **kw)
    g = torch.Generator().manual_seed(7)
    grads = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.dtype) for o in outs]
    scalars = [kw[k] for k in ("rms_eps", "hc_pre_eps", "hc_sinkhorn_eps", "hc_post_mult_value", "sinkhorn_repeat")]
    bargs = (*grads, *args, *scalars, [True, False, True, True], kw["norm_weight"], kw["norm_eps"], True)
    torch.library.opcheck(torch.ops.mhc.pre_backward.default, bargs)
    out = torch.ops.mhc.pre_backward(*bargs)
    assert [o is not None for o in out] == [True, False, True, True, True]
    assert out[4].dtype == kw["norm_weight"].dtype and out[4].shape == (32,)


def test_empty():
    args, kw = _inputs("pre", (0,), 4, 32, torch.float32, seed=8)
    nw = kw.pop("norm_weight").requires_grad_()
    ins = _leaves(args)
    p, c, li = mhc.pre(*ins, **kw, norm_weight=nw)
    assert li.shape == (0, 32)
    (li.sum() + p.sum() + c.sum()).backward()
    assert nw.grad is not None and torch.equal(nw.grad, torch.zeros(32))


# --- bad arguments ----------------------------------------------------------------------------------


@pytest.mark.parametrize("op", NORM_OPS)
def test_bad_norm_weight_names_the_argument(op):
    args, kw = _inputs(op, (3,), 4, 32, torch.bfloat16, seed=2)
    cases = [
        (dict(norm_weight=torch.ones(33)), ValueError, r"norm_weight must have shape \(32,\).*got \(33,\)"),
        (dict(norm_weight=torch.ones(1, 32)), ValueError, r"norm_weight must have shape \(32,\)"),
        (dict(norm_weight=torch.ones(32, dtype=torch.float16)), TypeError,
         r"norm_weight must be bfloat16 \(the residual's dtype\) or float32, got float16"),
        (dict(norm_weight=torch.ones(32, dtype=torch.float64)), TypeError, r"norm_weight must be .* got float64"),
        (dict(norm_weight=torch.ones(32, dtype=torch.bfloat16, device="meta")), ValueError,
         r"norm_weight is on meta but residual is on cpu"),
        (dict(norm_weight=[1.0] * 32), TypeError, r"norm_weight"),
        (dict(norm_eps=-1.0), ValueError, r"norm_eps must be a finite number >= 0"),
        (dict(norm_eps=math.nan), ValueError, r"norm_eps must be a finite number >= 0"),
    ]
    for change, err, msg in cases:
        with pytest.raises(err, match=msg):
            getattr(mhc, op)(*args, **dict(kw, **change))
        if isinstance(change.get("norm_weight"), list):  # the dispatcher's own error (a RuntimeError there)
            continue
        with pytest.raises(err, match=msg):  # the torch.ops path and the fake impl check the same
            with torch._subclasses.FakeTensorMode(allow_non_fake_inputs=True):
                getattr(torch.ops.mhc, op)(*args, **dict(kw, **change))
