"""The GPU suite (marked ``gpu``): every promise of DESIGN.md's contract checked at real sizes on
a real GPU. Skipped, with the reason, where no GPU is visible. Nothing here is timed: speed lives
in the benchmarks (``python benchmarks/bench.py``).

- every backend that can serve x every op against the fp64 oracle (``mhc.checking``) at n = 4,
  H in {4096, 7168}, T in {0, 1, 7, 64, 513, 4096}; outputs are poisoned with NaN by conftest,
  inputs are random and never zero;
- n = 6 and 8 at T = 2048 (pre, fused_post_pre): the widest tiles fit the GPU's shared memory;
- CUDA graphs: capture, then replay on new input values, matches an eager call bitwise;
- ``torch.library.opcheck`` of every op with each backend's kernels;
- ``torch.compile(fullgraph=True)`` of a small mHC block (pre -> Linear -> post, twice) with the
  default inductor backend: no graph break (fullgraph raises on one), matches eager;
- determinism: 100 runs at T = 16384 are bitwise identical;
- device scoping (2 GPUs): inputs on cuda:1 while cuda:0 is current give correct results on
  cuda:1 and leave ``torch.cuda.memory_allocated(0)`` unchanged;
- compute-sanitizer memcheck and racecheck over one call of every Triton kernel, backward too;
- the eager launch path (issue 14): Triton's direct launches equal the JIT path bitwise, and
  TileLang's direct calls its own path; TileLang's counters stay zero over repeated calls and
  graph replays (T = 1, 64, 4096); graphs
  captured after eager calls, replayed on two streams between eager calls, stay exact; two
  threads on two streams, and calls alternating between two unsynchronised streams, agree with
  serial calls.

Inputs come from :func:`mhc.checking.device_inputs` (the distributions of
``mhc.checking.make_inputs``, drawn on the GPU: make_inputs draws fp64 on the CPU, which takes
minutes at these sizes). Above 1024 tokens the oracle is evaluated on 1024 sampled token rows
(every op is row-independent, so those rows are compared exactly) and every output element must
be finite, which catches unwritten (poisoned) elements anywhere.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest
import torch

import mhc
from mhc import checking, registry
from mhc.validation import mix_dtype

from conftest import DEVICE

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU suite: no CUDA/ROCm GPU is visible here"),
]

OPS = registry.OPS
N = 4
H_VALUES = (4096, 7168)
T_VALUES = (0, 1, 7, 64, 513, 4096)
ORACLE_ROWS = 1024
ROOT = pathlib.Path(__file__).resolve().parent.parent


@functools.lru_cache(maxsize=None)
def _case(op: str, H: int, T: int):
    """Inputs on the GPU, the sampled rows and the oracle on them, shared by every backend."""
    args, kwargs = checking.device_inputs(op, T, N, H, DEVICE, seed=1000 * H + T)
    rows = checking.sample_rows(T, DEVICE, k=ORACLE_ROWS, seed=T)
    return args, kwargs, rows, checking.reference_rows(op, args, kwargs, rows)


def _assert_correct(op, args, kwargs, outs, rows, refs, backend):
    res = args[1] if op in ("post", "fused_post_pre") else args[0]
    for (name, kind), o in zip(checking.OUTPUTS[op], outs):
        want = res.dtype if kind == "act" else mix_dtype(res.dtype)
        assert o.dtype == want, f"{backend}.{op}.{name}: dtype {o.dtype}, expected {want}"
        assert o.device == res.device, f"{backend}.{op}.{name}: on {o.device}, inputs on {res.device}"
        assert o.shape[0] == res.shape[0], f"{backend}.{op}.{name}: {o.shape[0]} tokens, expected {res.shape[0]}"
    chk = checking.check_outputs(op, outs, refs, rows, res.dtype)
    assert chk.ok, f"{backend}.{op} T={res.shape[0]} H={res.shape[-1]}: {chk.text}"


def _gpu_backend(backend: str, op: str = "pre", H: int = 4096, T: int = 64, device=None, n: int = N) -> None:
    why = registry.reasons_for(backend, registry.Problem(op, device or DEVICE, torch.bfloat16, n, H, T))
    if why:
        pytest.skip(f"backend {backend} cannot serve {op} at n={n}, H={H}, T={T}: " + "; ".join(why))


@pytest.mark.parametrize("T", T_VALUES)
@pytest.mark.parametrize("H", H_VALUES)
@pytest.mark.parametrize("op", OPS)
def test_matches_fp64_oracle_at_real_sizes(backend, op, H, T):
    _gpu_backend(backend, op, H, max(T, 1))
    args, kwargs, rows, refs = _case(op, H, T)
    outs = checking.call(op, args, kwargs, backend)
    torch.cuda.synchronize()
    _assert_correct(op, args, kwargs, outs, rows, refs, backend)


@pytest.mark.parametrize("n", (6, 8))
@pytest.mark.parametrize("op", ("pre", "fused_post_pre"))
def test_wide_n_at_large_t_within_shared_memory(backend, op, n):
    """n >= 5 at T > 1024 takes the widest fn tiles; fused_post_pre there once needed 280-308 KB
    of shared memory, which the H100 refuses at load time (``configs.shared_estimate``)."""
    T, H = 2048, 4096
    _gpu_backend(backend, op, H, T, n=n)
    args, kwargs = checking.device_inputs(op, T, n, H, DEVICE, seed=90 + n)
    rows = checking.sample_rows(T, DEVICE, k=256, seed=n)
    outs = checking.call(op, args, kwargs, backend)
    torch.cuda.synchronize()
    _assert_correct(op, args, kwargs, outs, rows, checking.reference_rows(op, args, kwargs, rows), backend)


def _capture(fn):
    """``(graph, outputs)``: a CUDA graph of ``fn()`` captured after two warm-up calls on a side
    stream (compiles and loads happen outside the capture)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def _replay_on_new_inputs(op, backend, T, kwargs, seed):
    """Capture ``op`` on inputs drawn with ``seed``, copy the inputs drawn with ``seed + 1`` into
    them, replay, and check the captured outputs equal an eager call on the new inputs bitwise.
    Returns ``(new inputs, captured outputs)``."""
    static, _ = checking.device_inputs(op, T, N, 4096, DEVICE, seed=seed)
    static = tuple(a.clone() for a in static)
    graph, captured = _capture(lambda: checking.call(op, static, kwargs, backend))
    new, _ = checking.device_inputs(op, T, N, 4096, DEVICE, seed=seed + 1)
    for s, v in zip(static, new):
        s.copy_(v)
    graph.replay()
    torch.cuda.synchronize()
    eager = checking.call(op, new, kwargs, backend)
    for (name, _), c, e in zip(checking.OUTPUTS[op], captured, eager):
        assert torch.equal(c, e), f"{backend}.{op}.{name}: graph replay differs from eager"
    return new, captured


@pytest.mark.parametrize("T", (1, 513))
@pytest.mark.parametrize("op", OPS)
def test_cuda_graph_replay_matches_eager(backend, op, T):
    """Capture one call, copy new values into the captured inputs, replay: the outputs equal an
    eager call on the new values bitwise (and the oracle)."""
    _gpu_backend(backend, op, 4096, T)
    _, kwargs = checking.device_inputs(op, T, N, 4096, DEVICE, seed=7)
    new, captured = _replay_on_new_inputs(op, backend, T, kwargs, seed=7)
    rows = checking.sample_rows(T, DEVICE, k=ORACLE_ROWS)
    _assert_correct(op, new, kwargs, captured, rows, checking.reference_rows(op, new, kwargs, rows), backend)


class _Block(torch.nn.Module):
    """Two mHC sublayers: ``pre -> Linear -> post``, twice, with one backend."""

    def __init__(self, H: int, backend: str):
        super().__init__()
        self.backend = backend
        self.lin = torch.nn.ModuleList(torch.nn.Linear(H, H, bias=False, device=DEVICE, dtype=torch.bfloat16)
                                       for _ in range(2))
        for i in range(2):
            (_, fn, scale, base), _ = checking.make_inputs("pre", (1,), N, H, torch.bfloat16, DEVICE, seed=50 + i)
            self.register_buffer(f"fn{i}", fn)
            self.register_buffer(f"scale{i}", scale)
            self.register_buffer(f"base{i}", base)

    def forward(self, residual):
        for i in range(2):
            post_mix, comb_mix, layer_input = mhc.pre(residual, getattr(self, f"fn{i}"), getattr(self, f"scale{i}"),
                                                      getattr(self, f"base{i}"), backend=self.backend)
            residual = mhc.post(self.lin[i](layer_input), residual, post_mix, comb_mix, backend=self.backend)
        return residual


@pytest.mark.parametrize("T", [8, 513])
@pytest.mark.parametrize("op", OPS)
def test_opcheck_per_backend(backend, op, T):
    """``torch.library.opcheck`` (schema, autograd registration, fake impl against the real
    outputs, dynamic-shape AOT dispatch) with each backend's kernels on the GPU: the CPU suite
    runs it on the torch backend only. T = 513 takes Triton's two-pass path."""
    _gpu_backend(backend, op, 4096, T)
    args, kwargs = checking.device_inputs(op, T, N, 4096, DEVICE, seed=90 + T)
    torch.library.opcheck(getattr(torch.ops.mhc, op).default, args, {**kwargs, "backend": backend})


def test_torch_compile_fullgraph_of_an_mhc_block(backend):
    _gpu_backend(backend, "pre", 4096, 16)
    torch._dynamo.reset()
    block = _Block(4096, backend)
    residual = checking.device_inputs("pre", 16, N, 4096, DEVICE, seed=60)[0][0].view(2, 8, N, 4096)
    with torch.no_grad():
        want = block(residual)
        compiled = torch.compile(block, fullgraph=True)  # the default inductor backend; raises on a break
        got = compiled(residual)
        again = compiled(residual)
    assert got.shape == want.shape == residual.shape and got.dtype == torch.bfloat16
    err = checking.rel_error(got, want.to("cpu", torch.float64))
    assert err <= checking.TOLERANCES[torch.bfloat16]["act"], f"compiled block differs from eager: {err:.3e}"
    assert torch.equal(got, again), "two runs of the compiled block differ"


@pytest.mark.parametrize("H", H_VALUES)
@pytest.mark.parametrize("op", OPS)
def test_100_runs_at_16384_tokens_are_bitwise_identical(backend, op, H):
    _gpu_backend(backend, op, H, 16384)
    args, kwargs = checking.device_inputs(op, 16384, N, H, DEVICE, seed=70)
    first = checking.call(op, args, kwargs, backend)
    differing = []
    for run in range(1, 100):
        outs = checking.call(op, args, kwargs, backend)
        for (name, _), a, b in zip(checking.OUTPUTS[op], first, outs):
            if not torch.equal(a, b):
                differing.append(f"run {run}: {name}")
    assert not differing, f"{backend}.{op} H={H} is not deterministic: " + ", ".join(differing[:10])


@pytest.mark.skipif(torch.cuda.device_count() < 2,
                    reason=f"device scoping needs two GPUs ({torch.cuda.device_count()} visible)")
@pytest.mark.parametrize("op", OPS)
def test_inputs_on_cuda1_while_cuda0_is_current(backend, op):
    dev1 = torch.device("cuda", 1)
    _gpu_backend(backend, op, 4096, 64, device=dev1)
    torch.cuda.set_device(0)
    args, kwargs = checking.device_inputs(op, 64, N, 4096, dev1, seed=80)
    torch.cuda.synchronize(0)
    before = torch.cuda.memory_allocated(0)
    outs = checking.call(op, args, kwargs, backend)
    torch.cuda.synchronize(1)
    torch.cuda.synchronize(0)
    assert torch.cuda.current_device() == 0
    assert torch.cuda.memory_allocated(0) == before, f"{backend}.{op} allocated on cuda:0"
    rows = checking.sample_rows(64, dev1)
    _assert_correct(op, args, kwargs, outs, rows, checking.reference_rows(op, args, kwargs, rows), backend)


_SANITIZED = """
import torch
import mhc
from mhc import checking, registry

# One call of every Triton kernel: each op at DeepSeek-V4's widths; T=64 runs the small-T kernels,
# T=300 the two-pass path (prenorm_kernel, finalize_kernel).
for op, T, H in [(op, T, 4096) for op in registry.OPS for T in (64, 300)]:
    args, kw = checking.make_inputs(op, (T,), 4, H, torch.bfloat16, "cuda", seed=90)
    outs = checking.call(op, args, kw, "triton")
    torch.cuda.synchronize()
    for name, err, tol in checking.compare(op, outs, checking.oracle(op, args, kw), torch.bfloat16):
        assert err <= tol, (op, T, H, name, err, tol)
# And every backward kernel (prep, stats, tail, res), with and without the fused RMSNorm.
for op, T, norm in [(op, T, norm) for op in ("pre", "head", "post", "fused_post_pre") for T in (64, 300)
                    for norm in ((False, True) if op in ("pre", "fused_post_pre") else (False,))]:
    args, kw = checking.device_inputs(op, T, 4, 4096, "cuda", seed=91)
    leaves = [a.detach().clone().requires_grad_(a.is_floating_point()) for a in args]
    if norm:
        kw = {**kw, "norm_weight": torch.rand(4096, device="cuda").add(0.5).bfloat16().requires_grad_(True)}
    with mhc.use_backend("triton"):
        outs = checking.call(op, tuple(leaves), kw)
    wrt = [x for x in leaves if x.requires_grad] + ([kw["norm_weight"]] if norm else [])
    grads = torch.autograd.grad(outs, wrt, [torch.randn_like(o) for o in outs])
    torch.cuda.synchronize()
    assert all(bool(g.isfinite().all()) for g in grads), (op, T, norm)
print("SANITIZED-SCRIPT-OK")
"""


def _compute_sanitizer() -> str | None:
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and os.path.exists(os.path.join(root, "bin", "compute-sanitizer")):
            return os.path.join(root, "bin", "compute-sanitizer")
    return None


@pytest.mark.parametrize("tool", ["memcheck", "racecheck"])
def test_triton_kernels_are_clean_under_compute_sanitizer(tool, tmp_path):
    sanitizer = _compute_sanitizer()
    if sanitizer is None:
        pytest.skip("compute-sanitizer not found (PATH, $CUDA_HOME/bin, /usr/local/cuda/bin)")
    _gpu_backend("triton")
    script = tmp_path / "sanitized.py"
    script.write_text(_SANITIZED)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           # Without the caching allocator every tensor is its own allocation, so memcheck sees
           # an access past a tensor's end instead of landing inside a pooled block.
           "PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sanitizer, "--tool", tool, "--error-exitcode", "3", "--print-limit", "20",
                           sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert "SANITIZED-SCRIPT-OK" in out, f"the script did not finish under {tool}:\n{out[-4000:]}"
    # memcheck ends with "ERROR SUMMARY: 0 errors", racecheck with "RACECHECK SUMMARY: 0 hazards
    # displayed (0 errors, 0 warnings)".
    clean = re.search(r"ERROR SUMMARY: 0 errors|SUMMARY: 0 hazards displayed \(0 errors, 0 warnings\)", out)
    assert proc.returncode == 0 and clean, f"{tool} found errors:\n{out[-4000:]}"


# --- the eager launch path (issue 14): cached plans, direct Triton launches, counters ---------------


def _direct_path_is_bitwise_the_backends_own(backend: str, op: str, T: int, seed: int, own, direct) -> None:
    """``op`` by ``backend`` with its direct launch path off (``mhc.backends.<backend>.direct.ENABLED
    = False``: the backend's own launch), then on, twice (the first call of a plan, a warm one):
    the three give bitwise the same outputs. ``own(plans)`` and ``direct(plans)`` check that the
    plans of each run really took that path."""
    import importlib

    from mhc import plans

    _gpu_backend(backend, op, 4096, T)
    switch = importlib.import_module(f"mhc.backends.{backend}.direct")
    args, kwargs = checking.device_inputs(op, T, N, 4096, DEVICE, seed=seed)
    switch.ENABLED = False
    try:
        plans.PLANS.clear(backend)
        via_own = checking.call(op, args, kwargs, backend)
        torch.cuda.synchronize()
        ps = [p for _, p in plans.PLANS.items(backend)]
        assert ps and own(ps), f"{backend}.{op}: with the direct path off a plan still took it"
    finally:
        switch.ENABLED = True
    plans.PLANS.clear(backend)
    first, warm = (checking.call(op, args, kwargs, backend) for _ in range(2))
    torch.cuda.synchronize()
    ps = [p for _, p in plans.PLANS.items(backend)]
    assert ps and direct(ps), f"{backend}.{op}: a warm call did not take the direct path"
    for (name, _), a, b, c in zip(checking.OUTPUTS[op], via_own, first, warm):
        assert torch.equal(a, b) and torch.equal(a, c), f"{backend}.{op}.{name}: the direct path differs"


@pytest.mark.parametrize("T", (1, 64, 513))
@pytest.mark.parametrize("op", OPS)
def test_triton_direct_launch_equals_the_jit_path_bitwise(op, T):
    """``DirectKernel`` launches the handle that ``JITFunction.run`` returned: the same binary,
    so the outputs are bitwise those of the JIT path (``direct.ENABLED = False``, where no handle
    is kept), on the first (JIT) call of a key and on the warm (direct) calls after it."""
    def kernels(ps):
        return [k for p in ps for k in _direct_kernels(p)]

    _direct_path_is_bitwise_the_backends_own(
        "triton", op, T, 21, own=lambda ps: kernels(ps) and not any(k.handles for k in kernels(ps)),
        direct=lambda ps: kernels(ps) and all(k.handles for k in kernels(ps)))


def _misaligned(t: torch.Tensor) -> torch.Tensor:
    """``t``'s values in a view whose address is 2 elements past an allocation (not 16-byte aligned)."""
    buf = torch.empty(t.numel() + 2, dtype=t.dtype, device=t.device)
    out = buf[2:].view(t.shape)
    out.copy_(t)
    return out


@pytest.mark.parametrize("op", OPS)
def test_triton_launch_keys_pick_the_binary_triton_would(op):
    """The launchers look compiled kernels up by keys of their own (``DirectKernel.launch``). With
    ``direct.CHECK_KEYS`` every keyed launch also computes the generic key (which matches Triton's
    specialiser, tests/test_triton_direct.py) and raises if the two pick different binaries: run
    over every T bucket, a misaligned residual, sinkhorn_repeat 1 and 16 (Triton specialises ints
    on == 1 and % 16) and, for pre and fused_post_pre, a norm weight in bf16 and fp32. The same
    calls with the check off (the keyed fast path) then give bitwise the same outputs."""
    _gpu_backend("triton", op, 1024, 1)
    from mhc.backends.triton import direct

    cases = []
    for T in (1, 64, 513, 2048):
        args, kwargs = checking.device_inputs(op, T, N, 1024, DEVICE, seed=T)
        cases.append((args, kwargs))
        if T in (1, 513):
            r = 1 if op in ("post", "fused_post_pre") else 0  # the residual's position
            cases.append((args[:r] + (_misaligned(args[r]),) + args[r + 1:], kwargs))
        if op != "post" and op != "head" and T in (1, 64):
            cases.append((args, dict(kwargs, sinkhorn_repeat=1)))
            cases.append((args, dict(kwargs, sinkhorn_repeat=16)))
            if T == 1:
                for dt in (torch.bfloat16, torch.float32):
                    w = (torch.rand(1024, device=DEVICE) + 0.5).to(dt)
                    cases.append((args, dict(kwargs, norm_weight=w, norm_eps=1e-5)))
    direct.CHECK_KEYS = True
    try:
        checked = [checking.call(op, a, kw, "triton") for a, kw in cases for _ in range(2)][1::2]
    finally:
        direct.CHECK_KEYS = False
    for (a, kw), want in zip(cases, checked):
        got = checking.call(op, a, kw, "triton")
        for (name, _), x, y in zip(checking.OUTPUTS[op], got, want):
            assert torch.equal(x, y), f"triton.{op}.{name}: the keyed launch differs from the checked one"


def _direct_kernels(plan):
    from mhc.backends.triton import direct

    subs = [plan, getattr(plan, "post", None)]
    return [k for q in subs if q is not None for k in (getattr(q, a, None) for a in ("kernel", "prep", "prenorm", "finalize"))
            if isinstance(k, direct.DirectKernel)]


@pytest.mark.parametrize("T", (1, 64, 513))
@pytest.mark.parametrize("op", OPS)
def test_tilelang_direct_call_equals_the_tilelang_path_bitwise(op, T):
    """The launchers call each kernel's compiled function (``mhc.backends.tilelang.direct``):
    the outputs are bitwise those of ``kernel(*args)``, TileLang's own path (``direct.ENABLED =
    False``), and the plans really hold the compiled function."""
    _direct_path_is_bitwise_the_backends_own(
        "tilelang", op, T, 22, own=lambda ps: all(p.call is p.kernel for p in ps),
        direct=lambda ps: all(p.call is not p.kernel for p in ps))


@pytest.mark.parametrize("T", (1, 64, 4096))
@pytest.mark.parametrize("op", OPS)
def test_tilelang_counters_stay_zero_over_repeated_calls_and_replays(op, T):
    """The TileLang mix kernels leave their arrival counters zero (no memset per call; the last
    CTA of a token block to leave resets them): 20 eager calls in a row each equal the first
    bitwise (the first matches the oracle, outputs poisoned), a graph captured after them and
    replayed 5 times on new inputs matches an eager call each time, and every pooled counter
    buffer is all zero afterwards. A counter left non-zero would let the next call's wait pass
    before the partials are in: wrong or varying results."""
    _gpu_backend("tilelang", op, 4096, T)
    from mhc.backends.workspaces import WORKSPACES

    args, kwargs = checking.device_inputs(op, T, N, 4096, DEVICE, seed=71)
    static = tuple(a.clone() for a in args)
    first = checking.call(op, static, kwargs, "tilelang")
    rows = checking.sample_rows(T, DEVICE, k=ORACLE_ROWS, seed=T)
    torch.cuda.synchronize()
    _assert_correct(op, static, kwargs, first, rows, checking.reference_rows(op, static, kwargs, rows), "tilelang")
    for i in range(20):
        again = checking.call(op, static, kwargs, "tilelang")
        for (name, _), a, b in zip(checking.OUTPUTS[op], first, again):
            assert torch.equal(a, b), f"tilelang.{op}.{name}: call {i + 2} differs from the first"
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        captured = checking.call(op, static, kwargs, "tilelang")
    for r in range(5):
        new, _ = checking.device_inputs(op, T, N, 4096, DEVICE, seed=80 + r)
        for s, v in zip(static, new):
            s.copy_(v)
        g.replay()
        want = checking.call(op, new, kwargs, "tilelang")
        torch.cuda.synchronize()
        for (name, _), c, w in zip(checking.OUTPUTS[op], captured, want):
            assert torch.equal(c, w), f"tilelang.{op}.{name}: replay {r + 1} differs from eager"
    torch.cuda.synchronize()
    bufs = WORKSPACES.counter_buffers()
    assert op == "post" or bufs, "no pooled counter buffer: the mix launchers did not take their counters from the pool"
    for buf in bufs:
        assert int(buf.count_nonzero()) == 0, f"tilelang.{op} T={T}: a pooled counter buffer is not zero"


@pytest.mark.parametrize("T", (1, 64, 513))
@pytest.mark.parametrize("op", OPS)
def test_graphs_captured_after_eager_calls_stay_correct(backend, op, T):
    """Eager calls first (they fill the plan cache and, at T = 1, Triton's counter pool), then
    two graphs captured from the same inputs, then eager calls and replays of both graphs
    interleaved on two streams: every replay still matches an eager call bitwise (a workspace
    shared between a graph and eager calls, or between two graphs, would break this)."""
    _gpu_backend(backend, op, 4096, T)
    static, kwargs = checking.device_inputs(op, T, N, 4096, DEVICE, seed=31)
    static = tuple(a.clone() for a in static)
    for _ in range(3):
        checking.call(op, static, kwargs, backend)
    torch.cuda.synchronize()
    graphs, outs = [], []
    for _ in range(2):
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            outs.append(checking.call(op, static, kwargs, backend))
        graphs.append(g)
    other = torch.cuda.Stream()
    for round_ in range(3):
        new, _ = checking.device_inputs(op, T, N, 4096, DEVICE, seed=40 + round_)
        for s, v in zip(static, new):
            s.copy_(v)
        want = checking.call(op, new, kwargs, backend)
        graphs[0].replay()
        other.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(other):
            graphs[1].replay()
            eager_other = checking.call(op, new, kwargs, backend)
        torch.cuda.current_stream().wait_stream(other)
        torch.cuda.synchronize()
        for (name, _), w, a, b, e in zip(checking.OUTPUTS[op], want, outs[0], outs[1], eager_other):
            assert torch.equal(a, w) and torch.equal(b, w) and torch.equal(e, w), f"{backend}.{op}.{name} round {round_}"


@pytest.mark.parametrize("op", OPS)
def test_two_threads_on_two_streams_agree_with_serial_calls(backend, op):
    """Two threads, each on a stream of its own, call the op at T = 1, 64 and 513 at once (the
    plan cache, Triton's handles and counter pools shared): every result equals a serial call."""
    _gpu_backend(backend, op, 4096, 64)
    import threading

    cases = {T: checking.device_inputs(op, T, N, 4096, DEVICE, seed=50 + T) for T in (1, 64, 513)}
    serial = {T: checking.call(op, a, kw, backend) for T, (a, kw) in cases.items()}
    torch.cuda.synchronize()
    errors, gate = [], threading.Barrier(2)

    def worker(order):
        stream = torch.cuda.Stream()
        gate.wait()
        with torch.cuda.stream(stream):
            got = [(T, checking.call(op, *cases[T], backend)) for T in order * 20]
        stream.synchronize()
        for T, outs in got:
            if not all(torch.equal(a, b) for a, b in zip(outs, serial[T])):
                errors.append(f"T={T}")

    threads = [threading.Thread(target=worker, args=(o,)) for o in ((1, 64, 513), (513, 1, 64))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, f"{backend}.{op}: results differ from serial calls at {errors[:5]}"


@pytest.mark.parametrize("op", OPS)
def test_back_to_back_calls_on_two_streams_without_sync(backend, op):
    """Calls alternating between two streams with no synchronisation between them (workspaces of
    one stream's launch must not be another's): every output equals a serial call."""
    _gpu_backend(backend, op, 4096, 1)
    streams = (torch.cuda.Stream(), torch.cuda.Stream())
    cases = [checking.device_inputs(op, T, N, 4096, DEVICE, seed=60 + T) for T in (1, 1, 64, 64)]
    serial = [checking.call(op, a, kw, backend) for a, kw in cases]
    torch.cuda.synchronize()
    for s in streams:
        s.wait_stream(torch.cuda.current_stream())
    got = []
    for rep in range(10):
        for i, (a, kw) in enumerate(cases):
            with torch.cuda.stream(streams[i % 2]):
                got.append((i, checking.call(op, a, kw, backend)))
    torch.cuda.synchronize()
    for i, outs in got:
        assert all(torch.equal(a, b) for a, b in zip(outs, serial[i])), f"{backend}.{op} case {i}"


# --- the fused RMSNorm (norm_weight) ------------------------------------------------------------


def _with_norm(kwargs, H, seed, dtype=torch.bfloat16):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    w = (torch.randn(H, generator=g, device=DEVICE, dtype=torch.float32) * 0.5 + 1.0).to(dtype)
    return dict(kwargs, norm_weight=w, norm_eps=1e-5)


@pytest.mark.parametrize("T", (1, 7, 64, 513, 4096))
@pytest.mark.parametrize("H", H_VALUES)
@pytest.mark.parametrize("op", ("pre", "fused_post_pre"))
def test_norm_weight_matches_fp64_oracle(backend, op, H, T):
    """Every backend that fuses the RMSNorm, against the fp64 oracle at real sizes (each kernel
    path: T = 1, the chunked T <= 128, the two-pass above); one that does not gives a reason
    (an explicit choice raises it)."""
    args, kwargs, rows, _ = _case(op, H, T)
    kwargs = _with_norm(kwargs, H, seed=H + T)
    why = registry.reasons_for(backend, registry.Problem(op, DEVICE, torch.bfloat16, N, H, T, norm=True))
    if why:
        with pytest.raises(mhc.BackendError):
            checking.call(op, args, kwargs, backend)
        pytest.skip(f"backend {backend} does not fuse the norm here: " + "; ".join(why))
    outs = checking.call(op, args, kwargs, backend)
    torch.cuda.synchronize()
    _assert_correct(op, args, kwargs, outs, rows, checking.reference_rows(op, args, kwargs, rows), backend)


@pytest.mark.parametrize("T", (1, 64, 513))
@pytest.mark.parametrize("op", ("pre", "fused_post_pre"))
def test_norm_weight_cuda_graph_replay_matches_eager(backend, op, T):
    why = registry.reasons_for(backend, registry.Problem(op, DEVICE, torch.bfloat16, N, 4096, T, norm=True))
    if why:
        pytest.skip("; ".join(why))
    _, kwargs = checking.device_inputs(op, T, N, 4096, DEVICE, seed=17)
    _replay_on_new_inputs(op, backend, T, _with_norm(kwargs, 4096, seed=18), seed=17)


# --- the transformers integration on CUDA ---------------------------------------------------------


def _ti():
    pytest.importorskip("transformers.models.deepseek_v4.modeling_deepseek_v4",
                        reason="transformers with DeepSeek-V4 not installed")
    import test_integration_transformers as ti

    return ti


def _hf_model(dtype, **cfg):
    ti = _ti()
    torch.manual_seed(0)
    cfg = ti._config(hidden_size=1024, **cfg)  # a width the Triton kernels tile like the real ones
    from transformers import DeepseekV4ForCausalLM

    with torch.device(DEVICE):
        model = DeepseekV4ForCausalLM(cfg).eval()
    ti._randomise_hc(model, 1)
    model = model.to(dtype)
    for mod in model.modules():
        if isinstance(mod, ti.HC_MODULES):
            mod.float()
    return ti, model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_transformers_logits_match_on_cuda(dtype):
    """The patched model's logits on CUDA match the unpatched model's (the CPU test's table),
    with auto selection (Triton/TileLang for bf16, torch for fp32)."""
    ti, model = _hf_model(dtype)
    ids = ti._ids(batch=2, seq=160).to(DEVICE)  # T = 320: the two-pass path; decode below: T = 2
    ref = ti._logits(model, ids)
    with ti.mt.apply(model):
        out = ti._logits(model, ids)
        step = ti._logits(model, ids[:, :1])
    assert ti._rel(out, ref) < ti.TOL[dtype]
    assert ti._rel(step, ti._logits(model, ids[:, :1])) < ti.TOL[dtype]


@pytest.mark.parametrize("experts", ["grouped_mm", "batched_mm"])
def test_transformers_cuda_graph_capture_with_apply(experts):
    """The bf16 model, unpatched and patched, captured the same way: a forward without a cache,
    and a decode step on a cache filled before the capture. Each replay on new token ids equals
    the same model's eager forward bit for bit, and the patched replay is within the CPU test's
    table of the unpatched model's eager logits.

    How it captures (tests/test_integration_transformers.py says what transformers 5.17 does
    that a capture refuses, and finds it on CPU): the attention mask is built outside the graph
    with transformers' own ``create_sliding_window_causal_mask`` and passed as ``attention_mask``
    (a 4D mask is used as given); the experts run as ``grouped_mm`` (transformers' default) or
    ``batched_mm`` (the "eager" experts loop over the experts hit, found with ``nonzero``).
    A decode step's graph is that one step at that context length: DeepSeek-V4's cache grows and
    transformers 5.17 has no static cache for it."""
    ti, model = _hf_model(torch.bfloat16, **_ti().CAPTURE_CONFIG)
    ti._capture_routing(model, 2)
    model.set_experts_implementation(experts)
    ids, new = (ti._ids(batch=2, seq=ti.CAPTURE_SEQ, seed=s).to(DEVICE) for s in (0, 5))
    mask = ti._graph_mask(model, ids)
    with torch.no_grad():
        prompt = model(ids, use_cache=True)
    cache, tok = prompt.past_key_values, prompt.logits[:, -1:].argmax(-1)
    new_tok = (tok + 1) % model.config.vocab_size
    step_mask = ti._graph_mask(model, tok, cache)
    replays, eagers = {}, {}
    for variant in ("unpatched", "mhc"):
        with (ti.mt.apply(model) if variant == "mhc" else contextlib.nullcontext()), torch.no_grad():
            static = ids.clone()
            graph, out = _capture(lambda: model(static, attention_mask=mask, use_cache=False).logits)
            static.copy_(new)
            graph.replay()
            torch.cuda.synchronize()
            eager = model(new, attention_mask=mask, use_cache=False).logits
            assert torch.equal(out, eager), f"{variant}, {experts}: forward replay differs from eager"

            copies = [copy.deepcopy(cache) for _ in range(3)]  # two warm-up steps, then the captured one
            keep = ti.mt.cache_tensors(copies[-1])
            static_tok = tok.clone()
            step_graph, step = _capture(lambda: model(static_tok, attention_mask=step_mask,
                                                      past_key_values=copies.pop(0), use_cache=True).logits)
            static_tok.copy_(new_tok)
            step_graph.replay()
            torch.cuda.synchronize()
            eager_step = model(new_tok, attention_mask=step_mask, past_key_values=copy.deepcopy(cache),
                               use_cache=True).logits
            assert torch.equal(step, eager_step), f"{variant}, {experts}: decode step replay differs from eager"
            replays[variant] = (out.float(), step.float())
            eagers[variant] = (eager.float(), eager_step.float())
            del graph, step_graph, keep
    for i, what in enumerate(("forward", "decode step")):
        err = ti._rel(replays["mhc"][i], eagers["unpatched"][i])
        assert err < ti.TOL[torch.bfloat16], f"{what}, {experts}: patched replay vs unpatched eager {err:.3e}"
