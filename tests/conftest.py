"""Shared test setup.

- The Triton interpreter is switched on before anything defines a kernel, so that the Triton
  backend serves CPU tensors here (on a GPU machine it stays off).
- Hypothesis profiles ``ci`` (derandomized, the CI default), ``dev`` and ``deep``, chosen with
  ``MHC_HYPOTHESIS_PROFILE``.
- Every output a backend allocates through ``mhc.backends.empty`` is filled with NaN first
  (``mhc.checking.nan_empty``, what the GPU suite and the benchmarks use too), so an
  element a kernel forgets to write fails the comparison instead of passing as stale memory.
- Every test starts with no launch plan cached (``mhc.plans.PLANS``): tests monkeypatch the
  launch heuristics that plans are built from, and a plan of an earlier test must not stand in
  for them. A test that exercises the cache makes its own calls.
- ``backend`` fixtures are parametrized over every registered backend; one that cannot serve on
  this machine is skipped with its reasons (shown by ``-ra``), never reported as passing.
- Tests marked ``slow`` (long AOT builds and sweeps) are deselected by the default ``-m 'not
  slow'`` (pyproject.toml); the summary says how many and how to run them.
"""

from __future__ import annotations

import os
import tempfile

import pytest
import torch

_HAS_GPU = torch.cuda.is_available()
if not _HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TILELANG_CACHE_DIR", os.path.join(tempfile.gettempdir(), "mhc-tilelang-cache"))

from hypothesis import HealthCheck, settings  # noqa: E402

import mhc  # noqa: E402
import mhc.backends  # noqa: E402
import mhc.plans  # noqa: E402
from mhc import registry  # noqa: E402
from mhc.checking import nan_empty  # noqa: E402

_common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.register_profile("ci", max_examples=12, derandomize=True, print_blob=True, **_common)
settings.register_profile("dev", max_examples=25, **_common)
settings.register_profile("deep", max_examples=400, **_common)
settings.load_profile(os.environ.get("MHC_HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))

DEVICE = torch.device("cuda") if _HAS_GPU else torch.device("cpu")


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    monkeypatch.setattr(mhc.backends, "_ALLOCATOR", nan_empty)


@pytest.fixture(autouse=True)
def fresh_plans():
    mhc.plans.PLANS.clear()


def backend_reasons(name: str, op: str = "pre", dtype=torch.bfloat16, n: int = 4, H: int = 256, T: int = 8):
    """Why backend ``name`` cannot serve a typical call on this machine's test device."""
    try:
        return registry.reasons_for(name, registry.Problem(op, DEVICE, dtype, n, H, T))
    except registry.BackendError as e:
        return [str(e)]


def pytest_generate_tests(metafunc):
    if "backend" in metafunc.fixturenames:
        params = []
        for name in registry.backend_names():
            why = backend_reasons(name)
            marks = [pytest.mark.skip(reason=f"backend {name} cannot serve on {DEVICE}: " + "; ".join(why))] if why else []
            params.append(pytest.param(name, marks=marks, id=name))
        metafunc.parametrize("backend", params)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    deselected = terminalreporter.stats.get("deselected", [])
    slow = sum(1 for item in deselected if item.get_closest_marker("slow") is not None)
    if slow and "slow" not in (config.option.markexpr or "").replace("not slow", ""):
        terminalreporter.write_line(f"{slow} slow test(s) deselected (long AOT builds and sweeps): "
                                    "`python -m pytest -m slow` runs them")
