"""Backward kernels on a real GPU: every backend that serves a backward op, at DeepSeek-V4 sizes,
against the hand-derived backward (``mhc.backward``) evaluated in fp64 on the CPU.

Marked ``gpu``: skipped on CPU machines (the Triton backward also runs under the interpreter in
tests/test_triton_backward.py there).
"""

from __future__ import annotations

import pytest
import torch

import mhc
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


# --- the training issue's GPU checks: every op's Triton backward at training sizes -------------------

_TRAIN_OPS = ("pre", "head", "post", "fused_post_pre")


def _triton_backward_or_skip(op: str, H: int, T: int) -> None:
    """Skip (with the registry's reasons) where Triton cannot serve ``op``'s forward and backward."""
    why = []
    for o in (op, f"{op}_backward"):
        try:
            why += registry.reasons_for("triton", registry.Problem(o, torch.device("cuda"), torch.bfloat16, 4, H, T))
        except registry.BackendError as e:
            why.append(str(e))
    if why:
        pytest.skip("; ".join(why))


def _training_inputs(op: str, H: int, T: int, norm: bool, seed: int):
    """``(leaves, kwargs)``: :func:`mhc.checking.device_inputs` with every float tensor a leaf that
    requires grad; with ``norm`` a random bf16 ``norm_weight`` (a leaf too, the last one)."""
    args, kwargs = checking.device_inputs(op, T, 4, H, "cuda", seed=seed)
    leaves = [a.detach().clone().requires_grad_(a.is_floating_point()) for a in args]
    if norm:
        g = torch.Generator(device="cuda").manual_seed(seed + 7)
        w = (1 + 0.1 * torch.randn(H, generator=g, device="cuda")).to(torch.bfloat16).requires_grad_(True)
        kwargs = {**kwargs, "norm_weight": w}
        leaves.append(w)
    return leaves, kwargs


def _run(op: str, leaves, kwargs, norm: bool, ups=None):
    """Outputs and the gradients of every leaf under Triton (forward and backward ops)."""
    args = leaves[:-1] if norm else leaves
    with mhc.use_backend("triton"):
        outs = checking.call(op, tuple(args), kwargs)
    if ups is None:
        g = torch.Generator(device="cuda").manual_seed(11)
        ups = [torch.randn(o.shape, generator=g, device="cuda", dtype=torch.float32).to(o.dtype) for o in outs]
    grads = torch.autograd.grad(outs, [x for x in leaves if x.requires_grad], ups)
    return outs, grads, ups


@pytest.mark.parametrize("T", [4096, 16384])
@pytest.mark.parametrize("H", [4096, 7168])
@pytest.mark.parametrize("op,norm", [(o, False) for o in _TRAIN_OPS] + [("pre", True), ("fused_post_pre", True)])
def test_triton_gradients_at_training_sizes_match_fp64(op, norm, H, T):
    """Every gradient of the Triton backward (the fused RMSNorm's weight included) within
    GRAD_TOLERANCES of fp64 autograd of the reference, at the values the kernels received
    (hc_scale's by checking.grad_error's "sum" measure)."""
    _triton_backward_or_skip(op, H, T)
    leaves, kwargs = _training_inputs(op, H, T, norm, seed=H + T)
    outs, grads, ups = _run(op, leaves, kwargs, norm)
    names = [name for name, _ in checking.GRAD_INPUTS[op]] + (["norm_weight"] if norm else [])
    kinds = [kind for _, kind in checking.GRAD_INPUTS[op]] + (["act"] if norm else [])
    # hc_scale per token (checking.per_token): its gradient is judged against its terms' sizes
    f64 = [checking.per_token(x, T) if kind == "sum" else x.detach().double().requires_grad_(x.requires_grad)
           for x, kind in zip(leaves, kinds)]
    kw64 = {**kwargs, "norm_weight": f64[-1]} if norm else kwargs
    with torch.enable_grad():
        # fused_post_pre: pre's reference reads the new residual the op stored (checking.reference_f64)
        want_outs = checking.reference_f64(op, f64[:-1] if norm else f64, kw64,
                                           leaves[1].dtype if op == "fused_post_pre" else leaves[0].dtype,
                                           outs[0] if op == "fused_post_pre" else None)
        want = torch.autograd.grad(want_outs, [x for x in f64 if x.requires_grad], [u.double() for u in ups])
    bad = []
    for name, kind, g, w in zip(names, kinds, grads, want):
        err, tol = checking.grad_error(kind, g, w), TOL[kind]
        if not err <= tol:
            bad.append(f"{name}: {err:.2e} > {tol}")
    assert len(grads) == len(names) and not bad, f"triton {op} norm={norm} H={H} T={T}: " + "; ".join(bad)


@pytest.mark.parametrize("op", _TRAIN_OPS)
def test_triton_gradients_are_bitwise_identical_over_100_runs_at_16384_tokens(op):
    """grad_fn, grad_hc_scale and grad_hc_base sum over every token: a fixed reduction order (no
    float atomics) makes every gradient bitwise repeatable."""
    H, T = 7168, 16384
    _triton_backward_or_skip(op, H, T)
    leaves, kwargs = _training_inputs(op, H, T, False, seed=3)
    outs, first, ups = _run(op, leaves, kwargs, False)
    del outs
    differing = []
    for run in range(1, 100):
        _, grads, _ = _run(op, leaves, kwargs, False, ups)
        differing += [f"run {run}: grad {i}" for i, (a, b) in enumerate(zip(first, grads)) if not torch.equal(a, b)]
    assert not differing, f"triton {op} backward is not deterministic: " + ", ".join(differing[:10])


@pytest.mark.parametrize("op", _TRAIN_OPS)
def test_forward_and_backward_replay_from_a_cuda_graph(op):
    """Forward + torch.autograd.grad captured in one CUDA graph: a replay on new input values gives
    the eager gradients of those values bitwise."""
    H, T = 4096, 512
    _triton_backward_or_skip(op, H, T)
    leaves, kwargs = _training_inputs(op, H, T, False, seed=21)
    _, _, ups = _run(op, leaves, kwargs, False)  # warm-up: compiles, fills the plan and workspace caches
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _, static_grads, _ = _run(op, leaves, kwargs, False, ups)
    fresh, _ = _training_inputs(op, H, T, False, seed=22)
    with torch.no_grad():
        for x, y in zip(leaves, fresh):
            x.copy_(y)
    graph.replay()
    torch.cuda.synchronize()
    _, eager, _ = _run(op, leaves, kwargs, False, ups)
    for i, (g, e) in enumerate(zip(static_grads, eager)):
        assert torch.equal(g, e), f"{op}: grad {i} of the replay differs from eager"


def test_torch_compile_of_a_training_step():
    """A block of pre -> Linear -> post twice, its mHC parameters trainable, compiled fullgraph:
    loss.backward() through the Triton backward ops gives eager's gradients."""
    H, T = 4096, 256
    _triton_backward_or_skip("pre", H, T)
    _triton_backward_or_skip("post", H, T)
    torch._dynamo.reset()

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.ModuleList(torch.nn.Linear(H, H, bias=False, device="cuda", dtype=torch.bfloat16)
                                           for _ in range(2))
            self.fn, self.scale, self.base = torch.nn.ParameterList(), torch.nn.ParameterList(), torch.nn.ParameterList()
            for i in range(2):
                (_, fn, scale, base), _ = checking.make_inputs("pre", (1,), 4, H, torch.bfloat16, "cuda", seed=80 + i)
                self.fn.append(fn)
                self.scale.append(scale)
                self.base.append(base)

        def forward(self, residual):
            for i in range(2):
                post_mix, comb_mix, layer_input = mhc.pre(residual, self.fn[i], self.scale[i], self.base[i])
                residual = mhc.post(self.lin[i](layer_input), residual, post_mix, comb_mix)
            return residual.float().square().mean()

    block = Block()
    residual = checking.device_inputs("pre", T, 4, H, "cuda", seed=81)[0][0]

    def step(model):
        model.zero_grad(set_to_none=True)
        with mhc.use_backend("triton"):
            loss = model(residual)
            loss.backward()
        return loss.detach(), [p.grad.detach().clone() for p in model.parameters()]

    want_loss, want = step(block)
    compiled = torch.compile(block, fullgraph=True)
    got_loss, got = step(compiled)
    assert torch.allclose(got_loss, want_loss, rtol=1e-3)
    for (name, _), g, w in zip(block.named_parameters(), got, want):
        err = checking.rel_error(g, w)
        assert err <= TOL["act"], f"compiled training step: grad of {name} differs from eager by {err:.2e}"
