"""The benchmark harness (``benchmarks/bench.py``, outside the package) on CPU with tiny sizes, so
that CI exercises its code, and what it takes from the package: the floor formulas
(``mhc.timing``), the device inputs and row sampling (``mhc.checking``), the check against the
oracle (and that a wrong backend is marked loudly), the CSV, the markdown table and the report
rebuild."""

from __future__ import annotations

import csv
import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from mhc import checking, registry, timing

ROOT = pathlib.Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks" / "bench.py"


def _load_bench():
    spec = importlib.util.spec_from_file_location("mhc_benchmarks_bench", BENCH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


bench = _load_bench()


def test_floor_bytes_count_each_input_once_and_each_output_once():
    T, n, H = 4096, 4, 4096
    m = 2 * n + n * n
    act = T * n * H * 2
    assert timing.floor_bytes("post", T, n, H) == T * H * 2 + act + T * n * 4 + T * n * n * 4 + act
    pre = act + m * n * H * 4 + 3 * 4 + m * 4 + T * n * 4 + T * n * n * 4 + T * H * 2
    assert timing.floor_bytes("pre", T, n, H) == pre
    assert timing.floor_bytes("head", T, n, H) == act + n * n * H * 4 + 4 + n * 4 + T * H * 2
    # fused: post's inputs + pre's parameters, the new residual written once and never re-read.
    assert timing.floor_bytes("fused_post_pre", T, n, H) == (timing.floor_bytes("post", T, n, H)
                                                            + timing.floor_bytes("pre", T, n, H) - act)
    # The figure: post at T=4096, H=4096 is ~100 µs at 3.0 TB/s.
    assert 99 < timing.floor_bytes("post", T, n, H) / 3.0e12 * 1e6 < 102
    with pytest.raises(ValueError, match="unknown op"):
        timing.floor_bytes("nope", 1, 4, 64)


def test_eager_us_times_every_call_and_keeps_no_callable():
    """eager_us measures on every call: a callable timed twice, slower the second time, gives two
    different figures (an eager_us memoised by its callable returned the first figure again, and
    kept every timed closure, with the inputs it holds, alive for good)."""
    import gc
    import time
    import weakref

    cpu = torch.device("cpu")
    state = {"sleep": 0.0}

    class Call:
        def __call__(self):
            if state["sleep"]:
                time.sleep(state["sleep"])

    call = Call()
    fast = timing.eager_us(call, cpu, calls=20, rounds=3, warmup_s=0.0)
    state["sleep"] = 0.002
    slow = timing.eager_us(call, cpu, calls=20, rounds=3, warmup_s=0.0)
    assert fast < 1000 < slow  # µs per call: the second measures the 2 ms sleep
    ref = weakref.ref(call)
    del call
    gc.collect()
    assert ref() is None


@pytest.mark.parametrize("op", registry.OPS)
def test_device_inputs_have_the_ops_shapes_and_no_zeros(op):
    args, kwargs = checking.device_inputs(op, 5, 4, 64, "cpu", seed=3)
    ref_args, ref_kwargs = checking.make_inputs(op, (5,), 4, 64)
    assert kwargs == ref_kwargs
    assert [(a.shape, a.dtype) for a in args] == [(a.shape, a.dtype) for a in ref_args]
    assert all(bool((a != 0).any()) for a in args)
    outs = checking.call(op, args, kwargs, "torch")
    assert all(bool(torch.isfinite(o).all()) for o in outs)


def test_sample_rows_cover_the_ends_and_stay_in_range():
    assert checking.sample_rows(10, "cpu").tolist() == list(range(10))
    rows = checking.sample_rows(5000, "cpu", k=64)
    assert len(rows) == 64 == len(set(rows.tolist()))
    assert rows[:8].tolist() == list(range(8)) and rows[-8:].tolist() == list(range(4992, 5000))
    assert bool((rows[1:] > rows[:-1]).all())


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_smoke_run_on_cpu_writes_checked_rows_and_a_table(tmp_path, capsys):
    """The harness end to end on CPU: an mhc backend through the op layer (torch; the GPU
    backends' own tests cover them), eager, and the compile peer (aot_eager here: inductor's C++
    build is too slow for CI), and tile-kernels, which cannot run here and must say why."""
    impls = "torch,eager,compile,tile-kernels"
    rc = bench.main(["--device", "cpu", "--impls", impls, "--compile-backend", "aot_eager", "--T", "1,6",
                     "--H", "64", "--out", str(tmp_path), "--prefix", "smoke"])
    out = capsys.readouterr().out
    assert rc == 0, out
    rows = _rows(tmp_path / "smoke.csv")
    ran = {r["impl"] for r in rows}
    assert ran == {"torch", "eager", "compile"}
    # A peer that cannot run here is never skipped silently: the reason is printed.
    assert "skip tile-kernels" in out and "runs on NVIDIA GPUs only" in out
    assert len(rows) == len(ran) * 2 * len(registry.OPS)
    for r in rows:
        assert r["check"] == "ok", r
        assert float(r["warm_us"]) > 0
        # No floor, GB/s or ratio on CPU: the floor is a GPU's memory bound.
        assert r["floor_us"] == r["warm_GBps"] == r["warm_ratio"] == r["cold_ratio"] == ""
        assert int(r["floor_bytes"]) == timing.floor_bytes(r["op"], int(r["T"]), 4, 64)
    assert "GB/s" not in "".join(line for line in out.splitlines() if " warm " in line)
    assert " floor " not in "".join(line for line in out.splitlines() if " warm " in line)
    assert "[1/" in out  # progress: a step count before each row
    md = (tmp_path / "smoke.md").read_text()
    assert "**pre**" in md and "| 64 | 6 | — |" in md


def test_results_go_to_out_or_to_a_folder_of_the_current_directory(tmp_path):
    """Without ``--out``, results go to ``./mhc-bench`` of the current directory (git-ignored
    here), never into the package's own tree; with ``--out``, exactly there."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("TRITON_INTERPRET", None)
    args = [sys.executable, str(BENCH), "--device", "cpu", "--impls", "eager", "--ops", "post", "--T", "2",
            "--H", "64", "--no-cold"]
    before = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True,
                            text=True).stdout
    proc = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / bench.DEFAULT_OUT / "cpu-quick.csv").exists()
    after = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True,
                           text=True).stdout
    assert after == before
    proc = subprocess.run(args + ["--out", str(tmp_path / "mine")], cwd=tmp_path, env=env, capture_output=True,
                          text=True)
    assert proc.returncode == 0 and (tmp_path / "mine" / "cpu-quick.csv").exists()
    assert bench.DEFAULT_OUT + "/" in (ROOT / ".gitignore").read_text().splitlines()


def test_eager_run_on_cpu_records_eager_times_and_the_host_yardstick(tmp_path, capsys):
    """``--eager``: every row gets its eager µs, the mhc backends and the eager peer also with
    inputs requiring grad, and each row the host yardstick timed before it; the table shows the
    eager section and the yardstick's range."""
    rc = bench.main(["--device", "cpu", "--impls", "torch,eager", "--ops", "post", "--T", "2", "--H", "64",
                     "--no-cold", "--eager", "--out", str(tmp_path), "--prefix", "eager"])
    out = capsys.readouterr().out
    assert rc == 0, out
    rows = _rows(tmp_path / "eager.csv")
    assert {r["impl"] for r in rows} == {"torch", "eager"}
    for r in rows:
        assert float(r["eager_us"]) > 0 and float(r["eager_grad_us"]) > 0, r
        assert 0 < float(r["host_yardstick_us"]) < 1e4, r
    md = (tmp_path / "eager.md").read_text()
    assert "**Eager µs per call**" in md and "| post | 64 | 2 |" in md
    assert "Host yardstick" in md


def test_a_wrong_backend_is_marked_loudly(tmp_path, capsys):
    """A backend whose post is off by a little fails the check: ``!!`` in its row, a summary of
    failures at the end, ``FAIL``-free CSV check column, and exit status 1."""
    from mhc import reference

    def wrong_post(x, residual, post_mix, comb_mix):
        return (reference.post(x, residual, post_mix, comb_mix).float() * 1.05).to(residual.dtype)

    fake = type("Wrong", (), {"post": staticmethod(wrong_post), "pre": None, "head": None, "fused_post_pre": None})
    rec = registry.Backend("wrongpost", None,
                           registry.Capabilities(frozenset({"cpu"}), frozenset({torch.bfloat16}),
                                                 ops=frozenset({"post"})), load=lambda: fake)
    registry.register(rec, replace=True)
    try:
        rc = bench.main(["--device", "cpu", "--impls", "wrongpost,eager", "--ops", "post,pre", "--T", "3",
                         "--H", "64", "--no-cold", "--out", str(tmp_path), "--prefix", "wrong"])
    finally:
        registry.unregister("wrongpost")
    out = capsys.readouterr().out
    assert rc == 1
    assert "!! FAIL" in out and "CHECK FAILURES" in out and "post wrongpost H=64 T=3" in out
    assert "skip wrongpost pre: cannot run: does not implement pre" in out
    rows = {r["impl"]: r for r in _rows(tmp_path / "wrong.csv") if r["op"] == "post"}
    assert rows["wrongpost"]["check"].startswith("out ") and rows["eager"]["check"] == "ok"
    assert "!!FAIL" in (tmp_path / "wrong.md").read_text()


def test_report_rebuilds_the_table_from_a_csv(tmp_path, capsys):
    assert bench.main(["--device", "cpu", "--impls", "eager", "--ops", "head", "--T", "2", "--H", "64",
                       "--no-cold", "--out", str(tmp_path), "--prefix", "r"]) == 0
    (tmp_path / "r.md").unlink()
    assert bench.main(["--report", str(tmp_path / "r.csv")]) == 0
    assert "**head**" in (tmp_path / "r.md").read_text()
    assert "head" in capsys.readouterr().out


def test_python_m_mhc_bench_says_where_the_harness_is():
    """The harness left the installed package: ``python -m mhc bench`` is a usage error (exit 2)
    that names the script to run instead."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-m", "mhc", "bench", "--quick"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2
    assert "python benchmarks/bench.py" in proc.stderr


def test_timing_path_runs_backends_with_the_plain_allocator(tmp_path, capsys, monkeypatch):
    """Timed calls run unpoisoned: a backend that allocates through ``mhc.backends.empty`` must
    work there too, after the registry has imported every built-in record (``mhc.backends.torch``
    among them, whose import once shadowed ``torch`` inside ``mhc.backends``)."""
    import mhc.backends
    from mhc import reference

    monkeypatch.setattr(mhc.backends, "_ALLOCATOR", mhc.backends._plain_empty)  # undo conftest's poison

    def post(x, residual, post_mix, comb_mix):
        out = mhc.backends.empty(residual.shape, residual.dtype, residual.device)
        return out.copy_(reference.post(x, residual, post_mix, comb_mix))

    fake = type("Plain", (), {"post": staticmethod(post), "pre": None, "head": None, "fused_post_pre": None})
    registry.register(registry.Backend("plainalloc", None,
                                       registry.Capabilities(frozenset({"cpu"}), frozenset({torch.bfloat16}),
                                                             ops=frozenset({"post"})), load=lambda: fake),
                      replace=True)
    try:
        registry.backend_names()  # every built-in record imported
        rc = bench.main(["--device", "cpu", "--impls", "plainalloc", "--ops", "post", "--T", "2", "--H", "64",
                         "--out", str(tmp_path), "--prefix", "plain"])
    finally:
        registry.unregister("plainalloc")
    out = capsys.readouterr().out
    assert rc == 0, out
    row = _rows(tmp_path / "plain.csv")[0]
    assert row["check"] == "ok" and float(row["warm_us"]) > 0 and float(row["cold_us"]) > 0
