"""Timing helpers and the bytes floor: what ``python -m mhc check`` times with, and what the
benchmark harness (``benchmarks/bench.py``) and the dev scripts in ``benchmarks/`` share.

- :func:`floor_bytes`: the fewest bytes an op must move (each input read once, each output
  written once); over a copy bandwidth it is the op's floor in µs. :func:`backward_floor_bytes`:
  the same for an op's backward (``benchmarks/train_bench.py``).
- :func:`time_warm` (CUDA-graph replays: the device's time), :func:`time_cold` (L2 flushed
  before every call), :func:`median_us` (event-timed calls), :func:`eager_us` (wall time per
  call of back-to-back eager calls: host overhead included), :func:`host_us` (the host's µs per
  call alone, no device sync inside). On the CPU they fall back to ``time.perf_counter`` medians.
"""

from __future__ import annotations

import statistics
import time

import torch

from mhc.registry import OPS

__all__ = ["floor_bytes", "backward_floor_bytes", "median_us", "time_warm", "time_cold", "eager_us", "host_us"]


def floor_bytes(op: str, T: int, n: int, H: int, act_bytes: int = 2, mix_bytes: int = 4) -> int:
    """The fewest bytes ``op`` must move: each input read once, each output written once.

    ``act_bytes`` is the residual/activation element size (2 for bf16), ``mix_bytes`` that of
    fn, hc_scale, hc_base, post_mix and comb_mix (4, fp32). With ``m = 2n + n*n``:

    - ``pre``:  read residual ``T*n*H*a`` + fn ``m*n*H*f`` + hc_scale ``3*f`` + hc_base ``m*f``;
      write post_mix ``T*n*f``, comb_mix ``T*n*n*f``, layer_input ``T*H*a``.
    - ``post``: read x ``T*H*a``, residual ``T*n*H*a``, post_mix ``T*n*f``, comb_mix ``T*n*n*f``;
      write out ``T*n*H*a``.
    - ``head``: read residual ``T*n*H*a`` + fn ``n*n*H*f`` + hc_scale ``f`` + hc_base ``n*f``;
      write ``T*H*a``.
    - ``fused_post_pre``: post's reads plus pre's parameters (fn, hc_scale, hc_base); write the
      new residual ``T*n*H*a`` and pre's outputs. The new residual is never read back: that is
      the point of the fusion, so the floor does not count it.
    """
    a, f, m = act_bytes, mix_bytes, 2 * n + n * n
    pre_params = m * n * H * f + 3 * f + m * f
    pre_outputs = T * n * f + T * n * n * f + T * H * a
    post_inputs = T * H * a + T * n * H * a + T * n * f + T * n * n * f
    if op == "pre":
        return T * n * H * a + pre_params + pre_outputs
    if op == "post":
        return post_inputs + T * n * H * a
    if op == "head":
        return T * n * H * a + n * n * H * f + f + n * f + T * H * a
    if op == "fused_post_pre":
        return post_inputs + pre_params + T * n * H * a + pre_outputs
    raise ValueError(f"unknown op {op!r}; ops: {', '.join(OPS)}")


def backward_floor_bytes(op: str, T: int, n: int, H: int, act_bytes: int = 2, mix_bytes: int = 4) -> int:
    """The fewest bytes the backward of ``op`` must move when every input requires grad: each
    tensor it needs read once, each gradient written once.

    ``act_bytes`` is the activation element size (residual, x, their gradients and the upstream
    gradients of activation outputs: 2 for bf16), ``mix_bytes`` that of fn, hc_scale, hc_base,
    post_mix, comb_mix and their gradients (4, fp32). With ``m = 2n + n*n``:

    - ``pre``: read the residual ``T*n*H*a`` once (the mixes are recomputed from it or saved: a
      kernel that reads it twice is above the floor), the upstream gradients grad_layer_input
      ``T*H*a``, grad_post_mix ``T*n*f`` and grad_comb_mix ``T*n*n*f``, fn ``m*n*H*f``, hc_scale
      ``3*f`` and hc_base ``m*f``; write grad_residual ``T*n*H*a``, grad_fn ``m*n*H*f``,
      grad_hc_scale ``3*f`` and grad_hc_base ``m*f``.
    - ``head``: read the residual ``T*n*H*a``, grad_out ``T*H*a``, fn ``n*n*H*f``, hc_scale ``f``,
      hc_base ``n*f``; write grad_residual ``T*n*H*a``, grad_fn ``n*n*H*f``, grad_hc_scale ``f``,
      grad_hc_base ``n*f``.
    - ``post``: read grad_out ``T*n*H*a``, x ``T*H*a``, the residual ``T*n*H*a`` (the mixes'
      gradients need x and the residual), post_mix ``T*n*f``, comb_mix ``T*n*n*f``; write grad_x
      ``T*H*a``, grad_residual ``T*n*H*a``, grad_post_mix ``T*n*f``, grad_comb_mix ``T*n*n*f``.
    - ``fused_post_pre``: read the upstream gradients grad_new_residual ``T*n*H*a``,
      grad_layer_input ``T*H*a``, grad_post_mix ``T*n*f``, grad_comb_mix ``T*n*n*f``; the saved
      new residual ``T*n*H*a`` (pre's backward needs it; recomputing it from x and the old
      residual, which post's backward reads anyway, would save this term), x ``T*H*a``, the old
      residual ``T*n*H*a``, the input post_mix ``T*n*f`` and comb_mix ``T*n*n*f``, fn
      ``m*n*H*f``, hc_scale ``3*f``, hc_base ``m*f``; write grad_x ``T*H*a``, grad_residual
      ``T*n*H*a``, the input mixes' gradients ``T*n*f + T*n*n*f``, grad_fn ``m*n*H*f``,
      grad_hc_scale ``3*f`` and grad_hc_base ``m*f``.

    The parameters' terms (hc_scale, hc_base) are a few bytes; they are counted to keep the
    sum exact, not because they matter.
    """
    a, f, m = act_bytes, mix_bytes, 2 * n + n * n
    mixes = T * n * f + T * n * n * f  # a (post_mix, comb_mix) pair, or their gradients
    if op == "pre":
        return 2 * T * n * H * a + T * H * a + mixes + 2 * (m * n * H * f + 3 * f + m * f)
    if op == "head":
        return 2 * T * n * H * a + T * H * a + 2 * (n * n * H * f + f + n * f)
    if op == "post":
        return 3 * T * n * H * a + 2 * T * H * a + 2 * mixes
    if op == "fused_post_pre":
        reads = 3 * T * n * H * a + 2 * T * H * a + 2 * mixes + m * n * H * f + 3 * f + m * f
        writes = T * H * a + T * n * H * a + mixes + m * n * H * f + 3 * f + m * f
        return reads + writes
    raise ValueError(f"unknown op {op!r}; ops: {', '.join(OPS)}")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _perf_counter_us(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e6)
    return statistics.median(times)


def median_us(fn, device: torch.device, reps: int = 20) -> float:
    """Median time of ``fn()`` in µs over ``reps`` back-to-back calls after one warm-up: CUDA
    events on a GPU (no graph, no flush), ``perf_counter`` on the CPU."""
    fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) * 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e6)
    return statistics.median(times)


def time_warm(fn, device: torch.device, rep_ms: int) -> tuple[float, str]:
    """Warm µs of ``fn()`` and the timer used: the median of CUDA-graph replays
    (``do_bench_cudagraph``); if ``fn`` cannot be captured, the median of event-timed calls,
    with the capture error in the label."""
    if device.type != "cuda":
        return _perf_counter_us(fn, 5), "perf_counter"
    import triton.testing

    with torch.cuda.device(device):
        try:
            return triton.testing.do_bench_cudagraph(fn, rep=rep_ms, return_mode="median") * 1e3, "cudagraph"
        except Exception as e:
            torch.cuda.synchronize(device)
            why = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}" if str(e) else type(e).__name__
            return median_us(fn, torch.device("cuda"), 50), f"events (no graph capture: {why})"


def time_cold(fn, device: torch.device, rep_ms: int) -> float:
    """Cold µs of ``fn()``: ``do_bench``'s median with the L2 flushed before every call."""
    if device.type != "cuda":
        return _perf_counter_us(fn, 3)
    import triton.testing

    with torch.cuda.device(device):
        return triton.testing.do_bench(fn, warmup=max(1, rep_ms // 4), rep=rep_ms, return_mode="median") * 1e3


def eager_us(fn, device: torch.device, calls: int = 200, rounds: int = 5, warmup_s: float = 0.05) -> float:
    """Wall µs per call of ``fn()`` run eagerly: ``calls`` back-to-back calls synchronised once,
    the median of ``rounds`` rounds, after ``warmup_s`` seconds of calls (the host's caches and
    clock settle after the GPU-bound timings that come before it in a benchmark). What a model
    run without CUDA graphs pays per call: the host's time (op layer, launcher, launches) and the
    device's, whichever is longer. Next to :func:`time_warm` (graph replays: the device's time
    alone) it shows the host overhead; on the CPU it is the whole call."""
    fn()
    _sync(device)
    end = time.perf_counter() + warmup_s
    while time.perf_counter() < end:
        fn()
    _sync(device)
    per_call = []
    for _ in range(rounds):
        _sync(device)
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        _sync(device)
        per_call.append((time.perf_counter() - t) / calls * 1e6)
    return statistics.median(per_call)


def host_us(fn, calls: int = 2000, rounds: int = 5, warmup: int = 50) -> float:
    """Host µs per call of ``fn()``: the best of ``rounds`` rounds of ``calls`` back-to-back calls
    after ``warmup`` calls, with no device sync inside a round (launches queue: on a GPU this is
    the host's time only while the device keeps up). What the overhead reports time with
    (``benchmarks/bench.py --overhead``, ``benchmarks/host_profile.py``)."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t) / calls * 1e6)
    return best
