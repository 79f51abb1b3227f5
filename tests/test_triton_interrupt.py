"""A Triton call that is interrupted part-way leaves nothing that corrupts a later call.

Regression: a KeyboardInterrupt (or a timeout) in the middle of ``mhc.head(..., backend="triton")``
left a non-zero arrival counter in ``mhc.backends.workspaces.WORKSPACES``; every later call that used that buffer
saw the wrong program as the last of its token block (off by 0.7-4.5, then all NaN). The
interrupt is injected inside the interpreter's atomic add, so this runs where the kernels are
interpreted (CPU); on a GPU a launch cannot be stopped half-way from Python.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

import mhc
from mhc import checking
from mhc.backends.workspaces import WORKSPACES

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")


@pytest.fixture
def interpreted():
    from mhc.backends.triton import launch

    if not launch.INTERPRETED:
        pytest.skip("needs the Triton interpreter (TRITON_INTERPRET=1) to stop a launch half-way")
    return launch


def _interrupt_after_atomics(monkeypatch, k: int):
    """Raise KeyboardInterrupt right after the interpreter's k-th atomic read-modify-write."""
    from triton.runtime import interpreter

    builder = interpreter.interpreter_builder
    original = builder.create_atomic_rmw
    seen = []

    def rmw(*a, **kw):
        out = original(*a, **kw)
        seen.append(1)
        if len(seen) == k:
            raise KeyboardInterrupt
        return out

    monkeypatch.setattr(builder, "create_atomic_rmw", rmw)


@pytest.mark.parametrize("op, T", [("head", 1), ("pre", 1), ("fused_post_pre", 1)])
def test_an_interrupted_call_does_not_poison_later_calls(interpreted, monkeypatch, op, T):
    """T = 1 runs the single-launch kernel with its tail, the one launch that counts arrivals
    (above SMALL_T the two-pass path has no counters)."""
    args, kw = checking.make_inputs(op, (T,), 4, 64, torch.bfloat16, seed=51)
    want = checking.call(op, args, kw, "triton")
    with monkeypatch.context() as m:
        _interrupt_after_atomics(m, 1)  # one program has counted in: its block's counter is 1
        with pytest.raises(KeyboardInterrupt):
            checking.call(op, args, kw, "triton")
    for _ in range(2):
        got = checking.call(op, args, kw, "triton")
        for (name, _), g, w in zip(checking.OUTPUTS[op], got, want):
            assert torch.equal(g, w), f"{op}.{name} differs after an interrupted call"
    for buf in WORKSPACES.counter_buffers():  # the pool holds only zeroed buffers
        assert int(buf.count_nonzero()) == 0
    refs = checking.oracle(op, args, kw)
    for name, err, tol in checking.compare(op, got, refs, torch.bfloat16):
        assert err <= tol, f"{op}.{name}: {err:.2e} > {tol:g}"


def test_the_issue_reproducer(interpreted, monkeypatch):
    """``mhc.head`` at T = 1, interrupted, then called again on fresh inputs."""
    args, kw = checking.make_inputs("head", (1,), 4, 64, torch.bfloat16, seed=52)
    with monkeypatch.context() as m:
        _interrupt_after_atomics(m, 1)
        with pytest.raises(KeyboardInterrupt):
            mhc.head(*args, **kw, backend="triton")
    for seed in (53, 54):
        args, kw = checking.make_inputs("head", (1,), 4, 64, torch.bfloat16, seed=seed)
        out = mhc.head(*args, **kw, backend="triton")
        err = checking.rel_error(out, checking.oracle("head", args, kw)[0])
        assert err <= checking.TOLERANCES[torch.bfloat16]["act"], f"head after an interrupted call: {err:.2e}"
