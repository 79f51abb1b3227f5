"""Launching a compiled Triton kernel without ``JITFunction.run`` on every call.

``kernel[grid](*args, **constexprs)`` (``JITFunction.run``) binds and specialises every argument,
hashes the result into its cache key, checks globals and parses the options on every launch.
:class:`DirectKernel` does that once per *specialisation key* (below): the first launch with a
new key goes through ``JITFunction.run``, which compiles (or loads) the kernel, launches it and
returns the ``CompiledKernel``; later launches with the same key call that handle directly.

What this relies on, identical in Triton 3.6 and 3.9 (the supported range; tests/test_triton_direct.py
checks each point against the installed Triton, and CI runs it on both):

1. ``JITFunction.run`` (``kernel[grid](...)``) returns the ``CompiledKernel`` it launched.
2. ``CompiledKernel[grid](*args)`` launches by calling the kernel's launcher (``CompiledKernel.run``,
   the driver's ``launcher_cls`` instance) as ``run(gx, gy, gz, stream, function, packed_metadata,
   launch_metadata, enter_hook, exit_hook, *args)``, ``args`` being *every* parameter of the kernel
   in declaration order, constexprs included (the launcher skips their slots; their values are
   baked into the binary). The direct path makes that same call itself, with the current stream
   of the device the kernel was loaded on (current at its first launch, and at every later one:
   the launchers run under ``device_guard``), no launch metadata and no hooks
   when Triton's launch hooks (``knobs.runtime.launch_enter_hook``/``launch_exit_hook``) are
   empty; when a hook is installed (a profiler), it launches through ``CompiledKernel[grid]``,
   which builds the metadata and calls the hooks.
3. The C launcher takes a pointer argument as a Python int (the address) as well as a tensor.
   Given a tensor it calls ``data_ptr()`` and asks the driver (``cuPointerGetAttribute``) whether
   the address is device memory, per pointer and per launch; the direct path passes the
   addresses it has already read for the key (below), so neither happens again. The op layer has
   checked that every tensor is on the launch's device.
4. Triton specialises a launch on, per non-constexpr argument: a tensor's dtype and whether its
   ``data_ptr()`` is a multiple of 16; an int's width class (i32 / i64 / u64), whether it equals 1
   (then it becomes a constexpr) and whether it is a multiple of 16; a float, bool or None by
   its type. :func:`_key_and_addresses` captures at least all of that, so two launches with one
   key can share one binary (the test compares it with Triton's own ``native_specialize_impl``).

The launchers call :meth:`DirectKernel.launch` with a key of their own, which costs a fraction
of :func:`_key_and_addresses` (it reads no dtype of a tensor the launcher allocated and specs no
int that a plan fixes): the first launch of such a key goes through the generic path, which
records the handle it used under that key too. Its rule and its check (``CHECK_KEYS``, on in
the GPU tests) are in the method's docstring.

The handle is per device (a ``CompiledKernel`` holds a function loaded into one device's
context): a :class:`DirectKernel` serves one device, and the launcher keeps one per plan, whose
key names the device. Under ``TRITON_INTERPRET=1`` (the CPU tests) there is no compiled kernel:
every launch goes through ``kernel[grid](...)``, as it does where ``ENABLED`` is False.
What the direct path skips per call: Triton's check that the kernel's globals did not change
(ours are module constants) and a change of ``TRITON_DEBUG`` or instrumentation knobs after the
first launch (they are part of ``JITFunction.run``'s key, not of ours).
"""

from __future__ import annotations

import os
import threading
from typing import NamedTuple

import torch
from triton import knobs
from triton.knobs import HookChain
from triton.runtime import driver

from mhc import state

_RUNTIME = knobs.runtime

__all__ = ["DirectKernel", "ENABLED", "CHECK_KEYS", "KNOWN_RELEASES", "int_spec"]

#: The Triton releases (major.minor) the points of the module docstring were checked against:
#: the range that pyproject.toml declares, whose ends CI runs. tests/test_private_apis.py fails
#: on any other, so that a new release is checked before it is listed.
KNOWN_RELEASES = ("3.6", "3.7", "3.8", "3.9")

#: False turns the direct path off (every launch through ``JITFunction.run``): the GPU tests
#: compare the two paths bitwise. The interpreter never takes it (see ``DirectKernel``).
ENABLED = True

#: True: every :meth:`DirectKernel.launch` also checks its caller's key against the generic one.
CHECK_KEYS = os.environ.get("MHC_CHECK_LAUNCH_KEYS", "") == "1"
_CHECK_KEYS_DEFAULT = CHECK_KEYS

_I32 = (-(2**31), 2**31)


def int_spec(v: int):
    """What Triton specialises an int on (point 4 of the module docstring), or something finer:
    the part of a :meth:`DirectKernel.launch` key that an int argument contributes."""
    if _I32[0] <= v < _I32[1]:
        return 1 if v == 1 else 2 if v & 15 == 0 else 3
    return (v == 1, v & 15 == 0, v >= 0)


class DirectKernel:
    """``fn`` (a ``@triton.jit`` kernel) with fixed ``constexprs`` and launch ``options``
    (num_warps, num_stages, compile options), launched as ``k(grid, *args)`` where ``args`` are
    the kernel's runtime (non-constexpr) parameters in declaration order. One instance serves
    one device (see the module docstring).

    ``runtime_names`` lists those parameters; ``handles`` maps a launch key
    (:func:`_key_and_addresses`) to the
    ``_Handle`` (the ``CompiledKernel`` and what its direct launch calls) that serves it."""

    def __init__(self, fn, constexprs: dict, options: dict, interpreted: bool) -> None:
        self.fn = fn
        self.constexprs = dict(constexprs)
        self.options = dict(options)
        self.kwargs = {**self.constexprs, **self.options}
        self.interpreted = interpreted
        self.handles: dict[tuple, object] = {}
        self.keyed: dict[tuple, tuple] = {}  # the callers' keys (:meth:`launch`) -> (handle, tensor positions)
        self._lock = threading.Lock()
        if interpreted:  # an InterpretedFunction: launched through fn[grid] only
            self.runtime_names, self.tail = [a for a in fn.arg_names if a not in constexprs], ()
            return
        names = list(fn.arg_names)
        unknown = set(constexprs) - set(names)
        if unknown:
            raise TypeError(f"{fn.__name__} has no parameter(s) {sorted(unknown)}")
        declared = [p for p in fn.params if p.is_constexpr]
        self.runtime_names = [p.name for p in fn.params if not p.is_constexpr]
        missing = [p.name for p in declared if p.name not in constexprs and not p.has_default]
        if missing:
            raise TypeError(f"{fn.__name__}: no value for constexpr(s) {missing}")
        # The tail of every direct launch: the constexpr slots (their values are ignored by the
        # launcher, point 2), which follow the runtime parameters in all of our kernels.
        n_rt = len(self.runtime_names)
        if names[:n_rt] != self.runtime_names:
            raise TypeError(f"{fn.__name__}: the direct launch needs its constexpr parameters after the runtime ones")
        self.tail = tuple(self.constexprs.get(p.name, p.default) for p in declared)

    def launch(self, grid: tuple, key: tuple, *args) -> None:
        """``self(grid, *args)`` looked up by the caller's ``key`` instead of
        :func:`_key_and_addresses`: the launchers' hot path (about a quarter of the host time of
        the generic key for a 23-argument kernel).

        ``key`` must tell apart every pair of calls at one launch site that Triton could
        specialise differently *other than by pointer alignment*: the dtypes of the tensors the
        caller was given, the :func:`int_spec` of every int that varies between calls, whether an
        optional pointer is None. What the launcher allocates itself, and ints that are constant
        for a plan, are fixed by the plan, which owns the kernel. Alignment is checked here: a
        call with any address not a multiple of 16 takes the generic path. With
        :data:`CHECK_KEYS` (``MHC_CHECK_LAUNCH_KEYS=1``; the GPU tests and the stand-in driver
        test set it) every keyed launch also computes the generic key and raises if the two pick
        different binaries."""
        entry = self.keyed.get(key)
        if entry is None or CHECK_KEYS or not ENABLED:
            self._launch_and_key(grid, key, args)
            return
        h, tensors = entry
        addrs = list(args)
        bits = 0
        for i in tensors:
            p = args[i].data_ptr()
            addrs[i] = p
            bits |= p
        enter, leave = _RUNTIME.launch_enter_hook, _RUNTIME.launch_exit_hook
        # misaligned (another binary), or a profiler listens (as _hooked, inline: the usual call
        # has two empty HookChains)
        if (bits & 15 or (enter is not None and (enter.__class__ is not HookChain or enter.calls))
                or (leave is not None and (leave.__class__ is not HookChain or leave.calls))):
            self(grid, *args)
            return
        h.run(grid[0], grid[1], grid[2], h.stream(h.device), h.function, h.packed_metadata, None, None, None,
              *addrs, *self.tail)

    def _launch_and_key(self, grid: tuple, key: tuple, args: tuple) -> None:
        """The first keyed launch of ``key`` (and every one under :data:`CHECK_KEYS`): through the
        generic path, then ``key`` maps to the handle it used (for aligned calls only)."""
        self(grid, *args)
        if self.interpreted or not ENABLED:
            return
        generic, addrs = _key_and_addresses(args)
        h = self.handles.get(generic)
        if h is None:
            return
        tensors = tuple(i for i, a in enumerate(args) if isinstance(a, torch.Tensor))
        if any(addrs[i] & 15 for i in tensors):  # the keyed path never serves a misaligned call
            return
        entry = self.keyed.get(key)
        if entry is not None and CHECK_KEYS and (entry[0] is not h or entry[1] != tensors):
            raise AssertionError(f"{self.fn.__name__}: launch key {key!r} served a binary that Triton "
                                 f"specialises differently for these arguments (generic key {generic!r})")
        if entry is None:
            with self._lock:
                self.keyed[key] = (h, tensors)

    def __call__(self, grid: tuple, *args) -> None:
        if self.interpreted or not ENABLED:
            self.fn[grid](*args, **self.kwargs)
            return
        key, addrs = _key_and_addresses(args)
        h = self.handles.get(key)
        if h is None:
            k = self.fn[grid](*args, **self.kwargs)  # compiles (or loads), launches, returns the handle
            if hasattr(k, "function") and hasattr(k, "packed_metadata"):  # a CompiledKernel
                drv = driver.active
                with self._lock:
                    self.handles[key] = _Handle(k, k.run, k.function, k.packed_metadata,
                                                drv.get_current_device(), drv.get_current_stream)
            return
        if len(grid) != 3:
            grid = (*grid, 1, 1)[:3]
        enter, leave = _RUNTIME.launch_enter_hook, _RUNTIME.launch_exit_hook
        if _hooked(enter) or _hooked(leave):  # a profiler listens: Triton's own launch calls it
            h.kernel[grid](*args, *self.tail)
            return
        h.run(grid[0], grid[1], grid[2], h.stream(h.device), h.function, h.packed_metadata, None, None, None,
              *addrs, *self.tail)


class _Handle(NamedTuple):
    """A compiled kernel and what its direct launch calls (point 2 of the module docstring)."""

    kernel: object  # the CompiledKernel
    run: object  # its launcher
    function: int
    packed_metadata: tuple
    # The device the kernel was loaded on (current at its first launch): its later launches run
    # there too (the launchers launch under device_guard of their plan's device), on that
    # device's current stream; torch.cuda.current_device() per launch would cost more.
    device: int
    stream: object  # the driver's get_current_stream


def _hooked(hook) -> bool:
    """Whether a Triton launch hook would do anything (an empty ``HookChain`` does not)."""
    return hook is not None and (hook.__class__ is not HookChain or bool(hook.calls))


#: Per tuple of argument types: the positions of the tensors, the ints and the other values
#: (None, bool) among a launch's arguments.
_LAYOUTS: dict[tuple, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]] = {}


def _reset() -> None:
    """Forget the argument layouts and restore the switches to their values at import."""
    global ENABLED, CHECK_KEYS
    _LAYOUTS.clear()
    ENABLED, CHECK_KEYS = True, _CHECK_KEYS_DEFAULT


state.register("triton.direct", _LAYOUTS, "argument types (direct._LAYOUTS); the switches ENABLED, CHECK_KEYS",
               _reset)


def _layout(kinds: tuple) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    tensors = tuple(i for i, c in enumerate(kinds) if issubclass(c, torch.Tensor))
    ints = tuple(i for i, c in enumerate(kinds) if c is int)
    others = tuple(i for i, c in enumerate(kinds) if c is not float and i not in tensors and i not in ints)
    _LAYOUTS[kinds] = (tensors, ints, others)
    return tensors, ints, others


def _key_and_addresses(args) -> tuple[tuple, list]:
    """The specialisation key of one launch's runtime arguments ``args`` (equal keys mean one
    compiled binary serves both launches: it captures at least what point 4 of the module
    docstring lists; tests/test_triton_direct.py checks it against Triton's own specialiser),
    and ``args`` with every tensor replaced by its address (point 3). Built per launch, so it
    takes the common case short: the argument types (one C-level pass) name where the tensors,
    ints and other values (None, bool: keyed by value) are; one OR of the addresses says whether
    all are 16-byte aligned (the per-pointer pattern is keyed only when one is not); floats are
    keyed by their type alone."""
    kinds = tuple(map(type, args))
    tensors, ints, others = _LAYOUTS.get(kinds) or _layout(kinds)
    addrs = list(args)
    dtypes = []
    any_bits = 0
    for i in tensors:
        t = args[i]
        p = t.data_ptr()
        addrs[i] = p
        any_bits |= p
        dtypes.append(t.dtype)
    aligned = None if not any_bits & 15 else tuple([addrs[i] & 15 == 0 for i in tensors])
    return (kinds, tuple(dtypes), aligned, tuple([int_spec(args[i]) for i in ints]),
            tuple([args[i] for i in others])), addrs
