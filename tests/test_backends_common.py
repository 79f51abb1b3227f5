"""The helpers every backend uses (``mhc.backends.empty`` / ``device_guard``) with the real
allocator, after the registry has imported the backend records.

Regression: importing the submodule ``mhc.backends.torch`` sets the package attribute ``torch``,
which shadowed ``import torch`` inside ``mhc/backends/__init__.py``; the tests' NaN allocator hid
it, because it replaces the function that broke.
"""

from __future__ import annotations

import torch

import mhc.backends
from mhc import registry


def test_empty_and_device_guard_work_after_the_records_are_imported(monkeypatch):
    registry.backend_names()  # imports every record, mhc.backends.torch included
    monkeypatch.setattr(mhc.backends, "_ALLOCATOR", mhc.backends._plain_empty)
    t = mhc.backends.empty((2, 3), torch.bfloat16, torch.device("cpu"))
    assert t.shape == (2, 3) and t.dtype == torch.bfloat16 and t.device.type == "cpu"
    with mhc.backends.device_guard(torch.device("cpu")):
        pass
    if torch.cuda.is_available():
        dev = torch.device("cuda", torch.cuda.device_count() - 1)
        with mhc.backends.device_guard(dev):
            assert torch.cuda.current_device() == dev.index
