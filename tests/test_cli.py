"""``python -m mhc`` (the README's main job) and its subcommands."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

ROOT = str(pathlib.Path(__file__).resolve().parent.parent)


def _mhc(*args, env_extra=None):
    env = {**os.environ, "PYTHONPATH": ROOT, **(env_extra or {})}
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, "-m", "mhc", *args], env=env, capture_output=True, text=True,
                          timeout=600)


def test_main_job_reports_backends_and_agrees_with_reference():
    out = _mhc("--H", "256", "--T", "8", "--reps", "2")
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout
    assert "torch     serves pre, post, head, fused_post_pre" in text
    row = next(line for line in text.splitlines() if line.startswith("torch "))
    assert row.count(" ok ") == 4 and "FAIL" not in row
    for name in ("triton", "tilelang", "aiter"):
        assert f"  {name}" in text


def test_info_explains_each_backend_that_cannot_serve():
    out = _mhc("info")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    for line in lines:
        if "cannot serve" in line:
            i = lines.index(line)
            assert lines[i + 1].startswith("      "), f"no reason after {line!r}"


def test_check_fails_loudly_when_a_backend_disagrees(tmp_path):
    plugin = tmp_path / "wrongmhc.py"
    plugin.write_text(
        "import torch\nfrom mhc import reference\nfrom mhc.registry import Backend, Capabilities\n"
        "class W:\n"
        "    pre = staticmethod(reference.pre)\n    head = staticmethod(reference.head)\n"
        "    fused_post_pre = staticmethod(reference.fused_post_pre)\n"
        "    @staticmethod\n    def post(x, r, p, c):\n        return reference.post(x, r, p, c) * 1.5\n"
        "BACKEND = Backend('wrong', None, Capabilities(frozenset({'cpu'}), frozenset({torch.bfloat16})), load=W)\n")
    dist = tmp_path / "wrongmhc-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: wrongmhc\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[mhc.backends]\nwrong = wrongmhc:BACKEND\n")
    env = {"PYTHONPATH": f"{tmp_path}:{ROOT}"}
    # --device cpu: the plug-in serves CPU tensors only, and a GPU machine's default device is cuda.
    out = _mhc("check", "--backend", "wrong", "--device", "cpu", "--H", "64", "--T", "4", "--reps", "1",
               env_extra=env)
    assert out.returncode == 1
    assert "DISAGREES WITH THE REFERENCE" in out.stdout and "wrong.post" in out.stdout


def test_unknown_aot_backend_is_an_argument_error():
    out = _mhc("aot", "--backend", "nosuch", "--arch", "sm90")
    assert out.returncode == 2 and "invalid choice" in out.stderr
