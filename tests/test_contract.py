"""The contract every backend keeps (DESIGN.md), run against each backend that can serve here.

A backend only has to register itself to be tested: the ``backend`` fixture is parametrized over
the registry (see conftest.py). Outputs are poisoned with NaN before every run; inputs are fresh
random draws, never zeros; the oracle is the reference in fp64 (``mhc.checking``).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import mhc
from mhc import checking, registry
from mhc.validation import mix_dtype

from conftest import DEVICE

OPS = registry.OPS
# Non-powers of two and tiny sizes exercise the masking; 256/384 the vectorised paths.
H_VALUES = [1, 7, 64, 100, 256, 384]
N_VALUES = [1, 2, 4, 8]


def _small_h(backend: str) -> int:
    """A small H the backend accepts (64, or its required multiple, e.g. AITER's 256)."""
    m = registry.get(backend).capabilities.h_multiple
    return 64 if 64 % m == 0 else m * -(-64 // m)


def _check_outputs(op, args, kwargs, outs, backend):
    refs = checking.oracle(op, args, kwargs)
    res = args[1] if op in ("post", "fused_post_pre") else args[0]
    assert len(outs) == len(refs) == len(checking.OUTPUTS[op])
    for (name, kind), o in zip(checking.OUTPUTS[op], outs):
        want = res.dtype if kind == "act" else mix_dtype(res.dtype)
        assert o.dtype == want, f"{backend}.{op}.{name}: dtype {o.dtype}, expected {want}"
        assert o.device == res.device, f"{backend}.{op}.{name}: on {o.device}, input on {res.device}"
    for name, err, tol in checking.compare(op, outs, refs, res.dtype):
        assert err <= tol, f"{backend}.{op}.{name}: rel. error {err:.3e} > {tol:g}"


@pytest.mark.parametrize("op", OPS)
@given(data=st.data())
def test_matches_fp64_reference(backend, op, data):
    check_drawn_case(backend, op, data, DEVICE)


def check_drawn_case(backend, op, data, device):
    """One drawn (n, H, leading dims, dtype, scale, seed) on ``device``: the outputs match the fp64
    oracle, or the backend refuses with a BackendError that names it. (test_aiter.py runs it on
    CPU for the AITER stand-in whatever the test device is.)"""
    caps = registry.get(backend).capabilities
    dtypes = [d for d in (torch.bfloat16, torch.float16, torch.float32, torch.float64) if d in caps.dtypes]
    n = data.draw(st.sampled_from(N_VALUES), label="n")
    H = data.draw(st.sampled_from(H_VALUES), label="H")
    lead = tuple(data.draw(st.lists(st.integers(0, 5), min_size=0, max_size=3), label="lead"))
    dtype = data.draw(st.sampled_from(dtypes), label="dtype")
    scale = data.draw(st.sampled_from([1e-2, 1.0, 30.0]), label="scale")
    seed = data.draw(st.integers(0, 2**31 - 1), label="seed")
    T = math.prod(lead)
    args, kwargs = checking.make_inputs(op, lead, n, H, dtype, device, seed=seed, scale=scale)
    why = registry.reasons_for(backend, registry.Problem(op, device, dtype, n, H, T))
    if why:
        # An explicit choice that cannot serve must raise and say why, never fall back silently
        # (at T == 0 too: a call is refused or accepted the same way whatever T is).
        with pytest.raises(registry.BackendError, match=backend):
            checking.call(op, args, kwargs, backend)
        return
    _check_outputs(op, args, kwargs, checking.call(op, args, kwargs, backend), backend)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("lead", [(0,), (3, 0), (0, 2, 5)])
def test_empty_batch_returns_empty_outputs(backend, op, lead, monkeypatch, device=DEVICE):
    """T == 0 goes through the selection of ``backend`` (one that cannot serve the call refuses
    it, as at T > 0) and returns empty outputs of the oracle's shapes, the contract's dtypes and
    the input's device, without calling the backend's kernel (DESIGN.md: "launching nothing")."""
    selected, called = [], []
    real_select = registry.select

    def select(name, *a, **k):
        impl = real_select(name, *a, **k)
        selected.append(name)

        def spy(*args):
            called.append(name)
            return impl(*args)

        return spy

    monkeypatch.setattr(registry, "select", select)
    args, kwargs = checking.make_inputs(op, lead, 4, 256, torch.bfloat16, device, seed=1)
    if registry.reasons_for(backend, registry.Problem(op, device, torch.bfloat16, 4, 256, 0)):
        with pytest.raises(registry.BackendError, match=backend):
            checking.call(op, args, kwargs, backend)
        return
    outs = checking.call(op, args, kwargs, backend)
    assert selected == [op] and called == [], (selected, called)
    refs = checking.oracle(op, args, kwargs)
    assert len(outs) == len(refs) == len(checking.OUTPUTS[op])
    for (name, kind), o, r in zip(checking.OUTPUTS[op], outs, refs):
        want = torch.bfloat16 if kind == "act" else torch.float32
        assert o.shape == r.shape and o.numel() == 0, (name, o.shape, r.shape)
        assert o.dtype == want and o.device == args[0].device, (name, o.dtype, o.device)


@pytest.mark.parametrize("op", OPS)
def test_single_token_real_width(backend, op, device=DEVICE):
    """T == 1 at DeepSeek-V4's n=4, H=4096: the decode shape."""
    args, kwargs = checking.make_inputs(op, (1,), 4, 4096, torch.bfloat16, device, seed=2)
    _check_outputs(op, args, kwargs, checking.call(op, args, kwargs, backend), backend)


@pytest.mark.parametrize("op", ["pre", "post", "head", "fused_post_pre"])
def test_non_contiguous_inputs(backend, op):
    """Strided views are accepted (the op layer makes them contiguous) and give the same answer."""
    args, kwargs = checking.make_inputs(op, (6,), 4, _small_h(backend), torch.bfloat16, DEVICE, seed=3)
    # The same values, every other element of a wider buffer whose gaps hold NaN: a kernel that
    # ignored strides would read the NaNs.
    strided = [torch.stack([a, torch.full_like(a, float("nan"))], -1)[..., 0] for a in args]
    assert not any(t.is_contiguous() for t in strided if t.numel() > 1)
    want = checking.call(op, tuple(args), kwargs, backend)
    got = checking.call(op, tuple(strided), kwargs, backend)
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


@pytest.mark.parametrize("op", ["pre", "head", "fused_post_pre"])  # post has no scalar arguments
def test_sinkhorn_repeat_and_scalars_are_honoured(backend, op):
    """Non-default scalars reach the kernels (a kernel that hard-codes 20 or 2.0 fails here)."""
    args, kwargs = checking.make_inputs(op, (5,), 4, _small_h(backend), torch.bfloat16, DEVICE, seed=4)
    if op == "head":
        kwargs = dict(rms_eps=1e-2, hc_eps=0.25)
    else:
        kwargs = dict(rms_eps=1e-2, hc_pre_eps=0.25, hc_sinkhorn_eps=1e-3, hc_post_mult_value=1.5, sinkhorn_repeat=3)
    _check_outputs(op, args, kwargs, checking.call(op, args, kwargs, backend), backend)


def test_leading_dims_are_restored(backend):
    H = _small_h(backend)
    args, kwargs = checking.make_inputs("pre", (2, 3), 4, H, torch.bfloat16, DEVICE, seed=5)
    p, c, li = mhc.pre(*args, **kwargs, backend=backend)
    assert p.shape == (2, 3, 4, 1) and c.shape == (2, 3, 4, 4) and li.shape == (2, 3, H)


def check_outputs_are_their_own(backend, op, device=DEVICE, H=None):
    """Through both ways in, with inputs that require grad and leading dims flat or not: no output
    shares storage with an input or with another output, and in-place updates of the outputs
    work and reach the gradients as the same updates made out of place do (an output that is a
    view, even of a tensor nobody else holds, is refused an in-place update by autograd).
    fused_post_pre's new residual is saved for its backward (what pre read), so updating it in
    place makes backward raise autograd's version-counter error, as for ``torch.exp``'s output.
    (test_aiter.py runs it for the AITER stand-in.)"""
    H = H or _small_h(backend)
    saved = 0 if op == "fused_post_pre" else None
    for lead in ((3,), (2, 3)):
        args, kwargs = checking.make_inputs(op, lead, 4, H, torch.bfloat16, device, seed=21)
        weights = [torch.rand(o.shape, dtype=torch.float64, device=device) + 0.5
                   for o in checking.oracle(op, args, kwargs)]
        for way in (getattr(mhc, op), getattr(torch.ops.mhc, op)):
            grads = []
            for in_place in (False, True, "saved"):
                leaves = [a.clone().requires_grad_(True) for a in args]
                outs = way(*leaves, **kwargs, backend=backend)
                outs = list(outs) if isinstance(outs, tuple) else [outs]
                ins = {a.untyped_storage().data_ptr() for a in leaves}
                ptrs = [o.untyped_storage().data_ptr() for o in outs]
                assert not ins & set(ptrs) and len(set(ptrs)) == len(ptrs), f"{backend}.{op}: outputs alias"
                if in_place == "saved":
                    if saved is not None:
                        outs[saved].mul_(2)
                        loss = sum((o.double() * w).sum() for o, w in zip(outs, weights))
                        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
                            torch.autograd.grad(loss, leaves)
                    continue
                for i in range(len(outs)):
                    if i == saved:
                        continue
                    if in_place:
                        outs[i].mul_(2)
                    else:
                        outs[i] = outs[i] * 2
                loss = sum((o.double() * w).sum() for o, w in zip(outs, weights))
                grads.append(torch.autograd.grad(loss, leaves))
            for w, g in zip(*grads):
                torch.testing.assert_close(g, w, rtol=0, atol=0)


@pytest.mark.parametrize("op", OPS)
def test_outputs_are_their_own_tensors(backend, op):
    check_outputs_are_their_own(backend, op)


def test_the_scalars_defaults_have_one_home():
    """Every schema (forward and backward ops) and every public signature takes its scalar
    defaults from ``mhc.reference.DEFAULTS``: a change there is the only change needed."""
    import inspect

    from mhc import reference

    from mhc import ops, validation

    D = reference.DEFAULTS
    checked = 0
    for name in ("pre", "head", "fused_post_pre", "pre_backward"):
        for arg in getattr(torch.ops.mhc, name).default._schema.arguments:
            if arg.name in D and arg.default_value is not None:
                assert arg.default_value == D[arg.name], (name, arg.name, arg.default_value)
                checked += 1
    for fn in (mhc.pre, mhc.head, mhc.fused_post_pre, ops.pre, ops.head, ops.fused_post_pre, validation.check_pre):
        for p in inspect.signature(fn).parameters.values():
            if p.name in D and p.default is not inspect.Parameter.empty:
                assert p.default == D[p.name], (fn.__qualname__, p.name, p.default)
                checked += 1
    assert checked >= 40, checked  # 16 schema defaults + 7 x 3..6 signature defaults
