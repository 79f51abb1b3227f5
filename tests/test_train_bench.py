"""The training benchmark (``benchmarks/train_bench.py``, outside the package) on CPU with tiny
sizes: the backward floor it rates against (:func:`mhc.timing.backward_floor_bytes`), its CSV,
that its check catches a wrong gradient, that a failing implementation leaves the rest of the
table standing, the smaller-T check, and (where Liger-Kernel is installed) that its mapping of
Liger's mHC functions onto mhc's ops computes mhc's ops."""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from mhc import checking, reference, registry, timing

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "train_bench.py"


def _load():
    spec = importlib.util.spec_from_file_location("mhc_benchmarks_train_bench", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


tb = _load()


def test_backward_floor_bytes_hand_count():
    """T = 3, n = 2, H = 5 (m = 8 mix columns), bf16 activations (2 bytes), fp32 mixes (4), the
    terms counted by hand from the issue's list."""
    # pre: residual 60 + grad_residual 60 + grad_layer_input 30 + grad_post_mix 24 + grad_comb_mix 48
    # + fn 320 + grad_fn 320 + hc_scale 12 + its grad 12 + hc_base 32 + its grad 32
    assert timing.backward_floor_bytes("pre", 3, 2, 5) == 950
    # head: residual 60 + grad_residual 60 + grad_out 30 + fn (2, 10) 80 + grad_fn 80 + hc_scale 4 + 4 + hc_base 8 + 8
    assert timing.backward_floor_bytes("head", 3, 2, 5) == 334
    # post: reads grad_out 60, x 30, residual 60, post_mix 24, comb_mix 48; writes grad_x 30,
    # grad_residual 60, grad_post_mix 24, grad_comb_mix 48
    assert timing.backward_floor_bytes("post", 3, 2, 5) == 384
    # fused: reads grad_new 60, grad_layer_input 30, grad_post_mix 24, grad_comb_mix 48, saved new
    # residual 60, x 30, old residual 60, post_mix 24, comb_mix 48, fn 320, hc_scale 12, hc_base 32
    # (748); writes grad_x 30, grad_residual 60, grad_post_mix 24, grad_comb_mix 48, grad_fn 320,
    # grad_hc_scale 12, grad_hc_base 32 (526)
    assert timing.backward_floor_bytes("fused_post_pre", 3, 2, 5) == 1274
    assert timing.backward_floor_bytes("post", 3, 2, 5, act_bytes=4) == 384 + (60 + 30 + 60 + 30 + 60)
    with pytest.raises(ValueError, match="unknown op"):
        timing.backward_floor_bytes("nope", 1, 4, 64)


@pytest.mark.parametrize("op", registry.OPS)
def test_backward_floor_bytes_counts_the_real_tensors(op):
    """The floor equals the bytes of the real tensors at DeepSeek-V4's n = 4: every input read and
    its gradient written, every output's gradient read, and for fused_post_pre the saved new
    residual read back."""
    T, n, H = 7, 4, 32
    args, kwargs = checking.make_inputs(op, (T,), n, H, torch.bfloat16)
    grads = tb.upstream_grads(op, T, n, H, torch.bfloat16, "cpu", seed=0)
    assert [(g.shape, g.dtype) for g in grads] == [(o.shape, o.dtype) for o in _outputs(op, args, kwargs)]
    want = 2 * sum(a.nbytes for a in args) + sum(g.nbytes for g in grads)
    if op == "fused_post_pre":
        want += grads[0].nbytes  # the saved new residual, the size of its gradient
    assert timing.backward_floor_bytes(op, T, n, H) == want


def test_cpu_run_writes_the_csv(tmp_path):
    """The script end to end on CPU: every row checked and timed, Liger's rows present with a
    reason where it cannot run, the CSV's columns exactly the documented ones."""
    out = tmp_path / "train.csv"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--impls",
                           "mhc/torch,eager,compile,liger", "--compile-backend", "aot_eager", "--liger-phi", "float32",
                           "--out", str(out)], capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out, newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == tb.CSV_FIELDS
        rows = list(reader)
    assert [(r["op"], r["impl"]) for r in rows] == [(op, i) for op in registry.OPS
                                                    for i in ("mhc/torch", "eager", "compile", "liger")]
    for r in rows:
        assert (r["n"], r["H"], r["T"]) == ("4", "64", "8")
        assert float(r["bwd_floor_us"]) > 0
        if r["impl"] == "liger" and r["check"].startswith("unavailable: "):
            assert len(r["check"]) > len("unavailable: ") and r["bwd_us"] == ""  # the reason, not a blank
            continue
        assert r["check"] == "ok", r
        fwd, bwd, step = float(r["fwd_us"]), float(r["bwd_us"]), float(r["step_us"])
        assert fwd > 0 and bwd > 0 and step > 0
        assert float(r["bwd_ratio"]) == pytest.approx(bwd / float(r["bwd_floor_us"]), rel=1e-3)
    md = (tmp_path / "train.md").read_text()
    assert md.strip() in proc.stdout  # the table is printed last
    assert all(f"**{op}**" in md for op in registry.OPS)


def _variant(impl, name, **changes):
    return dataclasses.replace(impl, name=name, **changes)


def test_failures_are_rows_and_the_check_sees_a_wrong_gradient(tmp_path):
    """An implementation that raises and one whose gradient is wrong each give a FAIL row; the
    rows after them are still checked and timed."""
    eager = tb.eager_impl()

    def raising(op, args, kwargs):
        raise RuntimeError("boom")

    def wrong_grad(op, args, kwargs):
        case = eager.prepare(op, args, kwargs)
        return dataclasses.replace(case, to_ours=lambda g: (g[0] * 1.5, *g[1:]))  # grad of x off by half

    impls = [_variant(eager, "raises", prepare=raising), _variant(eager, "wrong", prepare=wrong_grad), eager]
    rows = tb.run(["post"], impls, [8], [64], 4, torch.device("cpu"), tmp_path / "t.csv", rep_ms=1, seed=0,
                  check_max_t=1 << 20, check_t=4, copy_bytes=1 << 16, log=lambda m: None)
    by = {r["impl"]: r for r in rows}
    assert by["raises"]["check"] == "FAIL raised RuntimeError: boom" and by["raises"]["bwd_us"] == ""
    assert by["wrong"]["check"].startswith("FAIL grad x ") and "grad residual" not in by["wrong"]["check"]
    assert float(by["wrong"]["bwd_us"]) > 0  # a wrong answer is still timed, and marked
    assert by["eager"]["check"] == "ok" and float(by["eager"]["step_us"]) > 0
    assert "Failed checks:" in tb.table(rows)


def test_check_at_a_smaller_T_says_so(tmp_path):
    rows = tb.run(["head"], [tb.eager_impl()], [8], [64], 4, torch.device("cpu"), tmp_path / "t.csv", rep_ms=1,
                  seed=0, check_max_t=4, check_t=4, copy_bytes=1 << 16, log=lambda m: None)
    assert rows[0]["check"] == "ok@T=4"


def _outputs(op, args, kwargs):
    out = getattr(reference, op)(*args, **kwargs)
    return out if isinstance(out, tuple) else (out,)


@pytest.mark.parametrize("op", registry.OPS)
def test_upstream_grads_match_the_outputs(op):
    args, kwargs = checking.make_inputs(op, (5,), 4, 16, torch.bfloat16)
    outs = _outputs(op, args, kwargs)
    grads = tb.upstream_grads(op, 5, 4, 16, torch.bfloat16, "cpu", seed=1)
    assert [(g.shape, g.dtype) for g in grads] == [(o.shape, o.dtype) for o in outs]
    assert all(bool(torch.isfinite(g.float()).all()) and g.float().std() > 0.5 for g in grads)


@pytest.mark.parametrize("op", registry.OPS)
def test_liger_mapping_computes_mhc_ops(op):
    """Liger's functions as the script maps them (h_res transposed into post, phi = fn.T, padded
    for head, alphas from hc_scale) give mhc's outputs and gradients within the tolerances. Run
    under Triton's interpreter with phi in fp32: the interpreter mishandles bf16 dots, so Liger's
    default bf16 phi is checked on the GPU run only."""
    pytest.importorskip("liger_kernel")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Liger's Triton kernels need a GPU or TRITON_INTERPRET=1")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    impl = tb.liger_impl(torch.float32)
    assert impl.reasons(op, device, torch.bfloat16, 4, 64, 8) == []
    args, kwargs = checking.device_inputs(op, 8, 4, 64, device, seed=3)
    assert tb.check(impl, op, args, kwargs, tb.upstream_grads(op, 8, 4, 64, torch.bfloat16, device, 3)) == "ok"
