"""The launchers' workspace pool (``mhc.backends.workspaces``) on CPU: what it pools, what it never
shares, and what it drops. The CUDA-specific half (a captured graph's own buffers, one pool per
stream) runs on the GPU: tests/test_gpu.py's graphs-after-eager, two-streams and two-threads tests.
"""

from __future__ import annotations

import torch

from mhc.backends.workspaces import POOL_MAX_BYTES, Workspaces

CPU = torch.device("cpu")
LAYOUT = (((4, 8), torch.float32), ((16,), torch.int32))


def test_a_returned_entry_serves_the_next_call_of_its_layout():
    w = Workspaces()
    ticket, (cnt, a, b) = w.take(CPU, LAYOUT)
    assert cnt is None and a.shape == (4, 8) and a.dtype == torch.float32 and b.shape == (16,) and b.dtype == torch.int32
    w.put(ticket)
    _, (_, a2, b2) = w.take(CPU, LAYOUT)
    assert a2 is a and b2 is b


def test_an_entry_out_of_the_pool_is_never_handed_out_twice():
    w = Workspaces()
    _, (_, a, _) = w.take(CPU, LAYOUT)
    _, (_, a2, _) = w.take(CPU, LAYOUT)  # the first caller has not returned its ticket (a second thread)
    assert a2 is not a and a2.data_ptr() != a.data_ptr()


def test_a_call_that_never_returns_its_ticket_leaves_nothing_behind():
    """A call that raised between take and put: its buffers (maybe with non-zero counters) are
    not reused; the next call gets fresh ones."""
    w = Workspaces()
    _, (cnt, a) = w.take(CPU, LAYOUT[:1], counters=8)
    cnt[3] = 1  # what an interrupted launch may leave
    _, (cnt2, a2) = w.take(CPU, LAYOUT[:1], counters=8)
    assert cnt2 is not cnt and int(cnt2.count_nonzero()) == 0 and a2 is not a


def test_counters_come_zeroed_and_belong_to_their_entry():
    """Counters are part of a pool entry (one take, one put a call): the entry of a layout and
    count hands back the same zeroed counters; another layout or count gets its own."""
    w = Workspaces()
    t1, (cnt, a) = w.take(CPU, LAYOUT[:1], counters=100)
    assert cnt.dtype == torch.int32 and cnt.numel() >= 100 and int(cnt.count_nonzero()) == 0
    w.put(t1)
    t2, (cnt2, a2) = w.take(CPU, LAYOUT[:1], counters=100)
    assert cnt2 is cnt and a2 is a
    w.put(t2)
    t3, (cnt3, _, _) = w.take(CPU, LAYOUT, counters=100)  # another layout: its own entry and counters
    assert cnt3 is not cnt
    w.put(t3)
    _, (cnt4, _) = w.take(CPU, LAYOUT[:1], counters=cnt.numel() + 1)  # more than it holds: a larger one
    assert cnt4 is not cnt and cnt4.numel() > cnt.numel()
    assert len(w.counter_buffers()) == 2 and all(int(c.count_nonzero()) == 0 for c in w.counter_buffers())


def test_layouts_over_the_limit_are_not_pooled():
    w = Workspaces()
    big = (((POOL_MAX_BYTES // 4 + 1,), torch.float32),)
    ticket, (_, a) = w.take(CPU, big)
    w.put(ticket)
    _, (_, a2) = w.take(CPU, big)
    assert a2 is not a


def test_the_counters_of_a_layout_over_the_limit_are_pooled():
    """Scratch over the limit is made per call, but its counters are not: the same zeroed buffer
    serves every call (no buffer made, zeroed and kept for good per call), and a call still
    out of the pool gets another."""
    w = Workspaces()
    big = (((POOL_MAX_BYTES // 4 + 1,), torch.float32),)
    ticket, (cnt, a) = w.take(CPU, big, counters=64)
    assert cnt.numel() >= 64 and int(cnt.count_nonzero()) == 0
    w.put(ticket)
    ticket2, (cnt2, a2) = w.take(CPU, big, counters=64)
    assert cnt2 is cnt and a2 is not a
    _, (cnt3, _) = w.take(CPU, big, counters=64)  # the first caller has not returned its ticket
    assert cnt3 is not cnt2
    w.put(ticket2)
    buffers = w.counter_buffers()
    assert len(w._all) == 2 and len(buffers) == 1 and buffers[0] is cnt


def test_each_layout_has_its_own_entry():
    w = Workspaces()
    t1, (_, a) = w.take(CPU, (((64,), torch.float32),))
    w.put(t1)
    t2, (_, b) = w.take(CPU, (((64,), torch.bfloat16),))
    assert b is not a and b.dtype == torch.bfloat16
