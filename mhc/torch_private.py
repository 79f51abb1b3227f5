"""torch's private names that mhc uses, in one place: the one module to check on a torch upgrade.

Each is a C function or class under ``torch._C`` that the public API wraps with Python of its own
(argument parsing, a lazy CUDA init, a context manager), which the hot path of every op call
cannot afford at decode sizes; or one that has no public form (the dispatch key sets). The names
are bound here once; their users bind them again to module globals, so a call pays no more than
before. ``tests/test_private_apis.py`` checks that each resolves and that the installed torch is
one of :data:`KNOWN_RELEASES` (it fails loudly on any other, so that a new release is checked
against these names before it is listed).

What a public API would cost instead, and where one may replace a name, is noted per name.
"""

from __future__ import annotations

import torch

__all__ = ["KNOWN_RELEASES", "release", "any_requires_grad", "unwrap_if_dead", "tracing_state", "functorch_transforms_active",
           "forward_ad_level",
           "dispatch_mode_depth", "function_mode_enabled", "any_autocast_enabled", "profiler_enabled",
           "functorch_interpreter", "DispatchKey", "DispatchKeySet", "ExcludeDispatchKeyGuard",
           "AutoDispatchBelowAutograd", "after_autograd_keyset", "cuda_current_device",
           "cuda_stream_capturing", "cuda_current_raw_stream", "function_apply"]

#: The torch releases (major.minor) these names were checked against: the CI's and the GPU
#: machines'.
KNOWN_RELEASES = ("2.11", "2.13")


def release() -> str:
    """The installed torch's major.minor."""
    return ".".join(torch.__version__.split("+")[0].split(".")[:2])


_C = torch._C

# The op layer (mhc/__init__.py, ops.py, autograd.py): what decides whether a call may skip the
# dispatcher. Public equivalents (torch.jit.is_tracing, torch.overrides, torch.is_autocast_enabled
# per device, torch.autograd.profiler) each cost a Python frame or more per call.
any_requires_grad = _C._any_requires_grad
unwrap_if_dead = _C._functorch.unwrap_if_dead
tracing_state = _C._get_tracing_state
dispatch_mode_depth = _C._len_torch_dispatch_stack
function_mode_enabled = _C._is_torch_function_mode_enabled
any_autocast_enabled = _C._is_any_autocast_enabled
profiler_enabled = _C._autograd._profiler_enabled
functorch_interpreter = _C._functorch.peek_interpreter_stack
functorch_transforms_active = _C._are_functorch_transforms_active


def function_apply(cls: type[torch.autograd.Function]):
    """The C ``apply`` of an ``autograd.Function`` subclass (``torch._C._FunctionBase.apply``,
    bound to ``cls``): ``Function.apply`` less its Python layer (functorch transforms and the
    unwrapping of functorch's dead wrappers), which ``mhc._way_in`` calls only where neither
    applies. A candidate for measurement against ``torch.library.custom_op``'s own autograd."""
    return super(torch.autograd.Function, cls).apply

# Dispatch keys: no public form. ops.register_no_autocast runs an op with autocast's keys
# excluded; autograd.py calls the backend below autograd as torch.library's autograd does.
DispatchKey = _C.DispatchKey
DispatchKeySet = _C.DispatchKeySet
ExcludeDispatchKeyGuard = _C._ExcludeDispatchKeyGuard
AutoDispatchBelowAutograd = _C._AutoDispatchBelowAutograd
after_autograd_keyset = _C._after_autograd_keyset

# CUDA (mhc/backends/__init__.py, workspaces.py): torch.cuda.current_device() and
# torch.cuda.current_stream().cuda_stream do the same with a lazy-init check and a Stream object
# per call; torch.cuda.is_current_stream_capturing() is public but one frame slower.
cuda_current_device = getattr(_C, "_cuda_getDevice", None)  # absent from CPU-only builds of some releases
cuda_stream_capturing = getattr(_C, "_cuda_isCurrentStreamCapturing", None)
cuda_current_raw_stream = getattr(_C, "_cuda_getCurrentRawStream", None)


def forward_ad_level() -> int:
    """The innermost open forward-mode AD level (-1: none), from ``torch.autograd.forward_ad``'s
    private counter: PyTorch exposes no other test for an open dual level."""
    return torch.autograd.forward_ad._current_level
