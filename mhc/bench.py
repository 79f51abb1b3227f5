"""Benchmarks reachable as ``python -m mhc bench``.

``--overhead``: host-side cost of one op call, for the dispatch layers that sit above a kernel
(torch.library dispatch, validation, backend selection), measured with a backend whose kernels
return a preallocated tensor, next to ``torch.library.custom_op`` doing the same. This is the
number that matters at decode sizes, where the kernels themselves take a few µs.
"""

from __future__ import annotations

import argparse
import time
import types

import torch


def _best_us(fn, n: int = 2000, rounds: int = 7) -> float:
    for _ in range(200):
        fn()
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t) / n * 1e6)
    return best


def overhead() -> dict[str, float]:
    """Host µs per call (best of 7 rounds of 2000) of each dispatch layer, on CPU tensors."""
    import mhc
    from mhc import checking, registry

    (x, r, pm, cm), _ = checking.make_inputs("post", (1,), 4, 64)
    out = torch.empty_like(r)
    fake = types.SimpleNamespace(post=lambda *a: out, pre=None, head=None, fused_post_pre=None)
    rec = registry.Backend("overhead_probe", None,
                           registry.Capabilities(frozenset({"cpu"}), frozenset({r.dtype}), ops=frozenset({"post"})),
                           load=lambda: fake)
    registry.register(rec, replace=True)
    lib = torch.library.Library("mhc_overhead", "FRAGMENT")
    try:
        @torch.library.custom_op("mhc_overhead::post", mutates_args=(), device_types=None)
        def _cop(x: torch.Tensor, r: torch.Tensor, pm: torch.Tensor, cm: torch.Tensor) -> torch.Tensor:
            return out.new_empty(out.shape)

        res = {
            "python call of the kernel": _best_us(lambda: fake.post(x, r, pm, cm)),
            "torch.empty_like (an allocation)": _best_us(lambda: torch.empty_like(r)),
            "torch.library.custom_op, empty body": _best_us(lambda: _cop(x, r, pm, cm)),
            "mhc.validation.check_post": _best_us(lambda: mhc.validation.check_post(x, r, pm, cm)),
            "mhc.registry.select": _best_us(lambda: registry.select("post", r.device, r.dtype, 4, 64, 1, "overhead_probe")),
            "torch.ops.mhc.post (whole op layer)": _best_us(
                lambda: torch.ops.mhc.post.default(x, r, pm, cm, backend="overhead_probe")),
            "mhc.post (public wrapper)": _best_us(lambda: mhc.post(x, r, pm, cm, backend="overhead_probe")),
        }
    finally:
        registry.unregister("overhead_probe")
        del lib
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mhc bench")
    ap.add_argument("--overhead", action="store_true", help="host overhead per call (CPU)")
    args = ap.parse_args(argv)
    if not args.overhead:
        ap.error("choose a benchmark: --overhead")
    for name, us in overhead().items():
        print(f"{name:45s} {us:7.2f} us")
    return 0
