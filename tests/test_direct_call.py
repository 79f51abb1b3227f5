"""The public wrappers' direct call (``mhc.ops.direct_ok``): where the dispatcher would only box the
arguments and call the op's kernel, ``mhc.pre`` and the others call that kernel themselves. These
tests check both halves of that promise on CPU: the plain call takes the direct path and gives
what ``torch.ops.mhc.*`` gives, and every case the dispatcher treats differently (modes,
transforms, autocast, the profiler, subclasses, meta/sparse tensors, scalars the schema would
convert or refuse) goes through the dispatcher and keeps its behaviour.
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
    """Every ``direct_ok`` answer the wrappers get, in order."""
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
    assert verdicts == [True]  # the eager autograd function's forward
    (li.float().sum() + post_mix.sum() + comb_mix.sum()).backward()
    assert all(a.grad is not None and torch.isfinite(a.grad).all() for a in args)
