"""Where an eager call's host time goes, on a GPU machine (issue 14's profile).

For each case (op, T) and backend it prints: the eager µs per call (``mhc.timing.eager_us``) next
to the graph-replay µs, the kernels one call launches (torch profiler: names and count), how many
launches went through ``JITFunction.run`` rather than the cached handle (Triton's
``DirectKernel``), and a cProfile of 1000 calls (top functions by own time). Before that, the
cost of the building blocks every launcher uses: an allocation, a device guard, a stream lookup,
a Triton launch through the compiled handle.

    python benchmarks/host_profile.py                      # triton and tilelang, default cases
    python benchmarks/host_profile.py --backends triton --cases pre:1,fused_post_pre:64
    python benchmarks/host_profile.py --no-blocks --backends triton --cases "" --grad-cases "" \
        --backward-cases pre:512,pre:4096,post:512           # the backward's host time
"""

from __future__ import annotations

import argparse
import cProfile
import collections
import io
import pstats

import torch
import triton
import triton.language as tl


def best_us(f, n: int = 2000, rounds: int = 5) -> float:
    """``mhc.timing.host_us``, then a device sync (the rounds queue launches)."""
    from mhc.timing import host_us

    us = host_us(f, n, rounds)
    torch.cuda.synchronize()
    return us


@triton.jit
def _noop(x_ptr, n, BLOCK: tl.constexpr):
    tl.store(x_ptr + tl.arange(0, BLOCK), tl.zeros([BLOCK], tl.float32), mask=tl.arange(0, BLOCK) < n)


def building_blocks(dev: torch.device) -> None:
    import triton

    from mhc.backends import device_guard

    noop = _noop
    x = torch.empty(16, device=dev)
    h = noop[(1,)](x, 16, BLOCK=16)
    drv = triton.runtime.driver.active
    stream = torch.cuda.current_stream(dev).cuda_stream

    def guard():
        with device_guard(dev):
            pass

    rows = {
        "torch.empty((1, 4096), bf16)": lambda: torch.empty((1, 4096), dtype=torch.bfloat16, device=dev),
        "torch.empty((64, 4, 4), fp32)": lambda: torch.empty((64, 4, 4), dtype=torch.float32, device=dev),
        "torch.empty_like": lambda: torch.empty_like(x),
        "x.new_empty": lambda: x.new_empty((4096,)),
        "device_guard (torch.cuda.device)": guard,
        "torch.cuda.current_device()": torch.cuda.current_device,
        "torch._C._cuda_getDevice()": torch._C._cuda_getDevice,
        "triton driver get_current_stream": lambda: drv.get_current_stream(0),
        "torch._C._cuda_getCurrentRawStream(0)": lambda: torch._C._cuda_getCurrentRawStream(0),
        "tensor.data_ptr()": x.data_ptr,
        "tensor.contiguous() (already)": x.contiguous,
        "noop[grid] (JITFunction.run)": lambda: noop[(1,)](x, 16, BLOCK=16),
        "CompiledKernel[grid](...)": lambda: h[(1, 1, 1)](x, 16, 16),
        "CompiledKernel.run (C launcher, stream given)": lambda: h.run(1, 1, 1, stream, h.function, h.packed_metadata,
                                                                       None, None, None, x, 16, 16),
        "torch.add (a tiny CUDA kernel)": lambda: torch.add(x, 1.0),
    }
    print("building blocks (host µs per call, best of 5 x 2000):")
    for name, f in rows.items():
        try:
            print(f"  {name:48s} {best_us(f):8.2f}")
        except Exception as e:  # a block that this Triton lacks: say so, go on
            print(f"  {name:48s} failed: {type(e).__name__}: {e}")


def layers(dev: torch.device, H: int) -> None:
    """Unprofiled host µs of each layer of one Triton call (T = 1): the public wrapper, the op layer,
    the backend's launcher, and inside it validation, selection, the keyed launch the launchers
    make, the generic key and launch it replaces, and the launcher's C call."""
    import mhc
    from mhc import checking, registry, validation
    from mhc.backends.triton import direct, launch

    print("layers of a Triton call, T = 1 (host µs per call, best of 5 x 2000):")
    for op in ("pre", "post", "fused_post_pre"):
        args, kw = checking.device_inputs(op, 1, 4, H, dev)
        vals = tuple(kw.values())
        mhc_op, op_layer, impl = getattr(mhc, op), getattr(mhc.ops, op), getattr(launch, op)
        flat = tuple(a.reshape(1, *a.shape[-2:]) if a.dim() == 3 else a for a in args)
        res = args[0] if op in ("pre", "head") else args[1]
        n = res.shape[-2]
        seen = []
        real = direct.DirectKernel.launch
        direct.DirectKernel.launch = lambda self, grid, key, *a: seen.append((self, grid, key, a)) or real(self, grid, key, *a)
        try:
            impl(*flat, *vals)
        finally:
            direct.DirectKernel.launch = real
        k, grid, lkey, largs = seen[-1]
        key, addrs = direct._key_and_addresses(largs)
        h = k.handles[key]
        stream = torch.cuda.current_stream(dev).cuda_stream
        rows = {
            f"mhc.{op} (public wrapper)": lambda: mhc_op(*args, **kw, backend="triton"),
            f"mhc.ops.{op} (op layer + launcher)": lambda: op_layer(*args, *vals, backend="triton"),
            f"launch.{op} (the backend's launcher)": lambda: impl(*flat, *vals),
            "registry.select": lambda: registry.select(op, res.device, res.dtype, n, H, 1, "triton"),
            "DirectKernel.launch (keyed: the launchers')": lambda: k.launch(grid, lkey, *largs),
            "DirectKernel call (generic key + launch)": lambda: k(grid, *largs),
            "direct._key_and_addresses (generic key)": lambda: direct._key_and_addresses(largs),
            "launcher C call (h.run)": lambda: h.run(*grid, stream, h.function, h.packed_metadata, None, None, None,
                                                     *addrs, *k.tail),
        }
        if op == "post":
            rows["validation.check_post"] = lambda: validation.check_post(*args)
        for name, f in rows.items():
            print(f"  {op:15s} {name:40s} {best_us(f):8.2f}")


def jit_launch_counter():
    """Counts launches that go through ``JITFunction.run`` (a DirectKernel miss or the JIT path)."""
    from triton.runtime.jit import JITFunction

    counts = collections.Counter()
    orig = JITFunction.run

    def run(self, *args, **kwargs):
        counts[self.__name__] += 1
        return orig(self, *args, **kwargs)

    JITFunction.run = run
    return counts, lambda: setattr(JITFunction, "run", orig)


def launches_per_call(f) -> list[str]:
    from torch.profiler import ProfilerActivity, profile

    f()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        f()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return names


def profile_case(op: str, T: int, backend: str, dev: torch.device, H: int, calls: int, mode: str) -> None:
    """``mode``: "forward", "grad" (the forward with autograd recording) or "backward"
    (``torch.autograd.grad`` of one recorded forward, the backward ops under ``use_backend``)."""
    import mhc
    from mhc import checking, timing

    args, kw = checking.device_inputs(op, T, 4, H, dev)
    if mode != "forward":
        args = tuple(a.detach().requires_grad_(a.is_floating_point()) if isinstance(a, torch.Tensor) else a
                     for a in args)
    fn = getattr(mhc, op)

    def call():
        return fn(*args, **kw, backend=backend)

    label = f"{backend} {op} T={T}{'' if mode == 'forward' else ' ' + mode}"
    try:
        if mode == "backward":
            with mhc.use_backend(backend):
                outs = call()
            outs = outs if isinstance(outs, tuple) else (outs,)
            leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
            ups = [torch.randn_like(o) for o in outs]

            def call():
                with mhc.use_backend(backend):
                    return torch.autograd.grad(outs, leaves, ups, retain_graph=True)
        call()
    except Exception as e:
        print(f"\n== {label}: cannot run ({type(e).__name__}: {e})")
        return
    torch.cuda.synchronize()
    eager = timing.eager_us(call, dev)
    host = best_us(call, n=500, rounds=3)
    graph = float("nan")
    if mode == "forward":
        try:
            graph, _ = timing.time_warm(call, dev, 20)
        except Exception as e:
            print(f"  (graph timing failed: {type(e).__name__}: {e})")
    counts, undo = jit_launch_counter()
    try:
        for _ in range(100):
            call()
        torch.cuda.synchronize()
    finally:
        undo()
    kernels = launches_per_call(call)
    print(f"\n== {label}: eager {eager:.1f} µs/call, host-only loop {host:.1f} µs/call, graph {graph:.1f} µs; "
          f"kernels per call {len(kernels)}: {dict(collections.Counter(kernels))}; "
          f"JITFunction.run in 100 warm calls: {dict(counts) or 0}")
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(calls):
        call()
    torch.cuda.synchronize()
    pr.disable()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(22)
    lines = [ln for ln in s.getvalue().splitlines() if ln.strip()]
    print("\n".join(lines[3:]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backends", default="triton,tilelang")
    ap.add_argument("--cases", default="pre:1,post:1,head:1,fused_post_pre:1,pre:64,head:64,fused_post_pre:64,"
                                       "head:4096,pre:4096")
    ap.add_argument("--grad-cases", default="pre:1,post:1")
    ap.add_argument("--backward-cases", default="", help="e.g. pre:512,post:512 (torch.autograd.grad of one forward)")
    ap.add_argument("--H", type=int, default=4096)
    ap.add_argument("--calls", type=int, default=1000)
    ap.add_argument("--no-blocks", action="store_true")
    a = ap.parse_args()
    dev = torch.device("cuda", torch.cuda.current_device())
    print(f"{torch.cuda.get_device_name(dev)}, torch {torch.__version__}")
    if not a.no_blocks:
        building_blocks(dev)
        layers(dev, a.H)
    cases = [(c.split(":")[0], int(c.split(":")[1])) for c in a.cases.split(",") if c]
    modes = {"forward": a.cases, "grad": a.grad_cases, "backward": a.backward_cases}
    for backend in a.backends.split(","):
        for mode, spec in modes.items():
            for c in (c for c in spec.split(",") if c):
                profile_case(c.split(":")[0], int(c.split(":")[1]), backend, dev, a.H, a.calls, mode)


if __name__ == "__main__":
    main()
