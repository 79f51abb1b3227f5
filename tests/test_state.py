"""``mhc.state``: every cache and switch that outlives a call is listed in one place, and one
``reset()`` empties them (what the tests rely on to start from a fresh state)."""

from __future__ import annotations

import torch

import mhc
import mhc.backends
import mhc.backends.aiter
import mhc.backends.workspaces
import mhc.plans
from mhc import checking, registry, state


def test_the_package_state_is_listed_with_its_keys():
    names = {e.name: e for e in state.entries()}
    for name in ("registry.decisions", "registry.env", "plans", "workspaces", "backends.allocator", "aiter.head_pad"):
        assert name in names, name
        assert names[name].keyed_by
    assert names["plans"].obj is mhc.plans.PLANS
    assert names["workspaces"].obj is mhc.backends.workspaces.WORKSPACES
    assert names["aiter.head_pad"].obj is mhc.backends.aiter.HEAD_PAD_CACHE


def test_reset_empties_every_cache_and_restores_every_switch(monkeypatch):
    args, kw = checking.make_inputs("post", (2,), 4, 16, torch.float16, seed=0)
    mhc.post(*args, backend="triton")  # a plan, a decision, maybe pooled buffers
    assert len(mhc.plans.PLANS) and registry._STATE.decisions
    monkeypatch.setattr(mhc.backends, "_ALLOCATOR", lambda *a: None)
    state.reset()
    assert len(mhc.plans.PLANS) == 0 and not registry._STATE.decisions
    assert not mhc.backends.workspaces.WORKSPACES.counter_buffers()
    assert mhc.backends._ALLOCATOR is mhc.backends._plain_empty
    out = mhc.post(*args, backend="triton")  # and everything is rebuilt on the next call
    assert torch.equal(out, torch.ops.mhc.post(*args, backend="triton"))


def test_register_lists_a_new_cache_and_resets_it():
    cache = state.register("test.cache", {"k": 1}, "k")
    try:
        assert state.entries()[-1].name == "test.cache"
        state.reset()
        assert cache == {}
    finally:
        state._ENTRIES.pop("test.cache")


def test_a_change_of_mhc_backend_is_seen_by_the_next_call(monkeypatch):
    monkeypatch.setenv("MHC_BACKEND", "torch")
    assert registry.current_choice("pre") == "torch"
    monkeypatch.setenv("MHC_BACKEND", "pre:triton")
    assert registry.current_choice("pre") == "triton" and registry.current_choice("post") == "auto"
    monkeypatch.delenv("MHC_BACKEND")
    assert registry.current_choice("pre") == "auto"
