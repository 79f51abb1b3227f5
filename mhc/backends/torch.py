"""The torch backend: the reference math (``mhc.reference``) on any device and float dtype.

It is the fallback wherever nothing faster can serve, and the only backend for fp32/fp64 (which
gradcheck needs). It is not fast: eager PyTorch moves the residual several times.
"""

from __future__ import annotations

import torch

from mhc.registry import BACKWARD_OPS, OPS, Backend, Capabilities


def _no_views(f):
    """``f`` whose outputs are tensors of their own: the reference restores leading dims with
    ``view``, and an op's output that is a view is refused an in-place update by autograd, as
    no other backend's is (DESIGN.md: outputs are not views). ``detach()`` drops the view
    relation without a copy; the op layer calls backends below autograd, so no history is lost."""
    def run(*args):
        out = f(*args)
        if isinstance(out, tuple):
            return tuple(t.detach() if t._is_view() else t for t in out)
        return out.detach() if out._is_view() else out

    return run


def _load():
    import types

    from mhc import backward, reference

    # The forward ops from the reference, the backward ops (mhc.autograd calls them) from the
    # hand-derived backward math.
    return types.SimpleNamespace(**{op: _no_views(getattr(reference, op)) for op in OPS},
                                 **{op: getattr(backward, op) for op in BACKWARD_OPS})


BACKEND = Backend(
    name="torch",
    distribution="torch",
    capabilities=Capabilities(
        device_types=frozenset({"cpu", "cuda", "mps", "xpu", "meta"}),
        dtypes=frozenset({torch.bfloat16, torch.float16, torch.float32, torch.float64}),
        ops=frozenset(OPS + BACKWARD_OPS),
        # Its backward ops are torch ops, which record history under create_graph=True (through
        # PyTorch's autograd fallback for ops without an autograd kernel, which warns).
        double_backward=True,
        norm_ops=frozenset({"pre", "fused_post_pre", "pre_backward", "fused_post_pre_backward"}),
    ),
    load=_load,
)
