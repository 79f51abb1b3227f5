"""Every cache and switch of mhc that outlives a call, in one list, with one reset for tests.

A module that owns such state registers it here when it is imported (:func:`register`): the
object, what keys it, and how to empty it. :func:`entries` lists what this process has loaded and
:func:`reset` empties every cache and restores every switch, so that a test starts as a fresh
process would (but for modules already imported). The state of the package:

==============================  ===================================================  ==============================
name                            holds                                                keyed by
==============================  ===================================================  ==============================
``registry.decisions``          the backend callable (or BackendError) per call      op, choice, device, dtype, n,
                                kind                                                 H, T bucket, create_graph, norm
``registry.env``                ``MHC_BACKEND`` as last read, parsed                 the raw value
``plans``                       launch plans (``mhc.plans.PLANS``)                   backend, op, n, H, T bucket,
                                                                                     dtype, device, ...
``workspaces``                  pooled scratch buffers and zeroed arrival counters   device, stream, layout,
                                (``mhc.backends.workspaces.WORKSPACES``)             counter count
``backends.allocator``          the output allocator (tests fill outputs with NaN)   (a switch)
``aiter.head_pad``              head weights padded for AITER < 0.1.14               the three tensors' ids
``triton.device_shared``        shared memory per GPU (``launch._DEVICE_SHARED``)    device index
``triton.fitted``               configs fitted to shared memory (``launch._FITTED``)  device, op, n, dtype, H % 16,
                                                                                     estimated config
``triton.direct``               argument layouts (``direct._LAYOUTS``); the          argument types; (switches)
                                switches ``ENABLED``, ``CHECK_KEYS``
``tilelang.kernels``            compiled kernels, SM counts, targets                 op, n, H, dtype, config,
                                (``launch.KERNELS``)                                 target; device
``tilelang.layouts``            workspace layouts (``launch._LAYOUTS``)              slices, row width, token
                                                                                     blocks
``tilelang.direct``             the switch ``direct.ENABLED``                        (a switch)
==============================  ===================================================  ==============================

Not listed, as a reset would not give a fresh process: the backend records and the loaded
backend modules (``registry._STATE.records``/``loaded``: imports happen once) and compiled
kernels kept by Triton and TileLang themselves (and the cache directory that the TileLang backend
hands to TileLang's own setting, ``tilelang.env``, when the user set none). Each launch plan's
kernel handles (``DirectKernel.handles``) live in the plan: ``plans`` empties them. The Triton
backend's configuration table (``mhc.backends.triton.configs``) is constant.
``mhc.use_backend``'s selection is a context variable: it ends with its ``with`` block.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable

__all__ = ["Entry", "register", "entries", "reset"]


@dataclasses.dataclass(frozen=True)
class Entry:
    """One piece of state: ``obj`` (the cache, or the module holding a switch), what keys it
    (``keyed_by``, words), and ``reset`` (empties it or restores the switch's default)."""

    name: str
    obj: object
    keyed_by: str
    reset: Callable[[], None]


_LOCK = threading.Lock()
_ENTRIES: dict[str, Entry] = {}


def register(name: str, obj: object, keyed_by: str, reset: Callable[[], None] | None = None) -> object:
    """List ``obj`` under ``name`` (re-registering a name replaces it: a module reloaded in a
    test). ``reset`` defaults to ``obj.clear``. Returns ``obj``, so that a module can write
    ``CACHE = state.register("x", {}, "key")``."""
    if reset is None:
        reset = obj.clear  # type: ignore[attr-defined]
    with _LOCK:
        _ENTRIES[name] = Entry(name, obj, keyed_by, reset)
    return obj


def entries() -> list[Entry]:
    """The registered state, in registration order."""
    return list(_ENTRIES.values())


def reset() -> None:
    """Empty every registered cache and restore every registered switch."""
    for entry in entries():
        entry.reset()
