"""Each library's private names that mhc uses sit behind one module: torch's in
``mhc.torch_private``, Triton's launcher internals in ``mhc.backends.triton.direct``, TileLang's
adapter internals in ``mhc.backends.tilelang.direct``. A release that none of them lists fails
here, loudly: check the names (each module's docstring says what it relies on) and list it."""

from __future__ import annotations

import importlib.util
import pathlib
import re

import pytest
import torch

from mhc import torch_private

ROOT = pathlib.Path(__file__).resolve().parents[1] / "mhc"


def _release(version: str) -> str:
    return ".".join(version.split("+")[0].split(".")[:2])


def test_torch_release_is_known():
    assert torch_private.release() in torch_private.KNOWN_RELEASES, (
        f"torch {torch.__version__} is not in mhc.torch_private.KNOWN_RELEASES {torch_private.KNOWN_RELEASES}: "
        "check the private names of mhc/torch_private.py against it, then list it")


def test_torch_private_names_resolve():
    for name in torch_private.__all__:
        if name.startswith("cuda_") or name in ("KNOWN_RELEASES", "release"):
            continue
        assert getattr(torch_private, name) is not None, name
    if torch.cuda.is_available():
        assert all(getattr(torch_private, n) is not None for n in torch_private.__all__ if n.startswith("cuda_"))

    class F(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, g):
            return g * 2

    x = torch.ones(2, requires_grad=True)
    torch_private.function_apply(F)(x).sum().backward()
    assert torch.equal(x.grad, torch.full((2,), 2.0))


def test_torch_c_is_named_only_in_its_adapter():
    """No module of the package but ``torch_private`` names ``torch._C``."""
    offenders = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*.py")
                 if p.name != "torch_private.py" and re.search(r"\btorch\._C\b", p.read_text())]
    assert not offenders, offenders


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_triton_release_is_known():
    import triton

    from mhc.backends.triton import direct

    assert _release(triton.__version__) in direct.KNOWN_RELEASES, (
        f"triton {triton.__version__} is not in direct.KNOWN_RELEASES {direct.KNOWN_RELEASES}: run "
        "tests/test_triton_direct.py against it (the points of direct's docstring), then list it")


@pytest.mark.skipif(importlib.util.find_spec("tilelang") is None, reason="tilelang not installed")
def test_tilelang_release_is_known():
    import importlib

    from mhc.backends.tilelang import direct

    for module, tested in direct.TESTED.items():
        got = importlib.import_module(module).__version__
        assert got == tested, (f"{module} {got} is installed; mhc.backends.tilelang.direct was checked against "
                               f"{tested}: run tests/test_tilelang_direct.py against it, then update TESTED")
