"""Host µs of the Triton launchers with a stand-in GPU driver: real ``JITFunction.run`` and
``CompiledKernel`` launch code, a C launcher that does nothing. Runs on a CPU machine (it compiles
the kernels for sm90 on first use, as ``python -m mhc aot`` does), so it compares the launch
paths where no GPU is at hand:

    python benchmarks/launch_overhead_standin.py            # direct launch (mhc's default)
    python benchmarks/launch_overhead_standin.py --jit      # every launch through JITFunction.run

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jit", action="store_true", help="launch through JITFunction.run (direct.ENABLED = False)")
    ap.add_argument("--H", type=int, default=256)
    args = ap.parse_args()
    driver.set_active(StandInDriver())
    from mhc import checking
    from mhc.backends.triton import direct, launch

    direct.ENABLED = not args.jit
    print(f"triton launchers, n=4, H={args.H}, {'JITFunction.run' if args.jit else 'direct'} launches, stand-in driver")
    for op, T in (("pre", 1), ("post", 1), ("head", 1), ("fused_post_pre", 1), ("pre", 64), ("pre", 512)):
        a, kw = checking.device_inputs(op, T, 4, args.H, torch.device("cpu"))
        f, vals = getattr(launch, op), tuple(kw.values())
        print(f"{op:15s} T={T:<4} {best_us(lambda: f(*a, *vals)):7.1f} us")


if __name__ == "__main__":
    main()
