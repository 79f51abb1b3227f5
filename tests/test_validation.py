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


# --- scalars, backend names and tensor layouts that were accepted or misreported --------------------


@pytest.mark.parametrize("op", ["pre", "fused_post_pre"])
@pytest.mark.parametrize("value, exc", [(True, TypeError), (False, TypeError), (10**9, ValueError),
                                        (1001, ValueError),
                                        (2**63, ValueError)])
def test_sinkhorn_repeat_is_a_bounded_int(op, value, exc):
    """Regression: True was taken as 1, 10**9 ran for minutes, 2**63 failed with "expected int ...
    found int"."""
    args = _pre() if op == "pre" else _fused()
    with pytest.raises(exc, match=r"sinkhorn_repeat must be an int in \[1, 1000\]"):
        getattr(mhc, op)(*args, sinkhorn_repeat=value)


def test_sinkhorn_repeat_at_its_bound_runs():
    a, kw = checking.make_inputs("pre", (2,), 4, 8, torch.float32, seed=81)
    kw["sinkhorn_repeat"] = 1000
    assert mhc.validation.MAX_SINKHORN_REPEAT == 1000  # README and DESIGN.md state it
    for name, err, tol in checking.compare("pre", mhc.pre(*a, **kw), checking.oracle("pre", a, kw), torch.float32):
        assert err <= tol, name


_EPS_ARGS = {"pre": ("rms_eps", "hc_pre_eps", "hc_sinkhorn_eps"), "head": ("rms_eps", "hc_eps"),
             "fused_post_pre": ("rms_eps", "hc_pre_eps", "hc_sinkhorn_eps")}


@pytest.mark.parametrize("op, eps", [(op, e) for op, names in _EPS_ARGS.items() for e in names])
@pytest.mark.parametrize("value", [-1e-6, float("nan"), float("inf")])
def test_eps_must_be_finite_and_non_negative(op, eps, value):
    """Regression: a negative eps gave finite garbage (torch) or an all-NaN comb (Triton)."""
    args = {"pre": _pre, "head": _head, "fused_post_pre": _fused}[op]()
    with pytest.raises(ValueError, match=f"{eps} must be a finite number >= 0"):
        getattr(mhc, op)(*args, **{eps: value})
    getattr(mhc, op)(*args, **{eps: 0.0})  # zero is allowed


def test_eps_is_checked_by_the_backward_ops_too():
    (r, fn, s, b), _ = checking.make_inputs("pre", (3,), 4, 32, torch.float32, seed=82)
    grads = (torch.randn(3, 4, 1), torch.randn(3, 4, 4), torch.randn(3, 32))
    with pytest.raises(ValueError, match="hc_sinkhorn_eps"):
        torch.ops.mhc.pre_backward(*grads, r, fn, s, b, 1e-6, 1e-6, -1.0, 2.0, 20, [True] * 4)
    with pytest.raises(ValueError, match="hc_post_mult_value must be finite"):
        mhc.pre(r, fn, s, b, hc_post_mult_value=float("inf"))


@pytest.mark.parametrize("bad, exc, words", [("", ValueError, "backend=''"), (b"torch", TypeError, "got bytes"),
                                             (1, TypeError, "got int")])
def test_backend_must_be_a_non_empty_str(bad, exc, words):
    """Regression: backend="" was taken as auto and b"torch" as "torch"."""
    for op, args in (("pre", _pre()), ("post", _post())):
        with pytest.raises(exc, match=words):
            getattr(mhc, op)(*args, backend=bad)
    with pytest.raises(ValueError, match="unknown mhc backend ''"):  # the op itself, below the API
        torch.ops.mhc.post(*_post(), backend="")


_LAYOUTS = {"sparse_coo": lambda t: t.to_sparse(),
            "sparse_csr": lambda t: t.reshape(-1, t.shape[-1]).to_sparse_csr(),
            "nested": lambda t: torch.nested.nested_tensor(list(t.unbind(0))),
            "jagged": lambda t: torch.nested.nested_tensor(list(t.unbind(0)), layout=torch.jagged)}


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors is in prototype stage")
@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta state")
@pytest.mark.parametrize("layout", ["sparse_coo", "sparse_csr", "nested", "jagged"])
@pytest.mark.parametrize("op, i, name", [("pre", 0, "residual"), ("pre", 1, "fn"), ("post", 0, "x"),
                                         ("post", 1, "residual"), ("head", 0, "residual"),
                                         ("fused_post_pre", 3, "comb_mix")])
def test_sparse_and_nested_tensors_are_a_type_error_naming_the_argument(op, i, name, layout):
    """Regression: sparse inputs got "unsupported memory format", nested ones NotImplementedError."""
    convert = _LAYOUTS[layout]
    args = {"pre": _pre, "post": _post, "head": _head, "fused_post_pre": _fused}[op]()
    try:
        args[i] = convert(args[i])
    except RuntimeError as e:  # a layout torch cannot build from this tensor (e.g. 1-D csr)
        pytest.skip(f"cannot make {layout} from {name}: {e}")
    for f in (getattr(mhc, op), getattr(torch.ops.mhc, op)):
        with pytest.raises(TypeError, match=f"{name} must be a dense \\(strided\\) torch.Tensor"):
            f(*args)


def test_a_list_argument_gives_a_short_type_error():
    """Regression (issue 17): the dispatcher's message printed the whole list (170 KB for 8x4x512)."""
    args = _pre()
    args[0] = torch.randn(8, 4, 512).tolist()
    with pytest.raises(TypeError) as e:
        mhc.pre(*args)
    assert str(e.value) == "mhc.pre: residual must be Tensor, got list"
