"""The AITER backend's *adapter* (``mhc/backends/aiter.py``), checked against stand-ins of AITER.

These tests check the adapter, not AMD's kernels: there is no AMD GPU here. ``tests/aiter_standin``
implements the ``aiter.ops.mhc`` API with ``mhc.reference``'s math and reproduces AITER's quirks
per release (0.1.13: device-less allocation, no compact head; 0.1.14: compact head; 0.1.15: the
fused RMSNorm, computed with AITER's roundings; 0.1.16: also ``mhc_fused_post_pre``; all:
assertions for n != 4 and H % 256 != 0, ZeroDivisionError at T == 0).
The real kernels are checked by ``python -m mhc check`` on a ROCm machine.

The test-only way to let the stand-in serve CPU tensors is the ``standin`` fixture: it registers a
test-only :class:`mhc.registry.Backend` built from ``mhc.backends.aiter.BACKEND`` (same probe,
loader and notes; n/H/dtype limits kept) whose capabilities say ``cpu`` instead of ROCm. Nothing in
``mhc/backends/aiter.py`` knows about it: the public record stays ROCm-only.

Numerics use ``mhc.checking`` (inputs, fp64 oracle, tolerance table) through the contract tests'
own helpers, which are imported, not copied.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import importlib
import os
import pathlib
import subprocess
import sys
import textwrap
import types
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import aiter_standin
import mhc
import test_contract as contract
from mhc import checking, registry
from mhc.backends import aiter as aiter_backend
from mhc.registry import BackendError, Problem

ROOT = str(pathlib.Path(__file__).resolve().parent.parent)
OPS = registry.OPS
VERSIONS = ["0.1.13", "0.1.14", "0.1.16"]
CPU = torch.device("cpu")


def _register_cpu_record(version: str) -> str:
    """Register the test-only record (the public one, with CPU capabilities) and return its name."""
    name = "aiter_standin_" + version.replace(".", "_")
    caps = dataclasses.replace(aiter_backend.BACKEND.capabilities, device_types=frozenset({"cpu"}),
                               platforms=frozenset({"cpu"}))
    registry.register(dataclasses.replace(aiter_backend.BACKEND, name=name, capabilities=caps), replace=True)
    return name


@pytest.fixture
def install(tmp_path, monkeypatch):
    """``install(version)`` / ``install("pypi")``: put a stand-in first on sys.path for this test."""

    def _install(version: str, **kw) -> pathlib.Path:
        root = tmp_path / f"site-{version}"
        root.mkdir()
        if version == "pypi":
            aiter_standin.install_pypi_aiter(root)
        else:
            aiter_standin.install_amd_aiter(root, version, **kw)
        aiter_standin.activate(root, monkeypatch)
        return root

    yield _install
    aiter_standin.forget_aiter()
    aiter_backend.HEAD_PAD_CACHE.clear()


@contextlib.contextmanager
def _serving(install, version: str):
    """AITER stand-in release ``version``, installed, and the adapter registered to serve it on CPU."""
    install(version)
    name = _register_cpu_record(version)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # 0.1.13's race warning: tested on its own
        assert registry.reasons_for(name, Problem("pre", CPU, torch.bfloat16, 4, 256, 8)) == []
    module = importlib.import_module("aiter.ops.mhc")
    module.CALLS.clear()
    try:
        yield types.SimpleNamespace(name=name, version=version, module=module, adapter=registry._STATE.loaded[name])
    finally:
        registry.unregister(name)


@pytest.fixture(params=VERSIONS, ids=lambda v: f"aiter{v}")
def standin(request, install):
    """One AITER stand-in release, installed, and the adapter registered to serve it on CPU."""
    with _serving(install, request.param) as s:
        yield s


def _run_and_check(op, args, kwargs, name):
    contract._check_outputs(op, args, kwargs, checking.call(op, args, kwargs, name), name)


# --- the contract, against every stand-in release ----------------------------------------------


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("lead, H", [((1,), 256), ((7,), 256), ((2, 3), 256), ((5,), 512)])
def test_aiter_adapter_matches_fp64_reference(standin, op, lead, H):
    args, kwargs = checking.make_inputs(op, lead, 4, H, torch.bfloat16, CPU, seed=11)
    _run_and_check(op, args, kwargs, standin.name)


@pytest.mark.parametrize("op", OPS)
@given(data=st.data())
def test_aiter_contract_property_test(standin, op, data):
    """The shared property test, on CPU (where the stand-in serves) whatever the test device is:
    the adapter serves n == 4, H % 256 == 0 and refuses the rest with a BackendError naming it."""
    contract.check_drawn_case(standin.name, op, data, CPU)


@pytest.mark.parametrize("op", OPS)
def test_aiter_contract_single_token_real_width(standin, op):
    contract.test_single_token_real_width(standin.name, op, device=CPU)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("lead", [(0,), (3, 0)])
def test_aiter_contract_empty_batch(standin, op, lead, monkeypatch):
    contract.test_empty_batch_returns_empty_outputs(standin.name, op, lead, monkeypatch, device=CPU)
    assert standin.module.CALLS == []


@pytest.mark.parametrize("op", OPS)
def test_aiter_non_contiguous_inputs(standin, op):
    """Strided views with NaN in the gaps give the same answer (the op layer copies them)."""
    args, kwargs = checking.make_inputs(op, (3,), 4, 256, torch.bfloat16, CPU, seed=3)
    strided = tuple(torch.stack([a, torch.full_like(a, float("nan"))], -1)[..., 0] for a in args)
    want = checking.call(op, args, kwargs, standin.name)
    got = checking.call(op, strided, kwargs, standin.name)
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


@pytest.mark.parametrize("op", ["pre", "head", "fused_post_pre"])
def test_aiter_scalars_are_passed_through(standin, op):
    """Non-default eps, multiplier and Sinkhorn count reach AITER in the right positions."""
    args, _ = checking.make_inputs(op, (4,), 4, 256, torch.bfloat16, CPU, seed=4)
    if op == "head":
        kwargs = dict(rms_eps=1e-2, hc_eps=0.25)
    else:
        kwargs = dict(rms_eps=1e-2, hc_pre_eps=0.25, hc_sinkhorn_eps=1e-3, hc_post_mult_value=1.5, sinkhorn_repeat=3)
    _run_and_check(op, args, kwargs, standin.name)


def test_aiter_leading_dims_are_restored(standin):
    args, kwargs = checking.make_inputs("fused_post_pre", (2, 3), 4, 256, torch.bfloat16, CPU, seed=5)
    new, p, c, li = mhc.fused_post_pre(*args, **kwargs, backend=standin.name)
    assert new.shape == (2, 3, 4, 256) and p.shape == (2, 3, 4, 1) and c.shape == (2, 3, 4, 4)
    assert li.shape == (2, 3, 256)


# --- quirk: <= 0.1.13 allocates without a device argument --------------------------------------


def test_aiter_0113_standin_allocates_on_the_default_device(install):
    """The quirk is real in the stand-in: called bare, 0.1.13 puts outputs on torch's default device."""
    install("0.1.13")
    from aiter.ops import mhc as aiter_mhc

    (r, fn, s, b), kw = checking.make_inputs("pre", (2,), 4, 256, torch.bfloat16, CPU, seed=6)
    with torch.device("meta"):
        p, _, _ = aiter_mhc.mhc_pre(r, fn, s, b, **kw)
    assert p.device.type == "meta"


@pytest.mark.parametrize("op", OPS)
def test_aiter_outputs_follow_the_input_device_not_the_default(standin, op):
    """With another default device in force, every release's outputs land on the input's device.

    The adapter is called directly: a ``torch.device`` mode around a ``torch.ops`` call is not
    active inside the op's kernel, so only a caller below the op layer (or a current-device
    mismatch on a GPU) can expose the quirk.
    """
    args, kwargs = checking.make_inputs(op, (3,), 4, 256, torch.bfloat16, CPU, seed=6)
    with torch.device("meta"):
        outs = getattr(standin.adapter, op)(*args, *kwargs.values())
    outs = outs if isinstance(outs, tuple) else (outs,)
    assert all(o.device == CPU for o in outs)
    contract._check_outputs(op, args, kwargs, outs, standin.name)


# --- quirk: T == 0 divides by zero in AITER ----------------------------------------------------


@pytest.mark.parametrize("op", OPS)
def test_aiter_adapter_called_directly_at_t0_never_reaches_aiter(standin, op):
    args, kwargs = checking.make_inputs(op, (0,), 4, 256, torch.bfloat16, CPU, seed=7)
    if op == "pre":  # the stand-in reproduces AITER's crash ...
        with pytest.raises(ZeroDivisionError):
            standin.module.mhc_pre(*args, *kwargs.values())
        standin.module.CALLS.clear()
    # ... and the adapter, called below the op layer, returns empty outputs instead.
    outs = getattr(standin.adapter, op)(*args, *kwargs.values())
    outs = outs if isinstance(outs, tuple) else (outs,)
    for o, r in zip(outs, checking.oracle(op, args, kwargs)):
        assert o.shape == r.shape and o.device == CPU
    assert standin.module.CALLS == []


# --- quirk: n == 4 and H % 256 == 0 only -------------------------------------------------------


@pytest.mark.parametrize("n, H, why", [(2, 256, "n=2 unsupported"), (8, 512, "n=8 unsupported"),
                                       (4, 100, "H=100 is not a multiple of 256"),
                                       (4, 384, "H=384 is not a multiple of 256")])
def test_aiter_unsupported_n_or_H_is_a_reason_and_auto_falls_back(standin, monkeypatch, n, H, why):
    assert why in "; ".join(registry.reasons_for(standin.name, Problem("pre", CPU, torch.bfloat16, n, H, 4)))
    # auto as on ROCm (aiter first), with the test-only record in aiter's place.
    monkeypatch.setattr(registry, "auto_order", lambda platform, op, T: (standin.name, "torch"))
    registry._STATE.decisions.clear()
    args, kwargs = checking.make_inputs("pre", (4,), n, H, torch.bfloat16, CPU, seed=8)
    contract._check_outputs("pre", args, kwargs, checking.call("pre", args, kwargs), "auto")
    assert standin.module.CALLS == []  # served by torch, AITER never called
    with pytest.raises(BackendError, match=why):  # an explicit choice says why instead
        checking.call("pre", args, kwargs, standin.name)
    good, kw = checking.make_inputs("pre", (4,), 4, 256, torch.bfloat16, CPU, seed=8)
    checking.call("pre", good, kw)
    assert [c for c, _ in standin.module.CALLS] == ["mhc_pre"]  # auto picks AITER where it can serve


def test_aiter_direct_call_with_bad_n_raises_valueerror_not_assert(standin):
    (r, fn, s, b), kw = checking.make_inputs("pre", (2,), 2, 256, torch.bfloat16, CPU, seed=9)
    with pytest.raises(AssertionError):  # what AITER itself does
        standin.module.mhc_pre(r, fn, s, b, *kw.values())
    with pytest.raises(ValueError, match="n == 4 and H % 256 == 0"):
        standin.adapter.pre(r, fn, s, b, *kw.values())


# --- head: compact fn from 0.1.14, padded and cached before -----------------------------------


def test_aiter_head_path_per_release(standin):
    args, kwargs = checking.make_inputs("head", (3,), 4, 256, torch.bfloat16, CPU, seed=10)
    _run_and_check("head", args, kwargs, standin.name)
    ((fn_name, facts),) = standin.module.CALLS
    assert fn_name == "mhc_pre"
    if standin.version == "0.1.13":
        assert facts == {"rows": 24, "sinkhorn_repeat": 1, "norm": False} and len(aiter_backend.HEAD_PAD_CACHE) == 1
    else:
        assert facts == {"rows": 4, "sinkhorn_repeat": 0, "norm": False} and len(aiter_backend.HEAD_PAD_CACHE) == 0


def test_aiter_0113_standin_rejects_the_compact_head(install):
    install("0.1.13")
    from aiter.ops import mhc as aiter_mhc

    (r, fn, s, b), kw = checking.make_inputs("head", (2,), 4, 256, torch.bfloat16, CPU, seed=10)
    with pytest.raises(AssertionError):
        aiter_mhc.mhc_pre(r, fn, s, b, kw["rms_eps"], kw["hc_eps"], 1e-6, 1.0, 0)


def test_aiter_0113_head_padding_is_cached_and_never_stale(install):
    install("0.1.13")
    name = _register_cpu_record("0.1.13")
    cache = aiter_backend.HEAD_PAD_CACHE
    cache.clear()
    try:
        (r, fn, s, b), kw = checking.make_inputs("head", (3,), 4, 256, torch.bfloat16, CPU, seed=12)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            _run_and_check("head", (r, fn, s, b), kw, name)
        _run_and_check("head", (r, fn, s, b), kw, name)
        assert (cache.misses, cache.hits, len(cache)) == (1, 1, 1)
        # In-place updates bump _version: rebuilt, and the answer follows the new weights.
        with torch.no_grad():
            fn.mul_(-1.5)
        _run_and_check("head", (r, fn, s, b), kw, name)
        with torch.no_grad():
            b.add_(0.75)
            s.copy_(s * 2)
        _run_and_check("head", (r, fn, s, b), kw, name)
        assert cache.misses == 3
        # A swapped storage (fn.data = ...) changes data_ptr without bumping _version.
        fn.data = torch.flip(fn.data, [1]).contiguous()
        _run_and_check("head", (r, fn, s, b), kw, name)
        assert cache.misses == 4 and len(cache) == 1
        # Freed weights leave the cache.
        del fn, s, b
        gc.collect()
        assert len(cache) == 0
        # Inference tensors have no version counter: padded every call, never cached.
        with torch.inference_mode():
            (r2, fn2, s2, b2), kw2 = checking.make_inputs("head", (2,), 4, 256, torch.bfloat16, CPU, seed=13)
            _run_and_check("head", (r2, fn2, s2, b2), kw2, name)
        assert len(cache) == 0
    finally:
        registry.unregister(name)


# --- fused_post_pre: AITER's fused kernel from 0.1.16 ------------------------------------------


def test_aiter_fused_post_pre_path_per_release(standin):
    args, kwargs = checking.make_inputs("fused_post_pre", (3,), 4, 256, torch.bfloat16, CPU, seed=14)
    _run_and_check("fused_post_pre", args, kwargs, standin.name)
    called = [c for c, _ in standin.module.CALLS]
    assert called == (["mhc_fused_post_pre"] if standin.version == "0.1.16" else ["mhc_post", "mhc_pre"])


def test_aiter_traces_under_torch_compile(install):
    """fullgraph tracing keeps backend= and runs the adapter at run time (one release suffices:
    tracing sees only the op's fake impl)."""
    install("0.1.16")
    name = _register_cpu_record("0.1.16")
    try:
        (x, r, p, c, fn, s, b), kw = checking.make_inputs("fused_post_pre", (3,), 4, 256, torch.bfloat16, CPU,
                                                          seed=15)

        def step(x, r, p, c):
            return mhc.fused_post_pre(x, r, p, c, fn, s, b, backend=name)

        torch._dynamo.reset()
        got = torch.compile(step, fullgraph=True, backend="eager")(x, r, p, c)
        for g, w in zip(got, step(x, r, p, c)):
            torch.testing.assert_close(g, w, rtol=0, atol=0)
        assert [c for c, _ in importlib.import_module("aiter.ops.mhc").CALLS] == ["mhc_fused_post_pre"] * 2
    finally:
        registry.unregister(name)


# --- detection ---------------------------------------------------------------------------------


@pytest.mark.parametrize("text, want", [("0.1.14", (0, 1, 14)), ("0.1.16.post1", (0, 1, 16)),
                                        ("0.1.13.dev7+g1a2b3c", (0, 1, 13)), ("v0.2.0", (0, 2, 0)),
                                        ("nightly", None)])
def test_aiter_version_parsing(text, want):
    assert aiter_backend._parse_version(text) == want


def test_aiter_record_is_rocm_only_bf16_n4_h256():
    caps = aiter_backend.BACKEND.capabilities
    assert caps.reasons(Problem("pre", CPU, torch.bfloat16, 4, 256, 8))  # CPU tensors
    assert caps.dtypes == {torch.bfloat16} and caps.n_values == {4} and caps.h_multiple == 256
    assert caps.device_types == {"cuda"} and caps.platforms == {"rocm"}
    # On this CPU machine the real record cannot serve, with a reason, and auto never tries it.
    assert registry.reasons_for("aiter", Problem("pre", CPU, torch.bfloat16, 4, 256, 8))


def test_aiter_detection_without_any_aiter(monkeypatch):
    aiter_standin.forget_aiter()
    monkeypatch.setitem(sys.modules, "aiter", None)  # hide any real one
    found = aiter_backend.detect()
    assert found.module is None and "not installed (distribution amd-aiter)" in found.reasons[0]


def test_aiter_detection_refuses_the_pypi_async_iterator_package(install):
    install("pypi")
    found = aiter_backend.detect()
    assert found.module is None and "PyPI's unrelated package 'aiter' 0.13.20191203" in found.reasons[0]
    assert any("PyPI's unrelated" in n for n in aiter_backend.BACKEND.notes())
    with pytest.raises(ImportError, match="async iterators"):
        aiter_backend.BACKEND.load()


def test_aiter_detection_of_a_release_without_mhc(install):
    install("0.1.5", with_mhc=False)
    found = aiter_backend.detect()
    assert found.module is None and "amd-aiter 0.1.5 is installed but `import aiter.ops.mhc` failed" in found.reasons[0]


def test_aiter_detection_of_a_broken_mhc_module(install):
    root = install("0.1.14")
    (root / "aiter" / "ops" / "mhc.py").write_text("raise OSError('libmodule_mhc.so: cannot open shared object')\n")
    found = aiter_backend.detect()
    assert found.module is None and "OSError: libmodule_mhc.so" in found.reasons[0]


def test_aiter_detection_of_a_module_that_calls_sys_exit(install):
    """detect() never raises: a sys.exit() at import is a reason too (regression: it escaped)."""
    root = install("0.1.14")
    (root / "aiter" / "ops" / "mhc.py").write_text("raise SystemExit('no GPU, bye')\n")
    found = aiter_backend.detect()
    assert found.module is None and "SystemExit: no GPU, bye" in found.reasons[0]


def test_aiter_detection_of_a_module_without_mhc_post(install):
    root = install("0.1.14")
    (root / "aiter" / "ops" / "mhc.py").write_text("def mhc_pre(*a):\n    pass\n")
    assert "aiter.ops.mhc has no mhc_post" in aiter_backend.detect().reasons[0]


def test_aiter_detection_of_a_module_aiter_without_metadata(tmp_path, monkeypatch):
    (tmp_path / "aiter").mkdir()
    (tmp_path / "aiter" / "__init__.py").write_text("")
    aiter_standin.activate(tmp_path, monkeypatch)
    try:
        assert "the distribution amd-aiter is not installed" in aiter_backend.detect().reasons[0]
    finally:
        aiter_standin.forget_aiter()


# --- quirk: the sum-of-squares race before 0.1.14 -----------------------------------------------


@pytest.mark.parametrize("version, warned", [("0.1.13", True), ("0.1.14", False), ("0.1.16", False)])
def test_aiter_race_before_0114_is_noted_and_warned(install, version, warned):
    install(version)
    assert any("sum-of-squares race" in n for n in aiter_backend.BACKEND.notes()) == warned
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        adapter = aiter_backend.BACKEND.load()
    assert any("sum-of-squares race" in str(w.message) for w in seen) == warned
    assert repr(adapter).startswith(f"AiterAdapter(aiter {version}")


# --- end to end in a fresh interpreter: python -m mhc, MHC_BACKEND ------------------------------


def _python(args, site: pathlib.Path, env_extra=None):
    env = {**os.environ, "PYTHONPATH": f"{site}:{ROOT}", **(env_extra or {})}
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=300)


def test_aiter_info_notes_the_race_of_an_old_release(tmp_path):
    site = aiter_standin.install_amd_aiter(tmp_path, "0.1.13")
    out = _python(["-m", "mhc", "info"], site)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "amd-aiter 0.1.13" in out.stdout
    assert "note: amd-aiter 0.1.13 < 0.1.14: its mhc_pre has a sum-of-squares race" in out.stdout


def test_aiter_shadowed_by_pypi_aiter_end_to_end(tmp_path):
    """PyPI's aiter 0.13.20191203 on the path: ``import mhc`` works, ``python -m mhc info`` says why
    AITER is unavailable, and ``MHC_BACKEND=aiter`` raises BackendError with that reason (shown on a
    ROCm build of torch, simulated by setting ``torch.version.hip``; on CPU tensors the reason is
    the device)."""
    site = aiter_standin.install_pypi_aiter(tmp_path)
    info = _python(["-m", "mhc", "info"], site)
    assert info.returncode == 0, info.stderr[-3000:]
    block = info.stdout[info.stdout.index("\n  aiter "):]
    assert "cannot serve" in block.splitlines()[1] and "PyPI's unrelated package 'aiter' 0.13.20191203" in block

    script = textwrap.dedent("""
        import torch, mhc
        from mhc import checking, registry
        a, kw = checking.make_inputs('pre', (2,), 4, 256, torch.bfloat16)
        try:
            mhc.pre(*a, **kw)
        except mhc.BackendError as e:
            print('CPU |', e)
        torch.version.hip = '6.4.0'   # a ROCm build, as far as the registry can tell
        try:
            registry.select('pre', torch.device('cuda', 0), torch.bfloat16, 4, 256, 2)
        except mhc.BackendError as e:
            print('ROCM |', e)
    """)
    out = _python(["-c", script], site, {"MHC_BACKEND": "aiter"})
    assert out.returncode == 0, out.stderr[-3000:]
    lines = dict(line.split(" | ", 1) for line in out.stdout.splitlines() if " | " in line)
    assert "mhc backend 'aiter' cannot serve" in lines["CPU"] and "cpu" in lines["CPU"]
    assert "mhc backend 'aiter' cannot serve pre(T=2, n=4, H=256, bfloat16, cuda:0)" in lines["ROCM"]
    assert "PyPI's unrelated package 'aiter' 0.13.20191203 (async iterators)" in lines["ROCM"]


@pytest.mark.parametrize("op", OPS)
def test_aiter_outputs_are_their_own_tensors(standin, op):
    contract.check_outputs_are_their_own(standin.name, op, CPU, H=256)


# --- the fused RMSNorm: passed to AITER >= 0.1.15 at its hidden sizes, else a reason ------------------


def _norm_inputs(op, H, weight_dtype=torch.bfloat16):
    args, kwargs = checking.make_inputs(op, (4,), 4, H, torch.bfloat16, CPU, seed=12)
    g = torch.Generator().manual_seed(13)
    return args, dict(kwargs, norm_weight=(torch.randn(H, generator=g) * 0.5 + 1).to(weight_dtype), norm_eps=1e-5)


@pytest.mark.parametrize("op", ["pre", "fused_post_pre"])
@pytest.mark.parametrize("H", [256, 1280])
def test_aiter_norm_weight_is_a_reason_where_aiter_cannot_take_it(standin, monkeypatch, op, H):
    """Below 0.1.15 (no norm_weight) and at an H that AITER's fused-norm kernel is not built for,
    the norm is a reason: an explicit choice raises, auto moves on and AITER is never called."""
    from mhc.backends.aiter import NORM_H

    if H in NORM_H and standin.version >= "0.1.15":
        pytest.skip("served (test_aiter_norm_weight_is_passed_through)")
    why = registry.reasons_for(standin.name, Problem(op, CPU, torch.bfloat16, 4, H, 4, norm=True))
    assert len(why) == 1 and ("needs amd-aiter >= 0.1.15" in why[0] if standin.version < "0.1.15"
                              else f"H in {NORM_H} only, got H={H}" in why[0]), why
    args, kwargs = _norm_inputs(op, H)
    with pytest.raises(BackendError, match="fused RMSNorm"):
        checking.call(op, args, kwargs, standin.name)
    monkeypatch.setattr(registry, "auto_order", lambda platform, op, T: (standin.name, "torch"))
    registry._STATE.decisions.clear()
    contract._check_outputs(op, args, kwargs, checking.call(op, args, kwargs), "auto")
    assert standin.module.CALLS == []  # served by torch, AITER never called


@pytest.mark.parametrize("version", ["0.1.15", "0.1.16"])
@pytest.mark.parametrize("op", ["pre", "fused_post_pre"])
@pytest.mark.parametrize("weight_dtype", [torch.bfloat16, torch.float32], ids=["bf16_weight", "fp32_weight"])
def test_aiter_norm_weight_is_passed_through(install, version, op, weight_dtype):
    """From 0.1.15, at H = 1280 (AITER's smallest fused-norm size), AITER computes the norm: its
    two roundings (the collapse, then the product) stay within the bf16 tolerance of the fp64
    reference, and an fp32 weight reaches AITER as bf16 (which is how AITER reads it). 0.1.15
    has no mhc_fused_post_pre: post, then mhc_pre with the norm. The stand-in computes what
    AITER's kernel does (tests/aiter_standin); this checks the adapter, not AMD's kernel."""
    with _serving(install, version) as s:
        args, kwargs = _norm_inputs(op, 1280, weight_dtype)
        outs = checking.call(op, args, kwargs, s.name)
        contract._check_outputs(op, args, kwargs, outs, s.name)
        entry = "mhc_fused_post_pre" if op == "fused_post_pre" and version >= "0.1.16" else "mhc_pre"
        assert [(c, f["norm"]) for c, f in s.module.CALLS if c != "mhc_post"] == [(entry, True)]
        ours = checking.call(op, args, kwargs, "torch")[-1]
        assert not torch.equal(outs[-1], ours)  # AITER's own rounding, not a fallback to mhc's
