"""``import mhc`` must work whatever state triton, tilelang and aiter are in.

Each case runs in a fresh interpreter, with a folder of stand-in packages first on sys.path.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

ROOT = str(pathlib.Path(__file__).resolve().parent.parent)

_PROBE = textwrap.dedent("""
    import sys, torch, mhc
    from mhc import checking, registry
    a, kw = checking.make_inputs('pre', (2,), 4, 256, torch.bfloat16)
    p, c, li = mhc.pre(*a, **kw)   # auto still serves
    for name in registry.backend_names():
        why = registry.reasons_for(name, registry.Problem('pre', torch.device('cuda', 0), torch.bfloat16, 4, 256, 2))
        print(name, '|', '; '.join(why))
""")


def _run(tmp_path, blocked=(), env_extra=None):
    pre = "".join(f"sys.modules[{m!r}] = None\n" for m in blocked)
    code = "import sys\n" + pre + _PROBE
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}:{ROOT}", **(env_extra or {})}
    env.pop("TRITON_INTERPRET", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return dict(line.split(" | ", 1) for line in out.stdout.splitlines() if " | " in line)


def test_import_with_optional_libraries_absent(tmp_path):
    reasons = _run(tmp_path, blocked=("triton", "tilelang", "aiter"))
    assert reasons["torch"] == ""
    for name in ("triton", "tilelang", "aiter"):
        if name in reasons:
            assert reasons[name], f"{name} claims it can serve with its library blocked"


@pytest.mark.parametrize("lib", ["triton", "tilelang", "aiter"])
def test_import_with_an_optional_library_that_raises(tmp_path, lib):
    pkg = tmp_path / lib
    pkg.mkdir()
    (pkg / "__init__.py").write_text(f"raise RuntimeError('{lib} is broken: CUDA driver mismatch')\n")
    reasons = _run(tmp_path)
    if lib in reasons:
        assert reasons[lib], f"{lib} claims it can serve when its import raises"


def test_import_with_the_unrelated_pypi_aiter(tmp_path):
    # PyPI's `aiter` (async iterators, 0.13.20191203) also installs a module named aiter.
    pkg = tmp_path / "aiter"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("async def aiter_from(x):\n    for v in x:\n        yield v\n")
    dist = tmp_path / "aiter-0.13.20191203.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: aiter\nVersion: 0.13.20191203\n")
    reasons = _run(tmp_path)
    if "aiter" in reasons:
        assert reasons["aiter"], "the PyPI async-iterator package was taken for AMD's AITER"


def test_an_optional_library_that_calls_sys_exit_is_a_reason(tmp_path):
    """Regression: SystemExit got through the import guards: `python -m mhc info` exited 3, and
    backend="triton" and mhc.explain raised SystemExit."""
    pkg = tmp_path / "triton"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise SystemExit(3)\n")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}:{ROOT}", "TRITON_INTERPRET": "1"}
    info = subprocess.run([sys.executable, "-m", "mhc", "info"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert info.returncode == 0, info.stdout + info.stderr
    assert "SystemExit" in info.stdout and "triton" in info.stdout
    code = textwrap.dedent("""
        import torch, mhc
        from mhc import checking
        a, kw = checking.make_inputs('pre', (2,), 4, 32, torch.bfloat16)
        print('EXPLAIN', mhc.explain('pre', *a, backend='triton'))
        try:
            mhc.pre(*a, **kw, backend='triton')
        except mhc.BackendError as e:
            print('RAISED', e)
    """)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "EXPLAIN" in out.stdout and "RAISED mhc backend 'triton' cannot serve" in out.stdout
    assert "SystemExit" in out.stdout
