"""Installers for the tests' stand-ins of ``aiter`` (not shipped; pyproject packages mhc* only).

- :func:`install_amd_aiter` writes the stand-in of AMD's AITER (``pkg/aiter``: the
  ``aiter.ops.mhc`` API over ``mhc.reference``, with the quirks of the release ``version``) and an
  ``amd_aiter-<version>.dist-info`` (``Name: amd-aiter``) into a folder.
- :func:`install_pypi_aiter` writes an imitation of PyPI's unrelated ``aiter`` 0.13.20191203 (async
  iterators; distribution name ``aiter``), the package that shadows AITER's module name.
- :func:`activate` puts such a folder first on ``sys.path`` and forgets any imported ``aiter``.

Put the folder on ``PYTHONPATH`` to use it in a subprocess instead.
"""

from __future__ import annotations

import importlib
import pathlib
import shutil
import sys

import pytest

PKG = pathlib.Path(__file__).resolve().parent / "pkg"
PYPI_AITER_VERSION = "0.13.20191203"


def _dist_info(root: pathlib.Path, dist: str, version: str) -> None:
    d = root / f"{dist.replace('-', '_')}-{version}.dist-info"
    d.mkdir()
    (d / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (d / "top_level.txt").write_text("aiter\n")


def install_amd_aiter(root: pathlib.Path, version: str, *, with_mhc: bool = True) -> pathlib.Path:
    """The AITER stand-in of release ``version`` in ``root``; ``with_mhc=False`` leaves out
    ``aiter.ops.mhc`` (a release from before mHC, like the ``amd-aiter`` on PyPI)."""
    shutil.copytree(PKG / "aiter", root / "aiter", ignore=shutil.ignore_patterns("__pycache__"))
    if not with_mhc:
        (root / "aiter" / "ops" / "mhc.py").unlink()
    _dist_info(root, "amd-aiter", version)
    return root


def install_pypi_aiter(root: pathlib.Path) -> pathlib.Path:
    """PyPI's ``aiter`` 0.13.20191203 as far as detection can see: a module ``aiter`` with async
    iterator helpers and no ``ops``, and its ``aiter-0.13.20191203.dist-info``."""
    (root / "aiter").mkdir()
    (root / "aiter" / "__init__.py").write_text(
        '"""Imitation of PyPI\'s aiter (async iterators), for tests."""\n\n'
        "async def aiter_from(iterable):\n    for v in iterable:\n        yield v\n")
    _dist_info(root, "aiter", PYPI_AITER_VERSION)
    return root


def forget_aiter() -> None:
    """Drop ``aiter`` and its submodules from ``sys.modules`` (so the next import finds the
    currently installed one)."""
    for name in [m for m in sys.modules if m == "aiter" or m.startswith("aiter.")]:
        del sys.modules[name]
    importlib.invalidate_caches()


def activate(root: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Put ``root`` first on ``sys.path`` for one test (``monkeypatch`` undoes it)."""
    forget_aiter()
    monkeypatch.syspath_prepend(str(root))
