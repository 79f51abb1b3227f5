"""Launch plans: what a backend launches for one kind of call, decided once and kept in one place.

A *plan* is everything a backend's launcher derives from the shape of a call and not from the
values of its tensors: the launch config, the kernel handles, the grid's constants, the sizes of
its workspaces. Backends build one on the first call of a kind and look it up on every later one
(:data:`PLANS`, a dict lookup), so the host cost of a call does not grow with the heuristics
behind it.

Keys are explicit tuples that start with the backend's name and hold everything the plan
depends on: ``(backend, op, n, H, T bucket, dtype, device, ...)``, with the T bucket of
:func:`t_bucket`, the one bucketing of token counts in the package: every heuristic that depends
on T (a backend's configuration table, ``auto``'s ranking in :mod:`mhc.registry`) changes only at
the bounds of :data:`T_BOUNDS`, so a plan or a cached decision never spans two of its choices.
The one heuristic that follows T inside a bucket, the step counts of the Triton backward's looping
kernels (powers of two that keep every SM busy: ``configs.backward_steps``), is in its plans' keys.
A plan must never depend on what is *in* a tensor (``fn`` is read by the kernels on every call,
so an in-place update is always seen), on a data pointer, or on the stream: a plan sizes
workspaces but never holds one.
Workspaces come from PyTorch's caching allocator per call (stream-ordered, so safe across
streams and under CUDA graphs), or from :mod:`mhc.backends.workspaces`, a pool with its own
rule: per (device, stream), and a captured graph's own; it also spares the arrival counters of
Triton's single-launch kernel (which must come zeroed) a memset per call.

Thread safety: lookups are plain dict reads (atomic under the GIL); a miss builds under one
re-entrant lock, so two threads that miss at once build once. A plan is immutable once stored.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable, Hashable
from typing import Any

from mhc import state

__all__ = ["PlanCache", "PLANS", "T_BOUNDS", "t_bucket"]

#: The largest T of each token bucket but the last (which is unbounded): the union of the bounds
#: at which some heuristic changes. 1: the single-token kernels; 64 and 2047: ``auto``'s ranking
#: (``registry.auto_order``); 128: Triton's small-T kernels (``configs.SMALL_T``); 1024: Triton's
#: two-pass K split. A heuristic that needs a new bound adds it here (the tests check that every
#: table's bounds are listed).
T_BOUNDS = (1, 64, 128, 1024, 2047)


def t_bucket(T: int) -> int:
    """The bucket of T tokens: 0 for T <= ``T_BOUNDS[0]``, i for ``T_BOUNDS[i-1] < T <=
    T_BOUNDS[i]``, ``len(T_BOUNDS)`` above the last bound."""
    return bisect.bisect_left(T_BOUNDS, T)


class PlanCache:
    """Plans keyed by explicit tuples (see the module docstring); ``builds`` counts the misses."""

    def __init__(self) -> None:
        self._lock = threading.RLock()  # re-entrant: a build may look up another plan
        self._plans: dict[Hashable, Any] = {}
        self.builds = 0

    def find(self, key: Hashable) -> Any:
        """The plan stored under ``key``, or None (the warm call's lookup: no builder to make)."""
        return self._plans.get(key)

    def get(self, key: Hashable, build: Callable[[], Any]) -> Any:
        """The plan stored under ``key``, built by ``build()`` on the first call."""
        plan = self._plans.get(key)
        if plan is None:
            with self._lock:
                plan = self._plans.get(key)
                if plan is None:
                    plan = build()
                    self._plans[key] = plan
                    self.builds += 1
        return plan

    def keys(self, backend: str | None = None) -> list:
        """The stored keys (of one backend's plans if ``backend`` is given)."""
        return [k for k in list(self._plans) if backend is None or k[0] == backend]

    def items(self, backend: str | None = None) -> list[tuple]:
        """``(key, plan)`` pairs (of one backend's plans if ``backend`` is given)."""
        return [(k, p) for k, p in list(self._plans.items()) if backend is None or k[0] == backend]

    def __len__(self) -> int:
        return len(self._plans)

    def clear(self, backend: str | None = None) -> None:
        """Forget the plans (of one backend); they are rebuilt on the next call."""
        with self._lock:
            for k in self.keys(backend):
                del self._plans[k]


#: Every backend's plans, in one place.
PLANS = state.register("plans", PlanCache(), "backend, op, n, H, T bucket, dtype, device, ...")
