"""``mhc.state``: every cache and switch that outlives a call is listed in one place, and one
``reset()`` empties them (what the tests rely on to start from a fresh state)."""

from __future__ import annotations

import re

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


# --- the listing is complete ------------------------------------------------------------------------

#: Module-level containers that are not state: constant tables, written at import and never after
#: (the test below checks that calls leave them as they were).
CONSTANTS = {
    "mhc.autograd": {"SCHEMAS", "BACKWARD_KERNELS", "FORMULAS", "FUNCTIONS"},
    "mhc.checking": {"TOLERANCES", "GRAD_TOLERANCES", "OUTPUTS", "GRAD_INPUTS"},
    "mhc.integrations.transformers": {"_SOURCE_SHA256"},
    "mhc.ops": {"_D", "SCHEMAS", "_KERNELS", "SPECS"},
    "mhc.reference": {"DEFAULTS"},
    "mhc.registry": {"_BUILTIN"},
    "mhc.validation": {"_D", "MIX_DTYPES"},
    "mhc.backends.tilelang.aot": {"_SMS"},
    "mhc.backends.tilelang.direct": {"TESTED"},
    "mhc.backends.tilelang.launch": {"_DTYPES"},
    "mhc.backends.triton.aot": {"_TYPE", "SPILL_WAIVERS"},
    "mhc.backends.triton.backward": {"COMPILE_OPTIONS"},
    "mhc.backends.triton.build": {"COMPILE_OPTIONS", "_TYPE"},
    "mhc.backends.triton.configs": {"SHARED_MEMORY", "SMALL_ROWS", "TWO_PASS_ROWS", "POST_ROWS", "BACKWARD_ROWS"},
    "mhc.backends.triton.launch": {"COMPILE_OPTIONS", "SHARED_MEMORY"},
}


def _modules():
    """Every module of the package that imports here (the optional libraries' may not)."""
    import importlib
    import pkgutil

    mods = []
    for info in pkgutil.walk_packages(mhc.__path__, "mhc."):
        if info.name == "mhc.__main__":
            continue
        try:
            mods.append(importlib.import_module(info.name))
        except Exception:  # an optional library missing or broken: its state cannot exist either
            pass
    return mods


def _containers(mods):
    # mhc.state._ENTRIES is the listing itself
    return {(m.__name__, k): v for m in mods for k, v in vars(m).items()
            if isinstance(v, (dict, list, set)) and not k.startswith("__") and (m.__name__, k) != ("mhc.state", "_ENTRIES")}


def test_every_module_level_cache_is_registered_and_every_other_container_is_constant():
    mods = _modules()
    registered = {id(e.obj) for e in state.entries()}
    before = {key: repr(v) for key, v in _containers(mods).items()}
    unlisted = [f"{m}.{k}" for (m, k), v in _containers(mods).items()
                if id(v) not in registered and k not in CONSTANTS.get(m, ())]
    assert not unlisted, f"module-level containers neither registered in mhc.state nor listed as constants: {unlisted}"
    for op in ("post", "pre", "head", "fused_post_pre"):  # calls that fill every cache they can here
        args, kw = checking.make_inputs(op, (2,), 4, 16, torch.float16, seed=0)
        getattr(mhc, op)(*args, **kw, backend="triton")
    changed = [f"{m}.{k}" for (m, k), v in _containers(mods).items()
               if k in CONSTANTS.get(m, ()) and repr(v) != before[(m, k)]]
    assert not changed, f"constants changed by a call (they are state: register them): {changed}"


def test_the_docstring_table_names_every_registered_entry():
    _modules()
    listed = set(re.findall(r"^``([a-z_.]+)``  ", state.__doc__, re.M))
    assert {e.name for e in state.entries() if not e.name.startswith("test.")} == listed


def test_reset_empties_each_registered_cache():
    mods = _modules()
    for op in ("post", "pre"):
        args, kw = checking.make_inputs(op, (2,), 4, 16, torch.float16, seed=0)
        getattr(mhc, op)(*args, **kw, backend="triton")
    state.reset()
    for e in state.entries():
        if isinstance(e.obj, (dict, list, set)) or hasattr(e.obj, "__len__"):
            assert len(e.obj) == 0, e.name
    direct = [m for m in mods if m.__name__ == "mhc.backends.triton.direct"]
    if direct:
        assert direct[0].ENABLED is True and direct[0].CHECK_KEYS == direct[0]._CHECK_KEYS_DEFAULT
