"""The torch backend: the reference math (``mhc.reference``) on any device and float dtype.

It is the fallback wherever nothing faster can serve, and the only backend for fp32/fp64 (which
gradcheck needs). It is not fast: eager PyTorch moves the residual several times.
"""

from __future__ import annotations

import torch

from mhc.registry import Backend, Capabilities


def _load():
    from mhc import reference

    return reference


BACKEND = Backend(
    name="torch",
    distribution="torch",
    capabilities=Capabilities(
        device_types=frozenset({"cpu", "cuda", "mps", "xpu", "meta"}),
        dtypes=frozenset({torch.bfloat16, torch.float16, torch.float32, torch.float64}),
    ),
    load=_load,
    description="PyTorch reference math; every device, every float dtype",
)
