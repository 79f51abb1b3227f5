"""Backward kernels on a real GPU: every backend that serves a backward op, at DeepSeek-V4 sizes,
against the hand-derived backward (``mhc.backward``) evaluated in fp64 on the CPU.

Marked ``gpu``: skipped on CPU machines (the Triton backward also runs under the interpreter in
tests/test_triton_backward.py there).
"""

from __future__ import annotations

import pytest
import torch

from mhc import checking, registry

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA/ROCm GPU")]

_BWD = {"pre": "pre_backward", "post": "post_backward", "head": "head_backward"}


def _grads(op, args, kwargs, bwd_backend, fwd_backend, ups=None):
    """Gradients of ``sum(out * up)`` w.r.t. every input, and the upstream gradients ``ups`` used.

    ``ups`` default: drawn on the CPU and rounded to each output's dtype, so that the fp64 oracle
    can be handed the very same values (an unrounded bf16-output gradient would differ by ~4e-3
    per element, which sums over tokens into the parameter gradients)."""
    leaves = [a.detach().clone().requires_grad_(a.is_floating_point()) for a in args]
    with registry.use_backend(**{_BWD[op]: bwd_backend}):
        outs = checking.call(op, tuple(leaves), kwargs, fwd_backend)
    if ups is None:
        g = torch.Generator().manual_seed(5)
        ups = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.dtype) for o in outs]
    torch.autograd.backward(outs, [u.to(o.device, o.dtype) for u, o in zip(ups, outs)])
    return [leaf.grad for leaf in leaves], ups


def _backend_params():
    """(op, backend) pairs; a backend that cannot serve the op's backward here is a skip with its
    reasons (shown by ``-rs``), never a silent pass."""
    out = []
    for op in ("pre", "post", "head"):
        for name in registry.backend_names():
            try:
                why = registry.reasons_for(name, registry.Problem(_BWD[op], torch.device("cuda"), torch.bfloat16, 4,
                                                                  4096, 64))
            except registry.BackendError as e:
                why = [str(e)]
            out.append(pytest.param(op, name, marks=[pytest.mark.skip(reason="; ".join(why))] if why else [],
                                    id=f"{op}-{name}"))
    return out


#: The one table's gradient bounds for bf16 inputs: "act" for gradients in the activation dtype
#: (residual, x), "mix" for the fp32 ones (fn, hc_scale, hc_base, post_mix, comb_mix).
TOL = checking.GRAD_TOLERANCES[torch.bfloat16]


@pytest.mark.parametrize("T", [1, 64, 513])
@pytest.mark.parametrize("H", [4096, 7168])
@pytest.mark.parametrize("op,name", _backend_params())
def test_backward_matches_fp64(op, name, H, T):
    args, kwargs = checking.make_inputs(op, (T,), 4, H, torch.bfloat16, "cuda", seed=T + H)
    got, ups = _grads(op, args, kwargs, name, "torch")
    cpu64 = tuple(a.detach().cpu().double() for a in args)
    want, _ = _grads(op, cpu64, kwargs, "torch", "torch", ups=[u.cpu() for u in ups])
    compared = 0
    for i, (g, w) in enumerate(zip(got, want)):
        if w is None:  # an input without a gradient (not floating point)
            continue
        tol = TOL["act"] if g.dtype in (torch.bfloat16, torch.float16) else TOL["mix"]
        err = checking.rel_error(g, w)
        assert err <= tol, f"{name} {op} grad of input {i}: rel. error {err:.2e} > {tol}"
        compared += 1
    assert compared == len(args)
