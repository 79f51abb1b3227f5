"""The direct call of compiled TileLang kernels (``mhc.backends.tilelang.direct``) against the
installed TileLang and tvm-ffi, with no GPU: a release that changes what the direct path relies on
(the points of ``direct``'s docstring) fails here, not in a user's call.

The kernels are the real ones, compiled for sm_90a with the local nvcc (or loaded from
``TILELANG_CACHE_DIR``, as ``python -m mhc aot --backend tilelang`` leaves them); their compiled
function is stood in for where a call must return (the real one refuses CPU tensors).

- Points 1 and 2: ``kernel(*args)`` ends in ``executable.main(*args)`` with the very same
  arguments, and :func:`direct.compiled_function` returns that ``main``; the real one is a
  ``tvm_ffi.Function`` that answers CPU tensors with the same error as ``kernel(*args)``.
- Point 3: torch exposes the DLPack exchange API through which tvm-ffi reads the current stream.
- Every launcher passes each kernel its parameters: a tensor of the declared dtype and rank per
  buffer, a Python number per scalar, the counters a flat int32 buffer of at least 2 per block.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from mhc import checking
from mhc.plans import PLANS

pytestmark = pytest.mark.skipif(importlib.util.find_spec("tilelang") is None, reason="tilelang not installed")

TARGET = {"kind": "cuda", "arch": "sm_90a"}
N, H = 4, 4096
OPS = {"post": "post", "pre": "pre", "head": "head", "fused_post_pre": "fused"}


def _nvcc():
    from mhc.backends.tilelang import find_compiler

    if find_compiler() is None:
        pytest.skip("no nvcc: TileLang cannot compile the kernels here")


def _kernel(op: str):
    from mhc.backends.tilelang import launch

    return launch.get_kernel(op, N, H, "bfloat16", TARGET, 132)[0]


class _Recorder:
    """A stand-in for the compiled module: ``main`` records its arguments; calling the module
    calls ``main``, as ``tvm_ffi.Module.__call__`` does."""

    def __init__(self):
        self.calls = []
        self.main = lambda *args: self.calls.append(args)

    def __call__(self, *args):
        return self.main(*args)


def _cpu_args(kernel):
    """One CPU argument per parameter of ``kernel``'s PrimFunc (T = 3, the counters sized)."""
    import tilelang.language as T  # noqa: F401  (tilelang imported: tvm types available)

    f = kernel.adapter.prim_func
    dims = {"num_tokens": 3, "num_blocks": 1, "num_counters": 8}
    out = []
    for p in f.params:
        if p in f.buffer_map:
            b = f.buffer_map[p]
            shape = [int(s) if not hasattr(s, "name") else dims[s.name] for s in b.shape]
            out.append(torch.zeros(shape, dtype=getattr(torch, str(b.dtype))))
        else:
            out.append(1e-6 if str(p.dtype).startswith("float") else 2)
    return out


@pytest.mark.parametrize("op", ["post", "pre"])
def test_the_kernel_call_ends_in_main_with_the_same_arguments(op, monkeypatch):
    """Points 1 and 2 against the installed TileLang and tvm-ffi."""
    _nvcc()
    import tvm_ffi
    from tilelang import tvm
    from tilelang.jit.adapter.tvm_ffi import TVMFFIKernelAdapter
    from tilelang.jit.kernel import JITKernel

    from mhc.backends.tilelang import direct

    k = _kernel(OPS[op])
    assert isinstance(k, JITKernel) and direct.is_tilelang_kernel(k)
    ad = k.adapter
    assert isinstance(ad, TVMFFIKernelAdapter) and k.torch_function == ad.func
    assert not ad.result_idx and not ad._ffi_callee_allocated_output_abi
    assert ad._prepare_torch_device(torch.device("cuda", 0)) is None  # a no-op off npu

    # JITKernel.__call__ -> torch_function, arguments unchanged
    seen = []
    monkeypatch.setattr(k, "torch_function", lambda *a: seen.append(a))
    k(1, 2.0, "x")
    assert seen == [(1, 2.0, "x")]
    monkeypatch.setattr(k, "torch_function", ad.func)

    # adapter.func -> executable(*args) -> executable.main(*args): the same objects, in order
    real = ad._get_executable()
    rec = _Recorder()
    monkeypatch.setattr(ad, "executable", rec)
    args = _cpu_args(k)
    k(*args)
    assert len(rec.calls) == 1 and len(rec.calls[0]) == len(args)
    assert all(a is b for a, b in zip(rec.calls[0], args))
    assert direct.compiled_function(k) is rec.main

    # what the real executable's call is: tvm_ffi.Module calls self.main, Executable self.jit().main
    class Mod:
        main = rec.main

    class Exe:
        def jit(self):
            return Mod

    rec.calls.clear()
    tvm_ffi.Module.__call__(Mod, *args)
    tvm.runtime.Executable.__call__(Exe(), *args)
    assert len(rec.calls) == 2 and all(all(a is b for a, b in zip(c, args)) for c in rec.calls)
    assert isinstance(real, (tvm_ffi.Module, tvm.runtime.Executable)), type(real)

    # the real compiled function: a tvm_ffi.Function, which refuses CPU tensors as kernel() does
    monkeypatch.setattr(ad, "executable", real)
    fn = direct.compiled_function(k)
    assert isinstance(fn, tvm_ffi.Function)
    errors = []
    for call in (k, fn):
        with pytest.raises(Exception) as e:
            call(*args)
        errors.append((type(e.value), str(e.value).splitlines()[0]))
    assert errors[0] == errors[1], errors
    assert "device" in errors[0][1].lower() or "cuda" in errors[0][1].lower(), errors


def test_torch_exposes_the_dlpack_exchange_api_that_tvm_ffi_reads_the_stream_through():
    """Point 3: tvm-ffi converts a torch tensor through ``__dlpack_c_exchange_api__`` and asks it
    for the current stream of the tensor's device (without it, tvm-ffi's fallback reads
    ``torch._C._cuda_getCurrentRawStream``: the same stream, more slowly)."""
    import tvm_ffi  # noqa: F401

    assert hasattr(torch.Tensor, "__dlpack_c_exchange_api__")


def test_plans_call_the_compiled_function_and_fall_back_when_off(monkeypatch):
    """A plan calls ``direct.compiled_function(kernel)``; with ``direct.ENABLED`` False, the
    kernel itself (TileLang's path)."""
    _nvcc()
    from mhc.backends.tilelang import direct, launch

    k = _kernel("post")
    assert launch._plan(k, None, "post", N, H).call == direct.compiled_function(k)
    monkeypatch.setattr(direct, "ENABLED", False)
    assert launch._plan(k, None, "post", N, H).call is k


@pytest.mark.parametrize("T", [1, 64, 200])
@pytest.mark.parametrize("op", list(OPS))
def test_launchers_pass_each_kernel_its_parameters(op, T, monkeypatch):
    """Each launcher hands the compiled function one argument per PrimFunc parameter: a tensor of
    the buffer's dtype, rank and static dims, the dynamic dims consistent (tokens T, blocks
    ceil(T / BM), counters at least twice the blocks, zero), and a Python number per scalar."""
    _nvcc()
    from mhc.backends.tilelang import launch

    kern = _kernel(OPS[op])
    rec = _Recorder()
    monkeypatch.setattr(kern.adapter, "executable", rec)
    monkeypatch.setattr(launch, "target_for", lambda dev: TARGET)
    monkeypatch.setitem(launch.KERNELS.num_sms, torch.device("cpu"), 132)
    PLANS.clear("tilelang")
    try:
        args, kw = checking.make_inputs(op, (T,), N, H, torch.bfloat16, torch.device("cpu"))
        getattr(launch, op)(*args, *kw.values())
        p = launch.plan_for(OPS[op], N, H, torch.bfloat16, torch.device("cpu"))
        assert p.call is rec.main
    finally:
        PLANS.clear("tilelang")
    (got,) = rec.calls
    f = kern.adapter.prim_func
    assert len(got) == len(f.params)
    dims: dict = {}
    for prm, v in zip(f.params, got):
        if prm in f.buffer_map:
            b = f.buffer_map[prm]
            assert isinstance(v, torch.Tensor) and v.dtype == getattr(torch, str(b.dtype)), (prm.name, v)
            assert v.dim() == len(b.shape) and v.is_contiguous(), (prm.name, v.shape, b.shape)
            for s, d in zip(b.shape, v.shape):
                if hasattr(s, "name"):
                    assert dims.setdefault(s.name, d) == d, (prm.name, s.name)
                else:
                    assert int(s) == d, (prm.name, v.shape, b.shape)
        else:
            want = float if str(prm.dtype).startswith("float") else int
            assert type(v) is want, (prm.name, type(v))
    assert dims["num_tokens"] == T
    if op != "post":
        nb = -(-T // 64)
        assert dims["num_blocks"] == nb and dims["num_counters"] >= 2 * nb
        names = [f.buffer_map[q].name if q in f.buffer_map else q.name for q in f.params]
        flags = got[names.index("flags")]
        assert int(flags.count_nonzero()) == 0
