"""The direct launch of compiled Triton kernels (``mhc.backends.triton.direct``) against the
installed Triton, with no GPU: CI runs this file under the oldest (3.6) and the newest (3.9)
Triton of the supported range, so a Triton release that changes what the direct path relies on
(the four points of ``direct``'s docstring) fails here, not in a user's call.

- Point 4: the launch key (``direct._key_and_addresses``) separates every pair of argument
  tuples that Triton's own specialiser (``native_specialize_impl``, what ``JITFunction.run``
  calls) tells apart.
- Points 1 to 3, end to end: a child Python without ``TRITON_INTERPRET`` installs a stand-in
  GPU driver (``triton.runtime.driver.set_active``) whose launcher records its arguments, then
  launches real kernels compiled for sm90 through ``JITFunction.run`` (the first call of a key)
  and through the handle (later calls): both must hand the launcher the same arguments.
- The arguments the launchers pass match each kernel's runtime parameters, for every plan
  (every op, every T bucket).
"""

from __future__ import annotations

import importlib.util
import os
import pathlib

import pytest
import torch

from subprocs import failure_report, run_python

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")

ROOT = str(pathlib.Path(__file__).resolve().parent.parent)


def _specialise(backend, v):
    from triton.runtime.jit import native_specialize_impl

    return native_specialize_impl(backend, v, False, True, True)


@pytest.mark.parametrize("arch", ["sm90", "gfx942"])
def test_the_launch_key_separates_what_triton_specialises(arch):
    """``direct._key_and_addresses`` (what a launch looks its compiled handle up by) never puts
    together two argument tuples that Triton's own specialiser tells apart, is not so fine that
    a warm call misses, and hands the launcher each tensor's address."""
    import random

    from triton.compiler.compiler import make_backend

    from mhc.backends.triton import build, direct

    backend = make_backend(build.target(arch))
    ints = [0, 1, 2, 3, 15, 16, 17, 31, 32, 48, 1000, 4096, 4097, 2**31 - 16, 2**31 - 1, 2**31, 2**32, 2**40,
            2**63 - 16, -1, -16, -17, -(2**31), -(2**31) - 16]
    base = {dt: torch.empty(64, dtype=dt) for dt in (torch.bfloat16, torch.float16, torch.float32, torch.int32)}
    tensors = [t[off:] for t in base.values() for off in range(0, 9)]
    values = ints + tensors + [0.0, 1.0, 1e-6, 16.0, True, False, None, torch.nn.Parameter(torch.empty(4))]
    rng = random.Random(0)
    cases = [(v,) for v in values] + [tuple(rng.choice(values) for _ in range(4)) for _ in range(4000)]
    seen: dict = {}
    for args in cases:
        key, addrs = direct._key_and_addresses(args)
        assert all(a == v.data_ptr() if isinstance(v, torch.Tensor) else a is v for a, v in zip(addrs, args))
        got = tuple(_specialise(backend, v) for v in args)
        assert seen.setdefault(key, (args, got))[1] == got, \
            f"one key for {seen[key][0]!r} and {args!r}; Triton: {seen[key][1]} vs {got}"
    key = lambda *a: direct._key_and_addresses(a)[0]  # noqa: E731
    assert key(4096) == key(32) and key(5) == key(7) and key(1e-6) == key(2.0)


_SCRIPT = r"""
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.runtime import driver

launched = []


class Launcher:  # what a launch hands Triton's C launcher: grid, stream, function, metadata, hooks, args
    def __init__(self, src, metadata):
        self.n_params = len(src.signature)

    def __call__(self, gx, gy, gz, stream, function, packed_metadata, launch_metadata, enter, exit_, *args):
        assert len(args) == self.n_params, (len(args), self.n_params)
        launched.append(((gx, gy, gz), stream, function, packed_metadata, enter, exit_, args, self))


class Utils:
    def get_device_properties(self, device):
        return {"max_shared_mem": 232448, "multiprocessor_count": 132, "max_num_regs": 65536, "warpSize": 32}

    def load_binary(self, name, kernel, shared, device):
        return object(), 4242, 32, 0, 1024


class StandInDriver:
    launcher_cls = Launcher
    utils = Utils()

    def get_current_device(self):
        return 0

    def set_current_device(self, device):
        pass

    def get_current_stream(self, device):
        return 77

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")


driver.set_active(StandInDriver())
from mhc.backends.triton import configs, direct, launch  # noqa: E402

assert not launch.INTERPRETED


def same(a, b):  # an argument as the JIT passed it (a) and the direct launch did (b): address for tensor
    if isinstance(a, torch.Tensor):
        return type(b) is int and b == a.data_ptr()
    return a is b or (type(a) is type(b) and a == b)


def empty_hook(h):
    return h is None or (isinstance(h, triton.knobs.HookChain) and not h.calls)


def check(kernel, grid, *args):
    # first call of a key: JITFunction.run (compiles for sm90, launches); second: the handle
    before = len(kernel.handles)
    kernel(grid, *args)
    assert len(kernel.handles) == before + 1, "JITFunction.run did not return a CompiledKernel"
    kernel(grid, *args)
    jit, handle = launched[-2], launched[-1]
    assert jit[:4] == handle[:4], (jit[:4], handle[:4])  # grid, stream, function, packed metadata
    assert all(empty_hook(h) for h in (*jit[4:6], *handle[4:6])), (jit[4:6], handle[4:6])
    assert len(jit[6]) == len(handle[6]) and all(same(a, b) for a, b in zip(jit[6], handle[6])), (jit[6], handle[6])
    print("OK", kernel.fn.__name__, len(args), "runtime args")


n, H = 4, 256
x, res = torch.zeros(4, H, dtype=torch.bfloat16), torch.zeros(4, n, H, dtype=torch.bfloat16)
pm, cm, out = torch.zeros(4, n, 1), torch.zeros(4, n, n), torch.empty(4, n, H, dtype=torch.bfloat16)
post = launch._post_plan(n, H, 4)
check(post.kernel, (4, 1, 1), x, res, pm, cm, out, 4, H)
check(post.kernel, (1, 1, 1), x, res, pm, cm, out, 1, H)  # T = 1: Triton makes it a constexpr, a new key
x_odd = torch.zeros(4 * H + 1, dtype=torch.bfloat16)[1:].view(4, H)  # 2 bytes past a 16-byte boundary
check(post.kernel, (4, 1, 1), x_odd, res, pm, cm, out, 4, H)  # a misaligned input: a new key
assert len(post.kernel.handles) == 3

# A launch hook (a profiler) installed: the direct path launches through Triton's own runner,
# which builds the launch metadata and hands the launcher the hooks.
seen = []
triton.knobs.runtime.launch_enter_hook.add(seen.append)
try:
    post.kernel((4, 1, 1), x, res, pm, cm, out, 4, H)
    assert launched[-1][4] is triton.knobs.runtime.launch_enter_hook and launched[-1][4].calls
    assert isinstance(launched[-1][6][0], torch.Tensor), "a hooked launch passes the tensors themselves"
finally:
    triton.knobs.runtime.launch_enter_hook.remove(seen.append)
post.kernel((4, 1, 1), x, res, pm, cm, out, 4, H)
assert empty_hook(launched[-1][4]) and launched[-1][6][0] == x.data_ptr()
print("OK hooks")
fn = torch.randn(24, n * H)
tp = launch.plan_for("pre", n, H, 500, torch.bfloat16, torch.device("cpu"))
check(tp.prep, tp.prep_grid, fn, torch.empty(64, n * H, dtype=torch.bfloat16), n * H)

# Keyed launches (DirectKernel.launch, the launchers' path): the caller's key finds the binary
# the generic key would; a misaligned call takes the generic path; CHECK_KEYS catches a caller
# key that puts together two calls Triton specialises apart.
k = launch._post_plan(n, H, 4).kernel
key = (x.dtype, res.dtype, pm.dtype, cm.dtype, direct.int_spec(4))
direct.CHECK_KEYS = True
k.launch((4, 1, 1), key, x, res, pm, cm, out, 4, H)  # first of the key: JITFunction.run, compiles
k.launch((4, 1, 1), key, x, res, pm, cm, out, 4, H)  # checked against the generic key
direct.CHECK_KEYS = False
k((4, 1, 1), x, res, pm, cm, out, 4, H)
generic = launched[-1]
k.launch((4, 1, 1), key, x, res, pm, cm, out, 4, H)  # the keyed fast path
assert launched[-1][:4] == generic[:4] and launched[-1][6] == generic[6] and launched[-1][7] is generic[7]
k((4, 1, 1), x_odd, res, pm, cm, out, 4, H)  # a misaligned input: its own binary
odd = launched[-1]
assert odd[7] is not generic[7]
k.launch((4, 1, 1), key, x_odd, res, pm, cm, out, 4, H)
assert launched[-1][7] is odd[7] and all(same(a, b) for a, b in zip(odd[6], launched[-1][6]))
direct.CHECK_KEYS = True
k.launch((4, 1, 1), key, x_odd, res, pm, cm, out, 4, H)  # checked too: not the key's binary, and not an error
direct.CHECK_KEYS = False
assert launched[-1][7] is odd[7]
x16 = x.to(torch.float16)
bad = ("a key that leaves out x's dtype",)
direct.CHECK_KEYS = True
k.launch((4, 1, 1), bad, x, res, pm, cm, out, 4, H)
try:
    k.launch((4, 1, 1), bad, x16, res, pm, cm, out, 4, H)
except AssertionError as e:
    assert "specialises differently" in str(e), e
else:
    raise SystemExit("CHECK_KEYS let one key serve an fp16 and a bf16 x")
direct.CHECK_KEYS = False
print("OK keyed")

# With the direct path off, every launch goes through JITFunction.run: no handle is kept, and a
# keyed launch whose key was recorded before the switch does not take its handle either.
keyed = launch._post_plan(n, H, 4).kernel
keyed.launch((4, 1, 1), key, x, res, pm, cm, out, 4, H)
assert keyed.keyed
direct.ENABLED = False
k = launch._post_plan(n, H, 4).kernel
k((4, 1, 1), x, res, pm, cm, out, 4, H)
assert not k.handles and launched[-1][6][:5] == (x, res, pm, cm, out)
keyed.launch((4, 1, 1), key, x, res, pm, cm, out, 4, H)
assert launched[-1][6][:5] == (x, res, pm, cm, out), "a keyed launch took its handle with the direct path off"
direct.ENABLED = True

# The backward launchers' keyed launches (real sm90 builds, checked against the generic key):
# a key that put together two calls Triton specialises apart would raise here.
from mhc import checking  # noqa: E402
from mhc.backends.triton import backward as tb  # noqa: E402


def backward_calls(T, n, H):
    fwd, kw = checking.make_inputs("pre", (T,), n, H, torch.bfloat16, device="cpu", seed=T)
    up = (torch.randn(T, n, 1), torch.randn(T, n, n), torch.randn(T, H).bfloat16())
    tb.pre_backward(*up, *fwd, *kw.values(), [True] * 4)
    tb.pre_backward(*up, *fwd, *kw.values(), [True] * 4, torch.rand(H).bfloat16() + 0.5, 1e-6, True)
    hfwd, hkw = checking.make_inputs("head", (T,), n, H, torch.bfloat16, device="cpu", seed=T)
    tb.head_backward(torch.randn(T, H).bfloat16(), *hfwd, *hkw.values(), [True] * 4)
    post = (torch.randn(T, H).bfloat16(), fwd[0], torch.rand(T, n, 1), torch.rand(T, n, n))
    tb.post_backward(torch.randn(T, n, H).bfloat16(), *post, [True] * 4)
    tb.post_backward(torch.randn(T, n, H).bfloat16(), None, fwd[0], torch.rand(T, n, 1), None,
                     [True, True, False, False])
    tb.fused_post_pre_backward(torch.randn(T, n, H).bfloat16(), *up, fwd[0], *post, *fwd[1:], *kw.values(),
                               [True] * 7)


direct.CHECK_KEYS = True
for T in (7, 7, 9):  # the second call of a key checks it; T = 9 has its own int spec, same plan
    backward_calls(T, 2, 64)
direct.CHECK_KEYS = False
print("OK backward keys")

# Every plan's launches pass each kernel its runtime parameters, tensors where pointers go.
calls = []
direct.DirectKernel.__call__ = lambda self, grid, *args: calls.append((self, grid, args))
launch.device_config = lambda op, n, H, T, dtype, dev, norm=False: configs.configs(n, H, T, op, norm=norm)
for T in (1, 64, 500, 2000):
    for op in ("pre", "head", "fused_post_pre", "post"):
        from mhc.checking import device_inputs
        args, kw = device_inputs(op, T, n, H, torch.device("cpu"))
        flat = [a.reshape(T, *a.shape[-2:]) if a.dim() == 3 else a.reshape(T, a.shape[-1]) if a.dim() == 2 and a.shape[0] == T else a for a in args]
        getattr(launch, op)(*flat, *kw.values())
        if op in ("pre", "fused_post_pre"):  # the fused RMSNorm's variants: nw_ptr a tensor
            getattr(launch, op)(*flat, *kw.values(), norm_weight=torch.rand(H) + 0.5, norm_eps=1e-5)
# ... and the backward launchers' (backward.py): pre (with and without the fused RMSNorm), head,
# post, fused_post_pre, at T in one block and in many.
for T in (1, 500, 3000):
    backward_calls(T, n, H)
assert {"_bwd_stats_kernel", "_bwd_tail_kernel", "_bwd_gres_kernel", "_bwd_gfn_kernel", "_post_bwd_kernel",
        "prep_kernel"} <= {k.fn.__name__ for k, _, _ in calls}
for kernel, grid, args in calls:
    assert len(grid) == 3 and len(args) == len(kernel.runtime_names), (kernel.fn.__name__, len(args), kernel.runtime_names)
    for name, v in zip(kernel.runtime_names, args):
        # nw_ptr: the fused RMSNorm's weight, None without a norm (Triton makes it a constexpr None)
        assert name.endswith("_ptr") == isinstance(v, torch.Tensor) or (name == "nw_ptr" and v is None), \
            (kernel.fn.__name__, name, type(v))
        assert v is None or isinstance(v, (torch.Tensor, int, float)), (kernel.fn.__name__, name, type(v))
print("OK", len(calls), "launches of", len({k.fn.__name__ for k, _, _ in calls}), "kernels")
"""


def test_direct_launch_hands_the_launcher_what_the_jit_does(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    script = tmp_path / "direct_contract.py"
    script.write_text(_SCRIPT)
    rc, out = run_python([str(script)], env)
    assert rc == 0, failure_report(out, markers=("Error", "assert", "Traceback"))
    assert out.count("OK") == 8, out
