"""Host µs of the TileLang launchers with the compiled function stood in for: the real kernels
(compiled for sm_90a, or loaded from ``TILELANG_CACHE_DIR``, as ``python -m mhc aot`` does), the
real launchers and TileLang's real per-call Python, but the compiled host function (the one that
converts the tensors through DLPack, checks them and launches) replaced by a no-op. Runs on a CPU
machine with CPU tensors, so it compares launch paths where no GPU is at hand:

    python benchmarks/tilelang_host_standin.py [--T 1] [--H 4096]

What it leaves out: the compiled function itself (DLPack conversion of each tensor, the argument
checks, the stream query and cuLaunchKernel: a few µs on a GPU machine) and, for CPU tensors,
the CUDA caching allocator (``empty`` and the workspace pool take CPU tensors here).
"""

from __future__ import annotations

import argparse

import torch

from mhc import checking
from mhc.timing import host_us


class StandInModule:
    """What TileLang's adapter calls, ``module(*args)`` -> ``module.main(*args)`` (as
    ``tvm_ffi.Module.__call__`` does), with a ``main`` that does nothing."""

    def __init__(self) -> None:
        self.main = lambda *args: None

    def __call__(self, *args):
        return self.main(*args)


def standin_launchers(H: int, n: int = 4):
    """The launch module with every kernel of (n, H) compiled for sm_90a and stood in for."""
    from mhc.backends.tilelang import launch

    launch.target_for = lambda dev: {"kind": "cuda", "arch": "sm_90a"}
    launch.KERNELS.num_sms[torch.device("cpu")] = 132
    for op in ("post", "pre", "head", "fused"):
        k, _ = launch.get_kernel(op, n, H, "bfloat16", {"kind": "cuda", "arch": "sm_90a"}, 132)
        k.adapter.executable = StandInModule()
    return launch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--T", type=int, default=1)
    ap.add_argument("--H", type=int, default=4096)
    ap.add_argument("--calls", type=int, default=5000)
    args = ap.parse_args(argv)
    launch = standin_launchers(args.H)
    dev = torch.device("cpu")
    for op in ("post", "pre", "head", "fused_post_pre"):
        inputs, kw = checking.make_inputs(op, (args.T,), 4, args.H, torch.bfloat16, dev)
        f = getattr(launch, op)
        vals = list(kw.values())
        us = host_us(lambda: f(*inputs, *vals), calls=args.calls)
        print(f"{op:15s} T={args.T} H={args.H}: {us:6.2f} us per call (host, compiled function stood in for)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
