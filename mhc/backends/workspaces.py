"""Scratch buffers of the GPU launchers, pooled so that an eager call does not allocate them.

A launcher asks :data:`WORKSPACES` for a *layout* (a tuple of ``(shape, dtype)``: partial sums
and the like, every element of which the call's kernels write before they read it) and,
optionally, arrival counters (int32 that the kernel leaves zero, so that they are zeroed once,
never per call: no memset launch). It gets them with a ticket, launches, and returns the ticket.

The rule that keeps this safe: a set of buffers is used by one stream's launches only, or by one
captured CUDA graph only, never by both and never by two of either.

- Eager launches: one pool entry per (device, stream, layout, counter count), its counters
  (if any) part of the entry. :meth:`Workspaces.take` removes
  it from the pool and :meth:`Workspaces.put` returns it once the call's launches have been
  issued; launches on one stream run in order, so the next call finds the counters zero and
  overwrites the scratch only after the previous call's kernels have read it. Concurrent calls
  on one stream (two threads) never share an entry: the second finds the pool empty and gets new
  buffers. A call that fails or is interrupted between the two (a KeyboardInterrupt in the middle
  of an interpreted launch, an exception) may leave non-zero counts: that entry never reaches
  the pool again, so nothing a failed call leaves can corrupt a later one.
- Launches captured into a CUDA graph: the scratch is allocated in the capture (the graph's
  private memory pool), and the counters are a buffer that nothing else ever gets: the graph's
  replays use it (each leaves it zero, and replays of one graph run one after the other), eager
  calls and other graphs cannot. It is a spare zeroed by an earlier eager call
  (``torch.cuda.graph`` synchronises the device before capturing, so the zeros are in memory), or,
  with no spare, zeroed inside the graph (a memset node per replay).

Every counter buffer ever made stays referenced, never freed: a captured graph may still point at
one. Layouts over :data:`POOL_MAX_BYTES` are never pooled: at thousands of tokens the device time
dwarfs an allocation, and a pooled buffer would hold that memory for good. Memory held: one entry
per (device, stream, layout) that a call has used, each at most ``POOL_MAX_BYTES``.
"""

from __future__ import annotations

import threading

import torch

from mhc import state, torch_private

__all__ = ["POOL_MAX_BYTES", "Workspaces", "WORKSPACES"]

#: Largest layout (bytes, all its buffers together) that :class:`Workspaces` keeps in a pool.
POOL_MAX_BYTES = 4 << 20

Layout = tuple  # of (shape: tuple[int, ...], dtype: torch.dtype)

_stream_capturing = torch_private.cuda_stream_capturing
_current_raw_stream = torch_private.cuda_current_raw_stream


class Workspaces:
    """Pooled scratch buffers and arrival counters (the module docstring states the rule)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # (device index, stream, layout, counters) -> [counters or None, tensor per (shape, dtype)]
        self._pool: dict[tuple, list] = {}
        self._spares: dict[torch.device, torch.Tensor] = {}  # zeroed counters, never used: for a capture
        self._all: list[torch.Tensor] = []

    def _counters(self, device: torch.device, count: int) -> torch.Tensor:
        buf = torch.zeros(max(count, 4096), dtype=torch.int32, device=device)
        with self._lock:
            self._all.append(buf)
        return buf

    def take(self, device: torch.device, layout: Layout, counters: int = 0) -> tuple[tuple, list]:
        """``(ticket, [cnt, *scratch])``: at least ``counters`` zeroed int32 counters (``cnt`` is
        None for 0) and one uninitialised tensor per ``(shape, dtype)`` of ``layout``. Hand the
        ticket to :meth:`put` once the launches that use them are issued. Call it with ``device``
        (a CUDA device or the CPU) current."""
        index = device.index  # None: the CPU (device.type costs more: a new string per read)
        if index is not None:
            if _stream_capturing():  # the graph's own buffers: never pooled
                cnt = None
                if counters:
                    cnt = self._spares.pop(device, None)
                    if cnt is None or cnt.numel() < counters:
                        cnt = self._counters(device, counters)
                return (None, None, None), [cnt, *_allocate(layout, device)]
            key = (index, _current_raw_stream(index), layout, counters)
        else:
            key = (None, 0, layout, counters)
        entry = self._pool.pop(key, None)  # atomic under the GIL: two callers never get one entry
        if entry is None:
            scratch = _allocate(layout, device)
            if sum(t.numel() * t.element_size() for t in scratch) > POOL_MAX_BYTES:
                # Scratch this large is not kept, but its counters are: from the pool's entry of
                # counters alone, so that no call makes (and zeroes) a counter buffer of its own.
                sub, (cnt,) = self.take(device, (), counters) if counters else (None, (None,))
                return (None, None, sub), [cnt, *scratch]
            entry = [self._counters(device, counters) if counters else None, *scratch]
            if counters and index is not None and device not in self._spares:
                self._spares[device] = self._counters(device, counters)
        return (key, entry, None), entry

    def put(self, ticket: tuple) -> None:
        """Return a :meth:`take`'s buffers to their pool after the launches that use them were
        issued (the kernels leave the counters zero); a graph's, and oversized scratch, are not
        kept (an oversized layout's counters are)."""
        key, entry, sub = ticket
        if key is not None:
            self._pool[key] = entry
        if sub is not None:
            self.put(sub)

    def clear(self) -> None:
        """Drop the pooled entries and spares (calls make new ones). Every counter buffer made
        stays referenced (``_all``): a captured graph may still point at one."""
        with self._lock:
            self._pool.clear()
            self._spares.clear()

    def counter_buffers(self) -> list[torch.Tensor]:
        """The pooled counter buffers (each must hold zeros between calls)."""
        return [entry[0] for entry in list(self._pool.values()) if entry[0] is not None]


def _allocate(layout: Layout, device: torch.device) -> list[torch.Tensor]:
    return [torch.empty(shape, dtype=dtype, device=device) for shape, dtype in layout]


#: The one pool of every launcher.
WORKSPACES = state.register("workspaces", Workspaces(), "device, stream, layout, counter count")
