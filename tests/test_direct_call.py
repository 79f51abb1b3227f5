"""The public functions' direct call: where the dispatcher would only box the arguments and call the
op's kernel (``mhc.ops.direct_ok``), ``mhc.pre`` and the others run that kernel themselves (or the
op's ``autograd.Function``, where a gradient can flow). These tests check both halves of that
promise on CPU: the plain call is direct and gives what ``torch.ops.mhc.*`` gives (values,
gradients, errors), and every case
the dispatcher treats differently (modes, transforms, autocast, the profiler, subclasses,
meta/sparse tensors, scalars the schema would convert or refuse) goes through the dispatcher and
keeps its behaviour.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import mhc
from mhc import checking, ops

OPS = ("pre", "post", "head", "fused_post_pre")


@pytest.fixture
def verdicts(monkeypatch):
    """The path each public call takes, in order: every ``direct_ok`` answer (True: the op's
    kernel or ``autograd.Function`` without the dispatcher; False: ``torch.ops.mhc.<op>``)."""
    seen: list[bool] = []
    real = ops.direct_ok

    def spy(*a):
        seen.append(real(*a))
        return seen[-1]

    monkeypatch.setattr(ops, "direct_ok", spy)
    return seen


def _inputs(op, seed=0):
    return checking.make_inputs(op, (3,), 4, 64, torch.bfloat16, seed=seed)


def _via_dispatcher(op, args, kw):
    out = getattr(torch.ops.mhc, op)(*args, **kw, backend="torch")
    return out if isinstance(out, tuple) else (out,)


@pytest.mark.parametrize("op", OPS)
def test_the_plain_call_is_direct_and_equals_the_dispatched_op(op, verdicts):
    args, kw = _inputs(op, seed=1)
    got = checking.call(op, args, kw, "torch")
    assert verdicts == [True]
    for g, w in zip(got, _via_dispatcher(op, args, kw)):
        assert torch.equal(g, w)


def test_parameters_are_plain_tensors(verdicts):
    args, kw = _inputs("pre", seed=2)
    args = (args[0], torch.nn.Parameter(args[1], requires_grad=False), *args[2:])
    mhc.pre(*args, **kw, backend="torch")
    assert verdicts == [True]


def test_a_dispatch_mode_sees_the_op(verdicts):
    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    args, kw = _inputs("post", seed=3)
    with Record():
        mhc.post(*args, backend="torch")
    assert verdicts == [False] and "mhc.post.default" in seen


def test_a_function_mode_gets_the_dispatcher(verdicts):
    args, kw = _inputs("head", seed=4)
    with torch.device("cpu"):  # a TorchFunctionMode
        got = mhc.head(*args, **kw, backend="torch")
    assert verdicts == [False]
    assert torch.equal(got, _via_dispatcher("head", args, kw)[0])


def test_autocast_gets_the_dispatcher_and_its_no_autocast_kernel(verdicts):
    args, kw = _inputs("pre", seed=5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = mhc.pre(*args, **kw, backend="torch")
    assert verdicts == [False]
    for g, w in zip(got, _via_dispatcher("pre", args, kw)):  # the mixes are computed as outside autocast
        assert torch.equal(g, w)


def test_the_profiler_records_the_op(verdicts):
    args, kw = _inputs("fused_post_pre", seed=6)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        mhc.fused_post_pre(*args, **kw, backend="torch")
    assert verdicts == [False]
    assert any(e.name == "mhc::fused_post_pre" for e in prof.events())


def test_a_subclass_gets_the_dispatcher(verdicts):
    class Sub(torch.Tensor):
        pass

    args, kw = _inputs("post", seed=7)
    got = mhc.post(args[0].as_subclass(Sub), *args[1:], backend="torch")
    assert verdicts == [False]
    assert torch.equal(torch.Tensor(got) if isinstance(got, Sub) else got, _via_dispatcher("post", args, kw)[0])


def test_meta_tensors_get_the_fake_impl(verdicts):
    args, kw = _inputs("pre", seed=8)
    meta = tuple(a.to("meta") for a in args)
    out = mhc.pre(*meta, **kw, backend="torch")
    assert verdicts == [False]
    assert [o.device.type for o in out] == ["meta"] * 3 and out[2].shape == (3, 64)


def test_a_sparse_residual_is_refused_by_name(verdicts):
    args, kw = _inputs("head", seed=9)
    with pytest.raises(TypeError, match="residual must be a dense"):
        mhc.head(args[0].to_sparse(), *args[1:], **kw, backend="torch")
    assert verdicts == [False]


def test_vmap_reaches_the_dispatcher(verdicts):
    args, _ = _inputs("post", seed=10)
    other, _ = _inputs("post", seed=20)
    batched = tuple(torch.stack([a, b]) for a, b in zip(args, other))
    got = torch.func.vmap(lambda *a: mhc.post(*a, backend="torch"))(*batched)  # functorch's loop fallback
    assert verdicts and not any(verdicts)
    for i, inputs in enumerate((args, other)):
        assert torch.equal(got[i], _via_dispatcher("post", inputs, {})[0])


def test_a_scalar_the_schema_refuses_is_refused(verdicts):
    args, kw = _inputs("pre", seed=11)
    with pytest.raises(TypeError, match="rms_eps"):
        mhc.pre(*args, **dict(kw, rms_eps="1e-6"), backend="torch")
    assert verdicts == [False]


class _Float(float):  # a float subclass, as numpy.float64 is
    pass


@pytest.mark.parametrize("kind", ["float subclass", "0-dim tensor"])
def test_a_scalar_the_schema_converts_is_converted(verdicts, kind):
    args, kw = _inputs("pre", seed=12)
    value = _Float(kw["rms_eps"]) if kind == "float subclass" else torch.tensor(kw["rms_eps"], dtype=torch.float64)
    got = mhc.pre(*args, **dict(kw, rms_eps=value), backend="torch")
    assert verdicts == [False]
    for g, w in zip(got, _via_dispatcher("pre", args, kw)):
        assert torch.equal(g, w)


def test_inputs_requiring_grad_use_the_direct_kernel_below_autograd(verdicts):
    args, kw = _inputs("pre", seed=13)
    args = tuple(a.detach().requires_grad_() for a in args)
    post_mix, comb_mix, li = mhc.pre(*args, **kw, backend="torch")
    assert verdicts == [True]  # mhc.autograd.FUNCTIONS, applied without the dispatcher
    (li.float().sum() + post_mix.sum() + comb_mix.sum()).backward()
    assert all(a.grad is not None and torch.isfinite(a.grad).all() for a in args)


# --- the direct call against the dispatcher ---------------------------------------------------------


def _outcome(op, args, kw):
    """``("ok", outputs)`` or ``(exception type, message)`` of ``mhc.<op>(*args, **kw)``."""
    try:
        out = getattr(mhc, op)(*args, **kw)
    except Exception as e:  # noqa: BLE001 - the point is to compare whatever is raised
        return type(e), str(e)
    return "ok", out if isinstance(out, tuple) else (out,)


def _dispatched(monkeypatch):
    """Send every public call through the dispatcher (``torch.ops.mhc.<op>``), as under torch.compile."""
    monkeypatch.setattr(ops, "direct_ok", lambda *a: False)


def _same(got, want):
    assert got[0] == want[0], (got, want)
    if got[0] == "ok":
        assert len(got[1]) == len(want[1])
        for g, w in zip(got[1], want[1]):
            assert g.shape == w.shape and g.dtype == w.dtype and torch.equal(g, w)
    else:
        assert got[1] == want[1]


def _norm_weight(args, dtype=torch.float32, H=64, seed=0):
    """A norm weight in [0.5, 1.5) for ``args``' H."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(H, generator=g, dtype=torch.float64) + 0.5).to(dtype)


_WITH_NORM = [(op, norm) for op in OPS for norm in (False, True) if op in ("pre", "fused_post_pre") or not norm]


@pytest.mark.parametrize("op,norm", _WITH_NORM)
@pytest.mark.parametrize("lead", [(3,), (2, 3), (), (1,)])
def test_the_direct_call_equals_the_dispatched_call(op, lead, norm, verdicts, monkeypatch):
    args, kw = checking.make_inputs(op, lead, 4, 64, torch.bfloat16, seed=30)
    if norm:
        kw = dict(kw, norm_weight=_norm_weight(args), norm_eps=1e-5)
    kw = dict(kw, backend="torch")
    direct = _outcome(op, args, kw)
    assert verdicts == [True]
    _dispatched(monkeypatch)
    _same(direct, _outcome(op, args, kw))


@pytest.mark.parametrize("op,norm", _WITH_NORM)
def test_the_direct_call_records_the_ops_gradients(op, norm, verdicts):
    args, kw = checking.make_inputs(op, (2, 3), 4, 64, torch.float32, seed=31)
    if norm:
        kw = dict(kw, norm_weight=_norm_weight(args, seed=32))
    grads = []
    for f in (getattr(mhc, op), getattr(torch.ops.mhc, op)):  # the direct call; the op's autograd kernel
        leaves = [a.detach().requires_grad_() for a in args]
        extra = {k: (v.detach().requires_grad_() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
        out = f(*leaves, **extra, backend="torch")
        out = out if isinstance(out, tuple) else (out,)
        g = torch.Generator().manual_seed(33)
        sum((o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum() for o in out).backward()
        grads.append([t.grad for t in leaves] + [v.grad for v in extra.values() if isinstance(v, torch.Tensor)])
    assert verdicts == [True]
    for g, w in zip(*grads):
        assert g is not None and torch.equal(g, w)


def _bad_calls():
    """Calls the direct path refuses or that fail its checks (each with the op): they must raise
    or return what the dispatched call does."""
    cases = []
    for op in OPS:
        args, kw = checking.make_inputs(op, (2,), 4, 64, torch.bfloat16, seed=34)
        t = list(args)

        def with_arg(i, value, t=t):
            return tuple(value if j == i else a for j, a in enumerate(t))

        res = 0 if op in ("pre", "head") else 1
        cases += [
            (op, with_arg(res, t[res][:, :, :32]), kw, "residual H mismatch"),
            (op, with_arg(res, t[res][:0]), kw, "T == 0"),
            (op, with_arg(res, t[res][0, 0]), kw, "1-D residual"),
            (op, with_arg(res, t[res].tolist()), kw, "a list"),
            (op, with_arg(res, t[res].to(torch.int32)), kw, "int residual"),
            (op, with_arg(res, torch.zeros(2, 9, 64, dtype=torch.bfloat16)), kw, "n = 9"),
            (op, args, dict(kw, backend=""), "backend ''"),
            (op, args, dict(kw, backend=b"torch"), "backend bytes"),
            (op, args, dict(kw, backend="nosuch"), "unknown backend"),
            (op, args, dict(kw, backend="torch"), "a fine call"),
        ]
        if op != "post":
            w = 1 if op in ("pre", "head") else 4
            cases += [
                (op, with_arg(w, t[w][:, :-1]), kw, "fn shape"),
                (op, with_arg(w, t[w].double()), kw, "fn dtype"),
                (op, with_arg(w + 1, t[w + 1][:1] if op != "head" else t[w + 1].repeat(2)), kw, "hc_scale shape"),
                (op, args, dict(kw, rms_eps=-1.0), "negative eps"),
                (op, args, dict(kw, rms_eps=0), "an int eps"),
                (op, args, dict(kw, rms_eps=float("nan")), "a NaN eps"),
            ]
        if op in ("post", "fused_post_pre"):
            cases += [
                (op, with_arg(0, t[0].float()), kw, "x dtype"),
                (op, with_arg(2, t[2].to(torch.bfloat16)), kw, "post_mix dtype"),
                (op, with_arg(3, t[3][:, :2]), kw, "comb_mix shape"),
            ]
        if op in ("pre", "fused_post_pre"):
            cases += [
                (op, args, dict(kw, sinkhorn_repeat=True), "a bool repeat"),
                (op, args, dict(kw, sinkhorn_repeat=0), "repeat 0"),
                (op, args, dict(kw, sinkhorn_repeat=10**6), "repeat too large"),
                (op, args, dict(kw, hc_post_mult_value=float("inf")), "an infinite mult"),
                (op, args, dict(kw, norm_eps=-1.0), "negative norm_eps"),
                (op, args, dict(kw, norm_weight=torch.ones(32)), "norm_weight shape"),
                (op, args, dict(kw, norm_weight=torch.ones(64, dtype=torch.float16)), "norm_weight dtype"),
                (op, args, dict(kw, norm_weight=[1.0] * 64), "norm_weight a list"),
                (op, args, dict(kw, norm_weight=torch.ones(64).to_sparse()), "sparse norm_weight"),
            ]
    return cases


@pytest.mark.parametrize("op,args,kw,what", _bad_calls(), ids=[c[3] + "-" + c[0] for c in _bad_calls()])
def test_bad_calls_behave_as_through_the_dispatcher(op, args, kw, what, monkeypatch):
    kw = dict(kw)
    kw.setdefault("backend", "torch")
    got = _outcome(op, args, kw)
    _dispatched(monkeypatch)
    _same(got, _outcome(op, args, kw))
