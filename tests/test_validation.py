"""Bad input raises TypeError/ValueError naming the argument, for every op, before any backend runs."""

from __future__ import annotations

import pytest
import torch

import mhc
from mhc import checking


def _pre():
    return list(checking.make_inputs("pre", (3,), 4, 32, torch.bfloat16, seed=0)[0])


def _post():
    return list(checking.make_inputs("post", (3,), 4, 32, torch.bfloat16, seed=0)[0])


def _head():
    return list(checking.make_inputs("head", (3,), 4, 32, torch.bfloat16, seed=0)[0])


def _fused():
    return list(checking.make_inputs("fused_post_pre", (3,), 4, 32, torch.bfloat16, seed=0)[0])


def _with(args, i, value):
    args = list(args)
    args[i] = value(args[i]) if callable(value) else value
    return args


CASES = [
    # op, args, exception, words the message must contain
    ("pre", _with(_pre(), 0, lambda r: r.to(torch.int32)), TypeError, ["residual", "int32"]),
    ("pre", _with(_pre(), 0, lambda r: r[0, 0]), ValueError, ["residual", "(..., n, H)"]),
    ("pre", _with(_pre(), 0, lambda r: torch.randn(3, 9, 32).bfloat16()), ValueError, ["residual", "n", "9"]),
    ("pre", _with(_pre(), 0, lambda r: torch.randn(3, 4, 0).bfloat16()), ValueError, ["residual", "H"]),
    ("pre", _with(_pre(), 0, "not a tensor"), TypeError, ["residual", "str"]),
    ("pre", _with(_pre(), 1, lambda f: f[:, :-1]), ValueError, ["fn", "(24, 128)"]),
    ("pre", _with(_pre(), 1, lambda f: f.bfloat16()), TypeError, ["fn", "float32", "bfloat16"]),
    ("pre", _with(_pre(), 2, lambda s: s[:2]), ValueError, ["hc_scale", "(3,)"]),
    ("pre", _with(_pre(), 3, lambda b: b.double()), TypeError, ["hc_base", "float32"]),
    ("pre", _with(_pre(), 1, lambda f: f.to("meta")), ValueError, ["fn", "meta", "residual"]),
    ("post", _with(_post(), 0, lambda x: x.half()), TypeError, ["x", "bfloat16"]),
    ("post", _with(_post(), 0, lambda x: x[:, :-1]), ValueError, ["x", "(3, 32)"]),
    ("post", _with(_post(), 2, lambda p: p.squeeze(-1)), ValueError, ["post_mix", "(3, 4, 1)"]),
    ("post", _with(_post(), 3, lambda c: c.transpose(0, 1)), ValueError, ["comb_mix", "(3, 4, 4)"]),
    ("post", _with(_post(), 3, lambda c: c.bfloat16()), TypeError, ["comb_mix", "float32"]),
    ("head", _with(_head(), 1, lambda f: torch.randn(24, 128)), ValueError, ["fn", "(4, 128)"]),
    ("head", _with(_head(), 2, lambda s: torch.rand(3)), ValueError, ["hc_scale", "(1,)"]),
    ("head", _with(_head(), 3, lambda b: torch.rand(24)), ValueError, ["hc_base", "(4,)"]),
    ("fused_post_pre", _with(_fused(), 4, lambda f: torch.randn(4, 128)), ValueError, ["fn", "(24, 128)"]),
    ("fused_post_pre", _with(_fused(), 2, lambda p: p.to("meta")), ValueError, ["post_mix", "meta"]),
]


@pytest.mark.parametrize("op, args, exc, words", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_bad_input_names_the_argument(op, args, exc, words):
    with pytest.raises(exc) as e:
        getattr(mhc, op)(*args)
    for w in words:
        assert w in str(e.value), f"{w!r} not in {e.value}"


@pytest.mark.parametrize("value", [0, -1, 2.5])
def test_sinkhorn_repeat_must_be_a_positive_int(value):
    with pytest.raises((ValueError, TypeError), match="sinkhorn_repeat"):
        mhc.pre(*_pre(), sinkhorn_repeat=value)


def test_fp64_residual_needs_fp64_weights():
    (r, fn, s, b), _ = checking.make_inputs("pre", (2,), 4, 8, torch.float64, seed=0)
    mhc.pre(r, fn, s, b)  # all fp64: fine
    with pytest.raises(TypeError, match="fn must be float64"):
        mhc.pre(r, fn.float(), s, b)


def test_validation_runs_under_fake_tensors_too():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        r = torch.empty(3, 4, 32, dtype=torch.bfloat16)
        fn = torch.empty(24, 127)
        with pytest.raises(ValueError, match="fn must have shape"):
            torch.ops.mhc.pre(r, fn, torch.empty(3), torch.empty(24))
        p, c, li = torch.ops.mhc.pre(r, torch.empty(24, 128), torch.empty(3), torch.empty(24))
        assert (p.shape, c.shape, li.shape) == ((3, 4, 1), (3, 4, 4), (3, 32))
