"""Calling a compiled TileLang kernel's function directly, without TileLang's per-call Python.

``kernel(*args)`` on a ``tilelang.JITKernel`` compiled with ``execution_backend="tvm_ffi"`` runs,
per call, ``JITKernel.__call__`` -> ``TVMFFIKernelAdapter.func`` (argument count check, a loop
over the parameters that places the inputs and allocates the outputs named by ``out_idx``, the
first tensor's device, ``_prepare_torch_device``, ``_get_executable``) -> the executable's
``__call__`` -> its ``main``, a ``tvm_ffi.Function`` (compiled C: the work is done there).
Our kernels have no ``out_idx`` (the launchers allocate every output), so everything before
``main`` is bookkeeping that does nothing for them: :func:`compiled_function` returns ``main``
once per plan and the launchers call it.

What this relies on, in TileLang 0.1.15 with tvm-ffi 0.1.12 (``tests/test_tilelang_direct.py``
checks each point against the installed versions, with no GPU):

1. ``kernel.torch_function`` is ``kernel.adapter.func``, what ``JITKernel.__call__`` calls, and
   the adapter is a ``TVMFFIKernelAdapter`` with no outputs of its own (``result_idx`` empty,
   not the callee-allocated-output ABI).
2. With no outputs, ``adapter.func(*args)`` hands ``args`` unchanged, in order, to
   ``adapter._get_executable()``, whose call is its ``main``: a ``tvm_ffi.Module`` (a kernel
   loaded from the disk cache) calls ``self.main(*args)``, a ``tvm.runtime.Executable`` (a
   kernel compiled in this process) ``self.jit().main(*args)``. Its other per-call step,
   ``_prepare_torch_device``, does something for ``npu`` devices only.
3. The stream: ``main`` (tvm-ffi's C calling convention) converts each torch tensor through
   torch's DLPack exchange API and, on the first CUDA tensor, asks torch for that device's
   *current* stream (``current_work_stream``), which the compiled host code launches on (the
   capture stream under ``torch.cuda.graph``). That happens inside ``main``, so the direct call
   launches where the adapter's did. The compiled host code also sets the device of the first
   tensor and checks every argument's count, dtype, shape, strides and device, raising
   ``RuntimeError``/``ValueError`` as before: those checks stay.

What the direct path skips per call: the adapter's Python. If a TileLang
release changes any point above, the test fails; where :func:`compiled_function` notices (points
1 and 2 are checked on every kernel: it raises ``TypeError``), the launcher's plan falls back to
``kernel(*args)``, TileLang's own path: slower, never wrong.
"""

from __future__ import annotations

import sys

from mhc import state

__all__ = ["ENABLED", "TESTED", "compiled_function", "is_tilelang_kernel"]

#: The versions the points of the module docstring were read from.
TESTED = {"tilelang": "0.1.15", "tvm_ffi": "0.1.12"}

#: False: plans built from then on call the kernel through TileLang (``kernel(*args)``); the GPU
#: test compares the two paths bitwise (clear the plans after changing it).
ENABLED = True


def _reset() -> None:
    global ENABLED
    ENABLED = True


state.register("tilelang.direct", sys.modules[__name__], "(a switch: direct.ENABLED)", _reset)


def is_tilelang_kernel(kernel) -> bool:
    """Whether ``kernel`` is a ``tilelang.JITKernel`` (the CPU tests stand plain callables in)."""
    from tilelang.jit.kernel import JITKernel

    return isinstance(kernel, JITKernel)


def compiled_function(kernel):
    """The ``tvm_ffi.Function`` that ``kernel(*args)`` ends in (the module docstring's points 1
    and 2), to be called with the same arguments. Raises ``TypeError`` on a kernel that does not
    match those points (another execution backend, outputs allocated by TileLang)."""
    from tilelang import tvm
    from tilelang.jit.adapter.tvm_ffi import TVMFFIKernelAdapter

    adapter = getattr(kernel, "adapter", None)
    if not isinstance(adapter, TVMFFIKernelAdapter):
        raise TypeError(f"not a tvm_ffi-backed TileLang kernel: adapter {type(adapter).__name__}")
    if kernel.torch_function != adapter.func:
        raise TypeError("JITKernel.torch_function is not its adapter's func")
    if adapter.result_idx or getattr(adapter, "_ffi_callee_allocated_output_abi", False):
        raise TypeError("the kernel allocates outputs of its own (out_idx): call it through TileLang")
    executable = adapter._get_executable()
    module = executable.jit() if isinstance(executable, tvm.runtime.Executable) else executable
    return module.main
