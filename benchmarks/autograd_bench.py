"""Backward timing of pre, post and head: mhc's backward ops (torch backend and the Triton
kernels) against autograd of the plain reference, eager and torch.compile'd.

Run on a GPU (not run in CI):  python benchmarks/autograd_bench.py [--T 1024 4096 16384] [--H 4096]
Prints one line per (op, T, H, implementation): median microseconds of the backward alone, the
achieved GB/s (floor bytes over that time) and the ratio to the floor (the
forward and graph are built once; ``torch.autograd.grad`` with ``retain_graph`` is timed), and
the floor: the bytes backward must move (listed per op below) over the device's bandwidth
(the copy bandwidth measured at the start of the same run by ``bench.copy_bandwidth``, the harness beside this script). tile-kernels' backward kernels (``mhc_post_bwd``,
``mhc_pre_apply_mix_bwd``, ``mhc_sinkhorn_bwd``) are not wired in: they cover pieces of the
backward, not the ops; add them here once installed on the benchmark machine.
"""

from __future__ import annotations

import argparse

import torch

import mhc
from bench import copy_bandwidth  # benchmarks/bench.py, the one harness (this script's folder is on sys.path)
from mhc import checking, reference, timing


def _floor_bytes(op: str, T: int, n: int, H: int) -> int:
    """Bytes backward must move at minimum (bf16 activations, fp32 fn): pre/head read the residual
    twice (mixes are recomputed), the upstream gradient, fn, and write grad_residual and grad_fn;
    post reads grad_out, x, residual and writes grad_x and grad_residual."""
    act = 2
    m = 2 * n + n * n if op == "pre" else n
    if op == "post":
        return act * T * (n * H + H + n * H + H + n * H)
    return act * T * (2 * n * H + H + n * H) + 4 * 2 * m * n * H


def _case(op: str, T: int, n: int, H: int, impl: str):
    # Drawn on the GPU (make_inputs draws fp64 on the CPU: minutes at T=16384).
    args, kw = checking.device_inputs(op, T, n, H, torch.device("cuda"), seed=0)
    ins = [a.detach().clone().requires_grad_() for a in args]
    if impl.startswith("mhc"):
        bwd = impl.split("/")[1]
        with mhc.use_backend(**{f"{op}_backward": bwd}):
            out = getattr(mhc, op)(*ins, **kw)
    elif impl == "reference/eager":
        out = getattr(reference, op)(*ins, **kw)
    else:
        out = torch.compile(getattr(reference, op))(*ins, **kw)
    outs = out if isinstance(out, tuple) else (out,)
    grads = [torch.randn_like(o) for o in outs]
    return lambda: torch.autograd.grad(outs, ins, grads, retain_graph=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--T", type=int, nargs="+", default=[1, 64, 4096, 16384])
    ap.add_argument("--H", type=int, nargs="+", default=[4096, 7168])
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--ops", nargs="+", default=["pre", "post", "head"])
    a = ap.parse_args()
    # The timed closure calls torch.autograd.grad(retain_graph=True) repeatedly, which compiled
    # backward graphs refuse while they donate their buffers.
    import torch._functorch.config

    torch._functorch.config.donated_buffer = False
    gbps, how = copy_bandwidth(torch.device("cuda"), 1 << 30, 100)
    print(f"copy bandwidth {gbps:.0f} GB/s ({how})")
    print(f"{'op':5s} {'T':>6s} {'H':>5s} {'impl':18s} {'us':>9s} {'GB/s':>7s} {'floor us':>9s} {'x floor':>8s}")
    for op in a.ops:
        for H in a.H:
            for T in a.T:
                nbytes = _floor_bytes(op, T, a.n, H)
                floor = nbytes / (gbps * 1e3)
                for impl in ("mhc/triton", "mhc/torch", "reference/eager", "reference/compile"):
                    try:
                        us = timing.time_cold(_case(op, T, a.n, H, impl), torch.device("cuda"), 50)
                    except Exception as e:  # one failing implementation must not end the table
                        print(f"{op:5s} {T:6d} {H:5d} {impl:18s} failed: {type(e).__name__}: {e}")
                        continue
                    print(f"{op:5s} {T:6d} {H:5d} {impl:18s} {us:9.1f} {nbytes / us / 1e3:7.0f} {floor:9.1f} "
                          f"{us / floor:8.2f}")


if __name__ == "__main__":
    main()
