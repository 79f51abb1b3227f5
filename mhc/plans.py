"""Launch plans: what a backend launches for one kind of call, decided once and kept in one place.

A *plan* is everything a backend's launcher derives from the shape of a call and not from the
values of its tensors: the launch config, the kernel handles, the grid's constants, the sizes of
its workspaces. Backends build one on the first call of a kind and look it up on every later one
(:data:`PLANS`, a dict lookup), so the host cost of a call does not grow with the heuristics
behind it.

Keys are explicit tuples that start with the backend's name and hold everything the plan
depends on: ``(backend, op, n, H, T bucket, dtype, device, ...)``, where the backend defines its
T buckets (the token counts at which its heuristics change). A plan must never depend on what is
*in* a tensor (``fn`` is read by the kernels on every call, so an in-place update is always
seen), on a data pointer, or on the stream: a plan sizes workspaces but never holds one.
Workspaces come from PyTorch's caching allocator per call (stream-ordered, so safe across
streams and under CUDA graphs), or from :mod:`mhc.backends.workspaces`, a pool with its own
rule: per (device, stream), and a captured graph's own; it also spares the arrival counters of
Triton's single-launch kernel (which must come zeroed) a memset per call.

Thread safety: lookups are plain dict reads (atomic under the GIL); a miss builds under one
re-entrant lock, so two threads that miss at once build once. A plan is immutable once stored.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from typing import Any

from mhc import state

__all__ = ["PlanCache", "PLANS"]


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
