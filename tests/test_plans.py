"""The launch plans (``mhc.plans.PLANS``): built once per key, never stale, safe to share.

- a plan built at one T serves every T of its bucket, and another bucket gets its own (Triton,
  under the interpreter: the outputs are checked against the fp64 oracle);
- a second device index gets a plan of its own, sized for that device (CPU-faked: two CUDA
  device indices whose shared memory differs, no tensor needed to build a plan);
- an in-place update of ``fn`` is seen by the next call (nothing derived from a tensor's values
  is cached);
- two threads: one build per key whatever the race, and concurrent calls through the op layer
  agree with serial ones (the torch backend: the Triton interpreter is not thread-safe; the GPU
  suite runs Triton and TileLang in threads and on two streams);
- TileLang's launchers (CPU-faked kernels): one plan per (op, n, H, dtype, device), workspaces
  sized per call;
- everything a Triton plan holds is constant within its T bucket.
"""

from __future__ import annotations

import importlib.util
import threading

import pytest
import torch

from mhc import checking, plans
from mhc.backends.workspaces import WORKSPACES
from mhc.plans import PLANS, PlanCache

from conftest import DEVICE

_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")


def _agrees(op, args, kw, backend):
    outs = checking.call(op, args, kw, backend)
    errs = checking.compare(op, outs, checking.oracle(op, args, kw), args[0].dtype if op != "post" else args[1].dtype)
    assert all(e <= t for _, e, t in errs), errs
    return outs


def _served_by(backend: str) -> None:
    from conftest import backend_reasons

    why = backend_reasons(backend)
    if why:
        pytest.skip(f"{backend} cannot serve here: " + "; ".join(why))


@_triton
def test_a_plan_serves_its_bucket_and_another_bucket_gets_its_own():
    _served_by("triton")
    from mhc.plans import t_bucket

    for T in (3, 5, 64):  # one bucket: one plan
        args, kw = checking.make_inputs("pre", (T,), 4, 48, torch.bfloat16, DEVICE, seed=T)
        _agrees("pre", args, kw, "triton")
    assert PLANS.keys("triton") == [("triton", "pre", 4, 48, t_bucket(3), torch.bfloat16, DEVICE, False)]
    built = PLANS.builds
    args, kw = checking.make_inputs("pre", (1,), 4, 48, torch.bfloat16, DEVICE, seed=1)
    _agrees("pre", args, kw, "triton")
    args, kw = checking.make_inputs("pre", (2, 3), 4, 48, torch.bfloat16, DEVICE, seed=2)  # 6 tokens again
    _agrees("pre", args, kw, "triton")
    assert PLANS.builds == built + 1 and len(PLANS.keys("triton")) == 2


@_triton
def test_a_second_device_index_gets_its_own_plan(monkeypatch):
    """Plans are keyed by device: cuda:1 (64 KB of shared memory here) never gets cuda:0's
    (227 KB) tiles, and each lookup returns the plan built for that device."""
    from mhc.backends.triton import configs, launch

    smem = {0: configs.SHARED_MEMORY["sm90"], 1: configs.SHARED_MEMORY["gfx942"]}
    monkeypatch.setattr(launch, "device_shared_memory", lambda dev: smem[dev.index])
    monkeypatch.setattr(launch, "device_config",
                        lambda op, n, H, T, dtype, dev, norm=False: configs.configs(n, H, T, op, smem[dev.index],
                                                                                   norm=norm))
    d0, d1 = torch.device("cuda", 0), torch.device("cuda", 1)
    for op, T in (("fused_post_pre", 2000), ("pre", 64)):
        p0 = launch.plan_for(op, 8, 4096, T, torch.bfloat16, d0)
        p1 = launch.plan_for(op, 8, 4096, T, torch.bfloat16, d1)
        assert p0 is not p1  # and so are their kernel handles: a CompiledKernel is loaded on one device
        if T > configs.SMALL_T:
            assert p0.tp == configs.plan(op, 8, 4096, T, smem[0]) and p1.tp == configs.plan(op, 8, 4096, T, smem[1])
            assert p0.tp != p1.tp and p0.prenorm is not p1.prenorm
        else:
            assert p0.cfg == configs.configs(8, 4096, T, op, smem[0]) and p1.cfg == configs.configs(8, 4096, T, op, smem[1])
            assert p0.kernel is not p1.kernel
        assert launch.plan_for(op, 8, 4096, T, torch.bfloat16, d1) is p1
        assert launch.plan_for(op, 8, 4096, T, torch.bfloat16, d0) is p0


@pytest.mark.parametrize("op", ["pre", "head", "fused_post_pre"])
def test_an_in_place_update_of_fn_is_seen(backend, op):
    """The cache holds shapes, never values: after ``fn.mul_`` (an optimizer step) the next call
    computes with the new weights."""
    from conftest import backend_reasons

    why = backend_reasons(backend, op=op)
    if why:
        pytest.skip("; ".join(why))
    args, kw = checking.make_inputs(op, (5,), 4, 32, torch.bfloat16, DEVICE, seed=11)
    before = _agrees(op, args, kw, backend)
    fn = args[4 if op == "fused_post_pre" else 1]
    with torch.no_grad():
        fn.mul_(-3.0)
    after = _agrees(op, args, kw, backend)
    assert not all(torch.equal(a, b) for a, b in zip(before, after))


def test_two_threads_build_a_plan_once():
    cache = PlanCache()
    built = []
    gate = threading.Barrier(8)

    def build(key):
        built.append(key)
        threading.Event().wait(0.01)  # a slow build: the other threads arrive meanwhile
        return object()

    got = [[] for _ in range(8)]

    def worker(i):
        gate.wait()
        for k in range(20):
            got[i].append(cache.get(("x", k % 4), lambda k=k: build(("x", k % 4))))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(built) == [("x", k) for k in range(4)] and cache.builds == 4
    assert all(g == got[0] for g in got)


def test_two_threads_calling_the_ops_at_once_agree_with_serial_calls():
    """The op layer's shared state (backend decisions, plans) under concurrent calls of
    different shapes: every result equals the serial one."""
    cases = [(op, T) for op in ("pre", "post", "head", "fused_post_pre") for T in (1, 3, 9)]
    inputs = {c: checking.make_inputs(c[0], (c[1],), 4, 32, torch.bfloat16, DEVICE, seed=c[1]) for c in cases}
    serial = {c: checking.call(c[0], *inputs[c], "torch") for c in cases}
    errors = []
    gate = threading.Barrier(2)

    def worker(order):
        gate.wait()
        for c in order * 5:
            try:
                for a, b in zip(checking.call(c[0], *inputs[c], "torch"), serial[c]):
                    if not torch.equal(a, b):
                        errors.append(f"{c}: differs")
            except Exception as e:  # reported below, with the case
                errors.append(f"{c}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=worker, args=(o,)) for o in (cases, cases[::-1])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:5]


@_triton
def test_plans_hold_nothing_that_changes_within_a_bucket():
    from mhc.backends.triton import configs
    from mhc.plans import t_bucket

    for H in (1, 64, 4096, 7168):
        for n in (1, 4, 8):
            for op in ("pre", "head", "fused_post_pre"):
                by_bucket = {}
                for T in (1, 2, 17, 64, 127, 128, 129, 500, 1024, 1025, 4096, 16384):
                    what = configs.configs(n, H, T, op) if T <= configs.SMALL_T else configs.plan(op, n, H, T)
                    assert by_bucket.setdefault(t_bucket(T), what) == what, (op, n, H, T)
            posts = {}
            for T in (1, 2, 128, 129, 4096):
                assert posts.setdefault(t_bucket(T), configs.post_config(H, T)) == configs.post_config(H, T)


@pytest.mark.skipif(importlib.util.find_spec("tilelang") is None, reason="tilelang not installed")
def test_tilelang_plans_and_workspaces(monkeypatch):
    """TileLang's launchers (kernels stood in for: no GPU here): one plan per (op, n, H, dtype,
    device) whatever T, workspaces sized for each call's T."""
    from mhc.backends.tilelang import launch

    calls, builds = [], []

    def get_kernel(op, n, H, dtype, target, num_sms, cfg=None):
        builds.append(op)
        cfg = cfg or (configs.post_config(n, H) if op == "post" else launch.mix_config(op, n, H, num_sms))
        return (lambda *args: calls.append((op, args))), cfg

    monkeypatch.setattr(launch, "target_for", lambda dev: {"kind": "cuda", "arch": "sm_90a"})
    monkeypatch.setitem(launch.KERNELS.num_sms, torch.device("cpu"), 132)
    monkeypatch.setattr(launch, "get_kernel", get_kernel)
    for T in (1, 70, 200):
        (res, fn, s, b), kw = checking.make_inputs("pre", (T,), 4, 512, torch.bfloat16, torch.device("cpu"))
        launch.pre(res, fn, s, b, *kw.values())
        parts, fin, flags = calls[-1][1][7:10]
        nb = -(-T // 64)
        assert parts.shape == (nb, 4, 64 * 28) and fin.shape == (nb, 64 * 28)
        # the arrival counters: the pool's flat zeroed int32 buffer, two per token block
        assert flags.dtype == torch.int32 and flags.dim() == 1 and flags.numel() >= 2 * nb
        assert int(flags.count_nonzero()) == 0 and any(flags is c for c in WORKSPACES.counter_buffers())
    assert builds == ["pre"] and PLANS.keys("tilelang") == [("tilelang", "pre", 4, 512, torch.bfloat16,
                                                               torch.device("cpu"))]
    plans.PLANS.clear("tilelang")
