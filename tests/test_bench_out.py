"""benchmarks/bench.py's --out: a path it cannot write is an argument error before anything runs
(issue 28; it was a traceback, after the run had begun)."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

ROOT = str(pathlib.Path(__file__).resolve().parent.parent)


def _run(args):
    env = {**os.environ, "PYTHONPATH": ROOT}
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=600)


def test_bench_out_that_cannot_be_written_is_an_argument_error(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("")
    for out_dir, words in ((afile, "not a folder"), (afile / "sub", "cannot write there (Not a directory)")):
        out = _run([os.path.join(ROOT, "benchmarks", "bench.py"), "--device", "cpu", "--out", str(out_dir)])
        assert out.returncode == 2, out.stdout + out.stderr
        assert out.stderr.strip().splitlines()[-1] == f"python benchmarks/bench.py: error: --out {out_dir}: {words}"
        assert out.stdout == "" and "Traceback" not in out.stderr
