"""``mhc.<op>`` and ``torch.ops.mhc.<op>`` are two ways into one op: they accept and refuse the same
inputs, with the same error types, and give equal results and gradients.

The one difference allowed: an argument the dispatcher cannot convert to the schema's type (a
str for a float, an int too large for a C double or int64) is its ``RuntimeError`` through
``torch.ops`` and a ``TypeError``/``ValueError`` naming the argument through ``mhc.<op>``; and
``sinkhorn_repeat=True``, which the dispatcher takes as 1 and ``mhc.<op>`` refuses.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import mhc
from mhc import checking

OPS = ("pre", "post", "head", "fused_post_pre")
_TENSORS = {"pre": 4, "post": 4, "head": 4, "fused_post_pre": 7}


def _outcome(f, args, kw):
    """``("ok", outputs)`` or ``("raised", exception)`` of ``f(*args, **kw)``."""
    try:
        out = f(*args, **kw)
    except Exception as e:  # noqa: BLE001 - the point is to compare whatever is raised
        return "raised", e
    return "ok", out if isinstance(out, tuple) else (out,)


def _dispatcher_conversion_error(e: Exception) -> bool:
    return type(e) is RuntimeError and "Expected a value of type" in str(e)


def assert_same_outcome(op, args, kw):
    """``mhc.<op>`` and ``torch.ops.mhc.<op>`` on the same call: equal outputs, or errors of one type."""
    public = _outcome(getattr(mhc, op), args, kw)
    dispatched = _outcome(getattr(torch.ops.mhc, op), args, kw)
    if dispatched[0] == "raised" and _dispatcher_conversion_error(dispatched[1]):
        assert public[0] == "raised" and type(public[1]) in (TypeError, ValueError), (public, dispatched)
        return public
    assert public[0] == dispatched[0], (public, dispatched)
    if public[0] == "raised":
        assert type(public[1]) is type(dispatched[1]), (public, dispatched)
        return public
    assert len(public[1]) == len(dispatched[1])
    for p, d in zip(public[1], dispatched[1]):
        assert p.shape == d.shape and p.dtype == d.dtype and p.device == d.device
        assert torch.equal(p, d)
    return public


# --- a property-based sweep: layouts, bits, scalar types, contexts, bad inputs --------------------

_SCALARS = {  # a value of each kind the schema's dispatcher converts, for a float and for an int
    "float": lambda v: float(v), "int": lambda v: int(round(v)), "numpy": lambda v: np.float64(v),
    "numpy32": lambda v: np.float32(v), "0-d tensor": lambda v: torch.tensor(float(v), dtype=torch.float64),
    "str": lambda v: str(v), "huge int": lambda v: 10**400, "negative": lambda v: -1.0,
}
_REPEATS = {"int": lambda: 3, "numpy int": lambda: np.int64(3), "0-d tensor": lambda: torch.tensor(3),
            "float": lambda: 3.0, "out of range": lambda: 0, "too large for int64": lambda: 2**63}


def _perturb(t: torch.Tensor, how: str) -> torch.Tensor:
    """``t`` (equal values) as a different kind of tensor: a non-contiguous view, a view with the
    negative bit, or a wrong dtype or shape (which both ways must refuse alike)."""
    if how == "non-contiguous":
        return torch.stack([t, t], -1)[..., 0]
    if how == "negative bit":
        return torch._neg_view(-t)
    if how == "wrong dtype":
        return t.to(torch.float64 if t.dtype != torch.float64 else torch.float32)
    if how == "wrong shape":
        return t[..., :1] if t.dim() else t.reshape(1)
    return t


@given(op=st.sampled_from(OPS), lead=st.sampled_from([(), (1,), (3,), (2, 2)]),
       dtype=st.sampled_from([torch.bfloat16, torch.float32]),
       which=st.integers(0, 6), how=st.sampled_from(["as is", "non-contiguous", "negative bit", "wrong dtype",
                                                       "wrong shape"]),
       scalar=st.sampled_from(sorted(_SCALARS)), repeat=st.sampled_from(sorted(_REPEATS)),
       context=st.sampled_from(["plain", "no_grad", "inference_mode", "requires grad"]))
def test_both_ways_in_agree(op, lead, dtype, which, how, scalar, repeat, context):
    args, kw = checking.make_inputs(op, lead, 4, 32, dtype, seed=1)
    args = list(args)
    i = which % _TENSORS[op]
    args[i] = _perturb(args[i], how)
    eps = "hc_eps" if op == "head" else "rms_eps"
    if op != "post":
        kw[eps] = _SCALARS[scalar](kw[eps])
    if op in ("pre", "fused_post_pre"):
        kw["sinkhorn_repeat"] = _REPEATS[repeat]()
    kw["backend"] = "torch"
    if context == "requires grad":
        leaves = [a.detach().requires_grad_() if a.is_floating_point() else a for a in args]
        assert_same_outcome(op, leaves, kw)
        return
    guard = {"plain": torch.enable_grad, "no_grad": torch.no_grad, "inference_mode": torch.inference_mode}[context]
    with guard():
        assert_same_outcome(op, args, kw)


@pytest.mark.parametrize("op", OPS)
def test_gradients_agree_with_a_negative_bit_input(op):
    args, kw = checking.make_inputs(op, (2,), 4, 16, torch.float64, seed=2)
    grads = []
    for f in (getattr(mhc, op), getattr(torch.ops.mhc, op)):
        leaves = [a.detach().requires_grad_() for a in args]
        ins = [torch._neg_view(-leaves[0]), *leaves[1:]]  # -(-x): x's values, the negative bit set
        out = f(*ins, **kw, backend="torch")
        out = out if isinstance(out, tuple) else (out,)
        sum((o * (k + 1)).sum() for k, o in enumerate(out)).backward()
        grads.append([a.grad for a in leaves])
    for g, w in zip(*grads):
        assert g is not None and torch.equal(g, w)


# --- the cases issue reports named, one each ----------------------------------------------------


def test_a_negative_bit_is_materialised_by_the_triton_backend_too():
    """Regression: the public call handed the raw storage of a negative-bit view to the kernel."""
    args, _ = checking.make_inputs("post", (2,), 4, 16, torch.float16, seed=3)
    nx = torch._neg_view(-args[0])
    got = mhc.post(nx, *args[1:], backend="triton")
    assert torch.equal(got, torch.ops.mhc.post(nx, *args[1:], backend="triton"))
    assert torch.equal(got, mhc.post(*args, backend="triton"))


@pytest.mark.parametrize("value", [np.int64(3), np.int32(3), torch.tensor(3)])
def test_sinkhorn_repeat_may_be_any_integer_the_dispatcher_takes(value):
    args, kw = checking.make_inputs("pre", (2,), 4, 16, torch.float32, seed=4)
    got = assert_same_outcome("pre", args, dict(kw, sinkhorn_repeat=value, backend="torch"))
    want = mhc.pre(*args, **dict(kw, sinkhorn_repeat=3), backend="torch")
    assert got[0] == "ok" and all(torch.equal(g, w) for g, w in zip(got[1], want))


@pytest.mark.parametrize("name", ["rms_eps", "hc_pre_eps", "hc_sinkhorn_eps", "hc_post_mult_value", "norm_eps"])
def test_a_scalar_too_large_for_a_double_is_a_value_error_naming_it(name):
    args, kw = checking.make_inputs("pre", (2,), 4, 16, torch.float32, seed=5)
    with pytest.raises(ValueError, match=name):
        mhc.pre(*args, **dict(kw, **{name: 10**400}))


def test_jit_trace_through_the_public_function_records_the_op():
    args, kw = checking.make_inputs("pre", (2,), 4, 16, torch.float32, seed=6)
    traced = torch.jit.trace(lambda *a: mhc.pre(*a, **kw, backend="torch"), args)
    assert "mhc::pre" in str(traced.graph)
    other, _ = checking.make_inputs("pre", (2,), 4, 16, torch.float32, seed=7)
    for g, w in zip(traced(*other), mhc.pre(*other, **kw, backend="torch")):
        assert torch.equal(g, w)
