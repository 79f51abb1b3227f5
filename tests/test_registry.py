"""Backend selection: MHC_BACKEND parsing, per-op overrides, use_backend nesting, backend=,
reasons, unknown names, explain(), and third-party backends through entry points."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import types

import pytest
import torch

import mhc
from mhc import checking, reference, registry
from mhc.registry import Backend, BackendError, Capabilities
from recorders import Recorder


@pytest.fixture
def fake():
    rec = Recorder()
    b = Backend("fake", None, Capabilities(frozenset({"cpu"}), frozenset({torch.bfloat16})), load=lambda: rec)
    registry.register(b)
    yield rec
    registry.unregister("fake")


@pytest.fixture
def gpu_only():
    b = Backend("gpuonly", None, Capabilities(frozenset({"cuda"}), frozenset({torch.bfloat16}), h_multiple=256),
                load=lambda: types.SimpleNamespace(), probe=lambda p: ["needs the frobnicator"])
    registry.register(b)
    yield b
    registry.unregister("gpuonly")


def _pre_args():
    return checking.make_inputs("pre", (3,), 4, 32, torch.bfloat16, seed=0)


def _post_args():
    return checking.make_inputs("post", (3,), 4, 32, torch.bfloat16, seed=0)


@pytest.mark.parametrize("spec, want", [
    (None, {}),
    ("", {}),
    ("auto", {"*": "auto"}),
    ("triton", {"*": "triton"}),
    (" pre:aiter , post:triton ", {"pre": "aiter", "post": "triton"}),
    ("torch,head:triton", {"*": "torch", "head": "triton"}),
])
def test_parse_spec(spec, want):
    assert registry.parse_spec(spec) == want


@pytest.mark.parametrize("spec, match", [
    ("prex:triton", "unknown op 'prex'"),
    ("pre:", "malformed"),
    ("pre:a:b", "malformed"),
    ("triton,torch", "given twice"),
    ("pre:triton,pre:torch", "given twice"),
])
def test_parse_spec_rejects_malformed(spec, match):
    with pytest.raises(ValueError, match=match) as e:
        registry.parse_spec(spec)
    assert "MHC_BACKEND" in str(e.value)


def test_env_selects_per_op(monkeypatch, fake):
    monkeypatch.setenv("MHC_BACKEND", "pre:fake")
    a, kw = _pre_args()
    mhc.pre(*a, **kw)
    x, kw2 = _post_args()
    mhc.post(*x)
    assert fake.calls == ["pre"]  # post fell through to auto (torch)
    monkeypatch.setenv("MHC_BACKEND", "fake")
    mhc.post(*x)
    assert fake.calls == ["pre", "post"]


def test_env_unknown_backend_names_it_and_lists_known(monkeypatch):
    monkeypatch.setenv("MHC_BACKEND", "pre:nosuch")
    a, kw = _pre_args()
    with pytest.raises(ValueError, match="nosuch") as e:
        mhc.pre(*a, **kw)
    assert "torch" in str(e.value) and "known backends" in str(e.value)


def test_use_backend_nests_and_restores(fake):
    a, kw = _pre_args()
    x, _ = _post_args()
    with mhc.use_backend("fake"):
        with mhc.use_backend(post="torch"):
            mhc.pre(*a, **kw)
            mhc.post(*x)
            assert fake.calls == ["pre"]
        mhc.post(*x)
        assert fake.calls == ["pre", "post"]
    mhc.pre(*a, **kw)
    assert fake.calls == ["pre", "post"]


def test_use_backend_beats_env_and_backend_argument_beats_both(monkeypatch, fake):
    monkeypatch.setenv("MHC_BACKEND", "torch")
    a, kw = _pre_args()
    with mhc.use_backend("pre:fake"):
        mhc.pre(*a, **kw)
        assert fake.calls == ["pre"]
        mhc.pre(*a, **kw, backend="torch")
        assert fake.calls == ["pre"]
    monkeypatch.setenv("MHC_BACKEND", "fake")
    with mhc.use_backend("auto"):
        mhc.pre(*a, **kw)
    assert fake.calls == ["pre"]


def test_use_backend_is_context_local(fake):
    a, kw = _pre_args()
    seen = []
    with mhc.use_backend("fake"):
        t = threading.Thread(target=lambda: seen.append(registry.current_choice("pre")))
        t.start()
        t.join()
        assert registry.current_choice("pre") == "fake"
    assert seen == ["auto"]


def test_use_backend_rejects_unknown_names_and_ops():
    with pytest.raises(ValueError, match="nosuch"):
        with mhc.use_backend("nosuch"):
            pass
    with pytest.raises(ValueError, match="unknown op"):
        with mhc.use_backend(prex="torch"):
            pass


def test_explicit_backend_that_cannot_serve_raises_with_every_reason(gpu_only):
    (r, fn, s, b), kw = checking.make_inputs("pre", (3,), 4, 100, torch.bfloat16, seed=0)
    with pytest.raises(BackendError) as e:
        mhc.pre(r, fn, s, b, **kw, backend="gpuonly")
    msg = str(e.value)
    assert "gpuonly" in msg and "cpu" in msg and "H=100 is not a multiple of 256" in msg
    assert "T=3" in msg and "n=4" in msg


def test_probe_reasons_are_reported(gpu_only):
    p = registry.Problem("pre", torch.device("cuda", 0), torch.bfloat16, 4, 256, 1)
    assert registry.reasons_for("gpuonly", p) == ["needs the frobnicator"]


def test_auto_skips_with_reasons_and_explain_reports_them(gpu_only):
    a, kw = _pre_args()
    ex = mhc.explain("pre", *a)
    assert ex.chosen == "torch" and ex.choice == "auto"
    assert ex.reasons["torch"] == []
    assert any("cpu" in w for w in ex.reasons["gpuonly"])
    text = str(ex)
    assert "served by 'torch'" in text and "gpuonly" in text


def test_explain_names_the_blocked_explicit_choice(gpu_only):
    """Regression (issue 17): it said "no backend can serve", then listed "torch: can serve"."""
    a, kw = _pre_args()
    ex = mhc.explain("pre", *a, backend="gpuonly")
    text = str(ex)
    assert ex.chosen is None and ex.auto_choice == "torch"
    assert "no backend can serve" not in text
    assert "'gpuonly' cannot serve it, and an explicit choice does not fall back" in text
    assert "auto would choose 'torch'" in text and " x gpuonly: " in text


@pytest.mark.parametrize("op, n_args, names", [
    ("pre", 1, "residual, fn, hc_scale, hc_base[, rms_eps, hc_pre_eps, hc_sinkhorn_eps, hc_post_mult_value, "
               "sinkhorn_repeat, norm_weight, norm_eps]"),
    ("head", 3, "residual, fn, hc_scale, hc_base[, rms_eps, hc_eps]"),
    ("post", 5, "x, residual, post_mix, comb_mix;"),
])
def test_explain_with_the_wrong_number_of_arguments_names_the_op(op, n_args, names):
    """Regression (issue 17): too few arguments named the internal check_pre() and asked for
    sinkhorn_repeat, which has a default."""
    a, _ = checking.make_inputs("pre", (3,), 4, 32, torch.bfloat16, seed=74)
    args = (list(a) * 2)[:n_args]
    with pytest.raises(TypeError) as e:
        mhc.explain(op, *args)
    msg = str(e.value)
    assert f"mhc.explain({op!r}, ...) takes {op}'s arguments: {names}" in msg and f"got {n_args}" in msg
    assert "check_" not in msg


def test_explain_uses_the_scalars_it_is_given():
    a, _ = _pre_args()
    assert mhc.explain("pre", *a, 1e-6, 1e-6, 1e-6, 2.0, 5).chosen == "torch"
    with pytest.raises(ValueError, match="sinkhorn_repeat"):
        mhc.explain("pre", *a, 1e-6, 1e-6, 1e-6, 2.0, 0)


def test_a_probe_that_raises_becomes_a_reason():
    def bad_probe(p):
        raise RuntimeError("driver exploded")
    registry.register(Backend("flaky", None, Capabilities(frozenset({"cpu"}), frozenset({torch.bfloat16})),
                              load=lambda: reference, probe=bad_probe))
    try:
        p = registry.Problem("pre", torch.device("cpu"), torch.bfloat16, 4, 32, 3)
        assert registry.reasons_for("flaky", p) == ["probe raised RuntimeError: driver exploded"]
    finally:
        registry.unregister("flaky")


def test_a_loader_that_raises_becomes_a_reason():
    def bad_load():
        raise ImportError("libfoo.so: cannot open shared object file")
    registry.register(Backend("noload", None, Capabilities(frozenset({"cpu"}), frozenset({torch.bfloat16})),
                              load=bad_load))
    try:
        a, kw = _pre_args()
        with pytest.raises(BackendError, match="libfoo.so"):
            mhc.pre(*a, **kw, backend="noload")
    finally:
        registry.unregister("noload")


def test_register_rejects_taken_and_invalid_names():
    with pytest.raises(ValueError, match="already registered"):
        registry.register(registry.get("torch"))
    with pytest.raises(ValueError, match="invalid backend name"):
        registry.register(Backend("auto", None, Capabilities(frozenset({"cpu"}), frozenset()), load=lambda: None))


def test_auto_order_per_platform():
    assert registry.auto_order("rocm", "pre", 1)[0] == "aiter"
    assert registry.auto_order("cpu", "pre", 1) == ("torch",)
    # CUDA: measured winners per op and T bucket (figures in auto_order's docstring)
    assert registry.auto_order("cuda", "pre", 1) == ("triton", "tilelang", "torch")
    assert registry.auto_order("cuda", "head", 64) == ("triton", "tilelang", "torch")
    assert registry.auto_order("cuda", "pre", 65)[0] == "triton"
    assert registry.auto_order("cuda", "head", 65)[0] == "tilelang"
    assert registry.auto_order("cuda", "head", 2048)[0] == "triton"
    assert registry.auto_order("cuda", "fused_post_pre", 2047)[0] == "triton"
    assert registry.auto_order("cuda", "fused_post_pre", 16384)[0] == "triton"
    assert registry.auto_order("cuda", "post", 16384)[0] == "tilelang"
    assert registry.auto_order("cuda", "post", 1)[0] == "tilelang"
    assert registry.auto_order("cuda", "pre_backward", 4096)[-1] == "torch"


def test_auto_decision_follows_the_token_bucket(monkeypatch):
    """The decision cache is keyed by T bucket, so a model that alternates decode (T=1) and
    prefill (T=4096) calls gets each bucket's backend, not the first one it saw."""
    seen = []

    def order(platform, op, T):
        seen.append(registry.t_bucket(T))
        return ("torch",)

    monkeypatch.setattr(registry, "auto_order", order)
    registry._STATE.decisions.clear()
    for T in (1, 4096, 1, 4096):
        registry.select("pre", torch.device("cpu"), torch.bfloat16, 4, 32, T)
    assert seen == [registry.t_bucket(1), registry.t_bucket(4096)] == [0, 5]


_EP_PKG = '''
import torch
from mhc import reference
from mhc.registry import Backend, Capabilities
BACKEND = Backend("thirdparty", "mhc-thirdparty", Capabilities(frozenset({"cpu"}), frozenset({torch.bfloat16})),
                  load=lambda: reference)
NOT_A_BACKEND = 42
'''


def test_entry_point_backends_register_and_broken_ones_become_reasons(tmp_path):
    (tmp_path / "mhc_thirdparty.py").write_text(_EP_PKG)
    dist = tmp_path / "mhc_thirdparty-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: mhc-thirdparty\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        "[mhc.backends]\nthirdparty = mhc_thirdparty:BACKEND\nbroken = mhc_thirdparty:NOT_A_BACKEND\n")
    code = textwrap.dedent("""
        import torch, mhc
        from mhc import checking
        assert 'thirdparty' in mhc.list_backends() and 'broken' in mhc.list_backends(), mhc.list_backends()
        a, kw = checking.make_inputs('pre', (2,), 4, 16, torch.bfloat16)
        p, c, li = mhc.pre(*a, **kw, backend='thirdparty')
        ex = mhc.explain('pre', *a)
        assert ex.chosen == 'torch'
        print('BROKEN:', ex.reasons['broken'])
        try:
            mhc.pre(*a, **kw, backend='broken')
        except mhc.BackendError as e:
            print('RAISED:', e)
    """)
    env = {**__import__("os").environ, "PYTHONPATH": f"{tmp_path}:{_repo_root()}"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "BROKEN: ['entry point 'mhc_thirdparty:NOT_A_BACKEND' failed: TypeError" in out.stdout.replace('"', "'")
    assert "RAISED: backend 'broken' is unavailable" in out.stdout


def _repo_root():
    import pathlib
    return str(pathlib.Path(mhc.__file__).resolve().parent.parent)


# --- a call is accepted or refused the same way whatever T is ------------------------------------


def _refusal(fn):
    try:
        fn()
    except Exception as e:  # the outcome to compare: the exception type, or None
        return type(e)
    return None


@pytest.mark.parametrize("op", registry.OPS)
@pytest.mark.parametrize("case", ["unknown name", "cannot serve", "malformed env"])
def test_empty_batch_is_selected_like_any_other(monkeypatch, op, case):
    """Regression: T == 0 returned empty outputs before selection, so backend="garbage", a backend
    that cannot serve the call, or a malformed MHC_BACKEND were accepted at T == 0 only."""
    dtype = torch.float32 if case == "cannot serve" else torch.bfloat16
    backend = {"unknown name": "garbage", "cannot serve": "tilelang", "malformed env": None}[case]
    if case == "malformed env":
        monkeypatch.setenv("MHC_BACKEND", f"{op}:triton,{op}:torch")
    outcomes = []
    for T in (3, 0):
        args, kw = checking.make_inputs(op, (T,), 4, 32, dtype, seed=71)
        outcomes.append(_refusal(lambda: checking.call(op, args, kw, backend)))
    want = ValueError if case != "cannot serve" else BackendError
    assert outcomes == [want, want], outcomes


def test_empty_backward_is_selected_like_any_other():
    for T in (3, 0):
        args, _ = checking.make_inputs("post", (T,), 4, 32, torch.bfloat16, seed=72)
        g = torch.randn(T, 4, 32).bfloat16()
        with pytest.raises(ValueError, match="garbage"):
            torch.ops.mhc.post_backward(g, *args, [True] * 4, backend="garbage")


# --- plug-ins that exit, or lack an op --------------------------------------------------------------


def _cpu_record(name, **kw):
    return Backend(name, None, Capabilities(frozenset({"cpu"}), frozenset({torch.bfloat16})), **kw)


def _exit(*a):
    raise SystemExit(3)


@pytest.mark.parametrize("where", ["load", "probe"])
def test_a_plugin_that_calls_sys_exit_becomes_a_reason(where):
    kw = {"load": _exit} if where == "load" else {"load": lambda: reference, "probe": _exit}
    registry.register(_cpu_record("exits", **kw))
    try:
        a, kw_ = _pre_args()
        with pytest.raises(BackendError, match="SystemExit"):
            mhc.pre(*a, **kw_, backend="exits")
        assert "SystemExit" in "; ".join(mhc.explain("pre", *a).reasons["exits"])
    finally:
        registry.unregister("exits")


def test_keyboard_interrupt_is_not_swallowed():
    def interrupted():
        raise KeyboardInterrupt
    registry.register(_cpu_record("ctrlc", load=interrupted))
    try:
        a, kw = _pre_args()
        with pytest.raises(KeyboardInterrupt):
            mhc.pre(*a, **kw, backend="ctrlc")
    finally:
        registry.unregister("ctrlc")


def test_an_entry_point_that_calls_sys_exit_is_broken_not_fatal(tmp_path):
    (tmp_path / "mhc_exits.py").write_text("raise SystemExit(3)\n")
    dist = tmp_path / "mhc_exits-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: mhc-exits\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[mhc.backends]\nexits = mhc_exits:BACKEND\n")
    code = textwrap.dedent("""
        import mhc
        from mhc import registry
        assert 'exits' in mhc.list_backends()
        print('BROKEN:', registry._STATE.broken['exits'])
    """)
    env = {**__import__("os").environ, "PYTHONPATH": f"{tmp_path}:{_repo_root()}"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "BROKEN: entry point 'mhc_exits:BACKEND' failed: SystemExit: 3" in out.stdout


def test_a_plugin_whose_load_lacks_an_op_gives_a_reason(monkeypatch):
    """Regression: getattr(loaded, op) in registry.py raised AttributeError, not BackendError."""
    registry.register(_cpu_record("lacking", load=lambda: types.SimpleNamespace(pre=reference.pre)))
    try:
        a, kw = checking.make_inputs("head", (3,), 4, 32, torch.bfloat16, seed=73)
        with pytest.raises(BackendError, match="lacking.*no callable 'head'"):
            mhc.head(*a, **kw, backend="lacking")
        a_pre, kw_pre = _pre_args()
        mhc.pre(*a_pre, **kw_pre, backend="lacking")  # the op it has still serves
        monkeypatch.setattr(registry, "auto_order", lambda platform, op, T: ("lacking", "torch"))
        registry._STATE.decisions.clear()
        ex = mhc.explain("head", *a)
        assert ex.chosen == "torch" and "no callable 'head'" in ex.reasons["lacking"][0]
        want = reference.head(*a, **kw)
        assert torch.equal(mhc.head(*a, **kw), want)
    finally:
        registry.unregister("lacking")
