"""Autograd of every op: gradcheck in fp64, agreement with autograd of the reference in bf16/fp32,
opcheck's autograd tests, what is saved, T == 0, torch.compile, and how backward is dispatched."""

from __future__ import annotations

import types

import pytest
import torch

import mhc
from mhc import backward, checking, reference, registry
from mhc.registry import Backend, BackendError, Capabilities

GRAD_TOL = checking.GRAD_TOLERANCES  # one table, beside the forward one
GRAD_INPUTS = checking.GRAD_INPUTS  # names and kinds of each op's differentiable inputs


def _leaves(args):
    return [a.detach().clone().requires_grad_() for a in args]


def _tuple(out):
    return out if isinstance(out, tuple) else (out,)


# --- gradcheck (fp64, CPU) ------------------------------------------------------------------------

_GRADCHECK = [
    # (op, n, sinkhorn_repeat, fast_mode). Full Jacobians for n <= 2; n = 4 has 24 mix rows and
    # 20 Sinkhorn steps, where the full check costs ~10 s, so it uses gradcheck's fast mode (a
    # random projection of the same Jacobians).
    *[(op, n, rep, False) for op in ("pre", "fused_post_pre") for n, rep in ((1, 1), (2, 3), (2, 20))],
    *[(op, 4, rep, True) for op in ("pre", "fused_post_pre") for rep in (3, 20)],
    *[(op, n, None, False) for op in ("post", "head") for n in (1, 2, 4)],
]


@pytest.mark.parametrize("op,n,repeat,fast", _GRADCHECK)
def test_gradcheck_fp64(op, n, repeat, fast):
    args, kwargs = checking.make_inputs(op, (2,), n, 3, torch.float64, seed=n)
    if repeat is not None:
        kwargs["sinkhorn_repeat"] = repeat
    assert torch.autograd.gradcheck(lambda *a: getattr(mhc, op)(*a, **kwargs), _leaves(args), fast_mode=fast)


def test_gradcheck_sinkhorn_backward_alone():
    logits = torch.randn(3, 4, 4, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(3, 4, 4, dtype=torch.float64)
    ours = backward.sinkhorn_backward(grad, logits.detach(), 7, 1e-6)
    (ref,) = torch.autograd.grad(reference.sinkhorn(logits, 7, 1e-6), logits, grad)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-14)


# --- agreement with autograd of the plain reference ----------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("op", registry.OPS)
def test_matches_reference_autograd(op, dtype):
    args, kwargs = checking.make_inputs(op, (2, 3), 4, 64, dtype, seed=11)
    g = torch.Generator().manual_seed(12)
    ours_in = _leaves(args)
    outs = _tuple(getattr(mhc, op)(*ours_in, **kwargs))
    grads_out = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.dtype) for o in outs]
    ours = torch.autograd.grad(outs, ours_in, grads_out)

    # The plain reference at the same dtype (what a user without mhc's ops would get) and in fp64.
    plain_in = _leaves(args)
    plain = torch.autograd.grad(_tuple(getattr(reference, op)(*plain_in, **kwargs)), plain_in, grads_out)
    flat = [a.flatten(0, 1) if i < checking.token_args(op) else a for i, a in enumerate(args)]
    _, f64 = checking.grad_oracle(op, flat, kwargs, [go.flatten(0, 1) for go in grads_out],
                                  outs[0].flatten(0, 1) if op == "fused_post_pre" else None)

    for (name, kind), o, p, r, a in zip(GRAD_INPUTS[op], ours, plain, f64, args):
        assert o.shape == a.shape and o.dtype == a.dtype, name
        if kind != "sum":
            r = r.view(a.shape)
        err, err_plain = checking.grad_error(kind, o, r), checking.grad_error(kind, p, r)
        tol = GRAD_TOL[dtype][kind]
        assert err < tol, f"{op} grad {name}: rel error {err:.2e} vs fp64 (tolerance {tol:.0e})"
        # and no worse than the plain reference's own autograd by more than rounding noise
        assert err <= 2 * err_plain + tol / 10, f"{op} grad {name}: {err:.2e} vs plain reference {err_plain:.2e}"


# --- opcheck's autograd tests ----------------------------------------------------------------------


@pytest.mark.parametrize("op", registry.OPS)
@pytest.mark.parametrize("lead", [(3,), (2, 3)])
def test_opcheck_requires_grad(op, lead):
    args, kwargs = checking.make_inputs(op, lead, 4, 32, torch.bfloat16, seed=7)
    torch.library.opcheck(getattr(torch.ops.mhc, op).default, tuple(_leaves(args)), kwargs,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor",
                                      "test_aot_dispatch_dynamic"))


def _backward_args(op, lead, n, H, dtype, mask, seed=3):
    """Arguments of ``torch.ops.mhc.<op>_backward`` for random forward inputs and output grads."""
    fwd, kwargs = checking.make_inputs(op, lead, n, H, dtype, seed=seed)
    outs = _tuple(getattr(reference, op)(*fwd, **kwargs))
    g = torch.Generator().manual_seed(seed + 1)
    grads = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.dtype) for o in outs]
    if op == "post":
        saved = [a if want else None for a, want in zip((fwd[0], fwd[1], fwd[2], fwd[3]),
                                                        (mask[2], mask[3], mask[0], mask[1]))]
        return (grads[0], *saved, mask)
    return (*grads, *fwd, *kwargs.values(), mask)


@pytest.mark.parametrize("op", ["pre", "post", "head"])
@pytest.mark.parametrize("mask", [[True] * 4, [False, True, False, True]])
@pytest.mark.parametrize("lead", [(3,), (2, 3)])
def test_opcheck_backward_ops(op, mask, lead):
    args = _backward_args(op, lead, 4, 32, torch.bfloat16, mask)
    torch.library.opcheck(getattr(torch.ops.mhc, f"{op}_backward").default, args)
    outs = getattr(torch.ops.mhc, f"{op}_backward")(*args)
    assert [o is not None for o in outs[:4]] == mask
    if op == "pre":  # grad_norm_weight: None without a norm weight (test_norm.py covers it)
        assert len(outs) == 5 and outs[4] is None


# --- what is saved, masks, empty inputs ----------------------------------------------------------


def _saved_shapes(fn):
    shapes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
        out = fn()
    return out, shapes


def test_post_saves_only_what_backward_needs():
    (x, r, pm, cm), _ = checking.make_inputs("post", (5,), 4, 16, torch.bfloat16, seed=1)
    x.requires_grad_()
    out, shapes = _saved_shapes(lambda: mhc.post(x, r, pm, cm))
    assert shapes == [(5, 4, 1)]  # grad_x needs post_mix only: neither x nor the residual is kept
    out.float().square().sum().backward()
    torch.testing.assert_close(x.grad.float(), (2 * out.float() * pm).sum(1), rtol=1e-2, atol=1e-2)


def test_pre_without_param_grads():
    (r, fn, s, b), kw = checking.make_inputs("pre", (5,), 4, 16, torch.bfloat16, seed=2)
    r.requires_grad_()
    _, shapes = _saved_shapes(lambda: mhc.pre(r, fn, s, b, **kw))
    assert sorted(shapes) == sorted([(5, 4, 16), (24, 64), (3,), (24,)])
    post_mix, comb_mix, li = mhc.pre(r, fn, s, b, **kw)
    (li.float().sum() + comb_mix.sum()).backward()  # post_mix unused: its gradient is None
    assert r.grad is not None and r.grad.shape == r.shape and torch.isfinite(r.grad.float()).all()
    assert fn.grad is None and s.grad is None and b.grad is None


@pytest.mark.parametrize("op,unused", [("pre", (0,)), ("pre", (1, 2)), ("fused_post_pre", (0, 2)),
                                       ("fused_post_pre", (1, 3))])
def test_an_unused_output_counts_as_a_zero_gradient(op, unused):
    """An output the loss does not use counts as one whose upstream gradient is zero (autograd
    materializes it as zeros for the backward op): every gradient equals the fp64 oracle's with
    that output's upstream gradient zero."""
    args, kw = checking.make_inputs(op, (6,), 4, 16, torch.float32, seed=len(unused) + 7)
    ins = _leaves(args)
    outs = getattr(mhc, op)(*ins, **kw)
    g = torch.Generator().manual_seed(5)
    grads_out = [torch.zeros(o.shape) if k in unused else torch.randn(o.shape, generator=g)
                 for k, o in enumerate(outs)]
    sum((o * go).sum() for k, (o, go) in enumerate(zip(outs, grads_out)) if k not in unused).backward()
    _, f64 = checking.grad_oracle(op, args, kw, grads_out, outs[0] if op == "fused_post_pre" else None)
    for (name, kind), a, r in zip(GRAD_INPUTS[op], ins, f64):
        err = checking.grad_error(kind, a.grad, r if kind == "sum" else r.view(a.shape))
        assert err < GRAD_TOL[torch.float32][kind], f"{op} without outputs {unused}: {name} error {err:.2e}"


@pytest.mark.parametrize("op", registry.OPS)
def test_backward_empty(op):
    args, kwargs = checking.make_inputs(op, (0,), 4, 16, torch.float32, seed=0)
    ins = _leaves(args)
    outs = _tuple(getattr(mhc, op)(*ins, **kwargs))
    sum(o.sum() for o in outs).backward()
    for (name, _), a in zip(GRAD_INPUTS[op], ins):
        assert a.grad is not None and a.grad.shape == a.shape, name
        assert (a.grad == 0).all(), f"{name}: a sum over no tokens is zero"


def test_backward_op_errors_name_the_argument():
    args = list(_backward_args("pre", (3,), 4, 16, torch.float32, [True] * 4))
    bad = list(args)
    bad[2] = args[2][:2]
    with pytest.raises(ValueError, match="grad_layer_input"):
        torch.ops.mhc.pre_backward(*bad)
    bad = list(args)
    bad[0] = args[0].double()
    with pytest.raises(TypeError, match="grad_post_mix"):
        torch.ops.mhc.pre_backward(*bad)
    g, x, r, pm, cm, _ = _backward_args("post", (3,), 4, 16, torch.float32, [True] * 4)
    with pytest.raises(ValueError, match="grad_comb_mix.*residual"):
        torch.ops.mhc.post_backward(g, x, None, pm, cm, [True] * 4)


# --- torch.compile -------------------------------------------------------------------------------


# --- dispatch of the backward ops ----------------------------------------------------------------


class _Recorder(types.SimpleNamespace):
    """The torch backend's functions, recording which ops ran."""

    def __init__(self, ops):
        calls = []
        fns = {}
        for op in ops:
            impl = getattr(reference if op in registry.OPS else backward, op)
            fns[op] = (lambda impl, op: lambda *a: calls.append(op) or impl(*a))(impl, op)
        super().__init__(calls=calls, **fns)


@pytest.fixture
def fwd_only():
    rec = _Recorder(registry.OPS)
    registry.register(Backend("fwdonly", None, Capabilities(frozenset({"cpu"}), frozenset({torch.float32})),
                              load=lambda: rec))
    yield rec
    registry.unregister("fwdonly")


@pytest.fixture
def with_bwd():
    ops = registry.OPS + registry.BACKWARD_OPS
    rec = _Recorder(ops)
    registry.register(Backend("withbwd", None, Capabilities(frozenset({"cpu"}), frozenset({torch.float32}),
                                                           ops=frozenset(ops)), load=lambda: rec))
    yield rec
    registry.unregister("withbwd")


def _pre_leaves():
    args, kw = checking.make_inputs("pre", (3,), 4, 16, torch.float32, seed=4)
    return _leaves(args), kw


def test_forward_backend_without_backward_falls_back_to_torch(fwd_only):
    ins, kw = _pre_leaves()
    with mhc.use_backend("fwdonly"):  # a bare name covers the forward ops only
        out = mhc.pre(*ins, **kw)
    sum(o.sum() for o in out).backward()
    assert fwd_only.calls == ["pre"]
    why = registry.reasons_for("fwdonly", registry.Problem("pre_backward", torch.device("cpu"), torch.float32,
                                                           4, 16, 3))
    assert why == ["does not implement pre_backward"]
    # an explicit backward choice that cannot serve raises, naming the reason
    ins, kw = _pre_leaves()
    with mhc.use_backend(pre_backward="fwdonly"):
        out = mhc.pre(*ins, **kw)
    with pytest.raises(BackendError, match="does not implement pre_backward"):
        sum(o.sum() for o in out).backward()


def test_backward_choice_is_taken_when_the_forward_runs(with_bwd, monkeypatch):
    ins, kw = _pre_leaves()
    with mhc.use_backend("torch", pre_backward="withbwd", post_backward="withbwd"):
        out = mhc.pre(*ins, **kw)
        new = mhc.post(out[2], ins[0], out[0], out[1])
    (new.sum() + out[1].sum()).backward()  # outside the block: the choice made at forward holds
    assert sorted(with_bwd.calls) == ["post_backward", "pre_backward"]
    monkeypatch.setenv("MHC_BACKEND", "withbwd")  # a bare name covers the backward ops the backend lists
    with_bwd.calls.clear()
    ins, kw = _pre_leaves()
    sum(o.sum() for o in mhc.pre(*ins, **kw)).backward()
    assert with_bwd.calls == ["pre", "pre_backward"]
    monkeypatch.setenv("MHC_BACKEND", "withbwd,pre_backward:torch")  # ... unless an entry names another
    with_bwd.calls.clear()
    ins, kw = _pre_leaves()
    sum(o.sum() for o in mhc.pre(*ins, **kw)).backward()
    assert with_bwd.calls == ["pre"]
    with_bwd.calls.clear()
    ins, kw = _pre_leaves()
    with mhc.use_backend("withbwd"):
        out = mhc.pre(*ins, **kw)
    sum(o.sum() for o in out).backward()
    assert with_bwd.calls == ["pre", "pre_backward"]
    monkeypatch.setenv("MHC_BACKEND", "pre_backward:withbwd")
    with_bwd.calls.clear()
    ins, kw = _pre_leaves()
    sum(o.sum() for o in mhc.pre(*ins, **kw)).backward()
    assert with_bwd.calls == ["pre_backward"]


def test_parse_spec_accepts_backward_ops():
    assert registry.parse_spec("triton,pre_backward:torch") == {"*": "triton", "pre_backward": "torch"}
    with pytest.raises(ValueError, match="unknown op"):
        registry.parse_spec("post_pre_backward:torch")
