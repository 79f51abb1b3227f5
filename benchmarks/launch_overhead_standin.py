"""Host µs of the Triton launchers with a stand-in GPU driver: real ``JITFunction.run`` and
``CompiledKernel`` launch code, a C launcher that does nothing. Runs on a CPU machine (it compiles
the kernels for sm90 on first use, as ``python -m mhc aot`` does), so it compares the launch
paths where no GPU is at hand:

    python benchmarks/launch_overhead_standin.py            # direct launch (mhc's default)
    python benchmarks/launch_overhead_standin.py --jit      # every launch through JITFunction.run
    python benchmarks/launch_overhead_standin.py --backward --H 4096   # the backward (docs/tuning/host.md)

``--backward`` times pre's backward launcher (``backends/triton/backward.py``) called directly,
then ``torch.autograd.grad`` through ``mhc.pre`` and forward + backward, with the registry told
that Triton serves these CPU tensors (its probe refuses them without the interpreter; here every
launch is a no-op, so nothing runs on them). ``Tensor.sum(0)`` of the launchers' partials (one
asynchronous launch on a GPU, milliseconds of arithmetic on a CPU) returns an empty tensor of the
sum's shape instead.

It measures what ``python benchmarks/bench.py --overhead`` leaves out (Triton's own Python per launch)
and nothing of the GPU: the real launch adds the driver's cuLaunchKernel, a few µs.
"""

from __future__ import annotations

import argparse
import os

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402


class _Launcher:
    def __init__(self, src, metadata):
        pass

    def __call__(self, *args):
        pass


class _Utils:
    def get_device_properties(self, device):
        return {"max_shared_mem": 232448, "multiprocessor_count": 132, "max_num_regs": 65536, "warpSize": 32}

    def load_binary(self, name, kernel, shared, device):
        return object(), 1, 32, 0, 1024


class StandInDriver:
    launcher_cls = _Launcher
    utils = _Utils()

    def get_current_device(self):
        return 0

    def set_current_device(self, device):
        pass

    def get_current_stream(self, device):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")


def best_us(f, n=300, rounds=5) -> float:
    from mhc.timing import host_us

    return host_us(f, n, rounds, warmup=20)


def backward(H: int, Ts: list[int]) -> None:
    """Host µs of pre's backward: the launcher alone, autograd's backward, forward + backward."""
    import mhc
    from mhc import checking, registry
    from mhc.backends.triton import backward as tb

    probe = registry.reasons_for

    def reasons_for(name, p):  # Triton's probe refuses CPU tensors without the interpreter
        why = probe(name, p)
        if name == "triton" and why and all("CPU tensors need" in w for w in why):
            registry._load("triton")
            return []
        return why

    registry.reasons_for = reasons_for
    tensor_sum = torch.Tensor.sum

    def sum_(t, *args, **kwargs):  # the partials' reduction: a launch on a GPU, not timed here
        if args == (0,) and not kwargs and t.dim() >= 2 and t.numel() > 4096:
            return torch.empty(t.shape[1:], dtype=t.dtype)
        return tensor_sum(t, *args, **kwargs)

    torch.Tensor.sum = sum_
    every = {op: "triton" for op in (*registry.OPS, *registry.BACKWARD_OPS)}
    n = 4
    for T in Ts:
        args, kw = checking.device_inputs("pre", T, n, H, torch.device("cpu"))
        leaves = [a.detach().clone().requires_grad_(True) for a in args]
        g = torch.Generator().manual_seed(T)
        grads = (torch.randn(T, n, 1, generator=g), torch.randn(T, n, n, generator=g),
                 torch.randn(T, H, generator=g).bfloat16())
        res, fn, sc, base = (t.detach() for t in leaves)
        with mhc.use_backend(**every):
            outs = mhc.pre(*leaves, **kw)
            launcher = best_us(lambda: tb.pre_backward(*grads, res.reshape(T, n, H), fn, sc, base, *kw.values(),
                                                       [True] * 4), 100)
            bwd = best_us(lambda: torch.autograd.grad(outs, leaves, grads, retain_graph=True), 100)
            step = best_us(lambda: torch.autograd.grad(mhc.pre(*leaves, **kw), leaves, grads), 100)
        print(f"pre backward T={T:<5} launcher {launcher:7.1f} us  autograd.grad {bwd:7.1f} us  "
              f"forward + backward {step:7.1f} us")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jit", action="store_true", help="launch through JITFunction.run (direct.ENABLED = False)")
    ap.add_argument("--H", type=int, default=256)
    ap.add_argument("--backward", action="store_true", help="pre's backward (launcher, autograd) instead")
    ap.add_argument("--T", default="512,4096", help="--backward's token counts (comma list)")
    args = ap.parse_args()
    driver.set_active(StandInDriver())
    from mhc import checking
    from mhc.backends.triton import direct, launch

    direct.ENABLED = not args.jit
    if args.backward:
        print(f"triton backward, n=4, H={args.H}, {'JITFunction.run' if args.jit else 'direct'} launches, "
              "stand-in driver")
        backward(args.H, [int(t) for t in args.T.split(",")])
        return
    print(f"triton launchers, n=4, H={args.H}, {'JITFunction.run' if args.jit else 'direct'} launches, stand-in driver")
    for op, T in (("pre", 1), ("post", 1), ("head", 1), ("fused_post_pre", 1), ("pre", 64), ("pre", 512)):
        a, kw = checking.device_inputs(op, T, 4, args.H, torch.device("cpu"))
        f, vals = getattr(launch, op), tuple(kw.values())
        print(f"{op:15s} T={T:<4} {best_us(lambda: f(*a, *vals)):7.1f} us")


if __name__ == "__main__":
    main()
