"""Progress of long command-line runs (the AOT builds, the benchmark grid, ``python -m mhc`` under
the Triton interpreter): ``[k/N, 1m05s, ~3m left]`` before each step's line. The estimate is the
mean time of the steps done so far times the steps left."""

from __future__ import annotations

import time


def _dur(s: float) -> str:
    s = int(round(s))
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class Progress:
    """Counts ``total`` steps; :meth:`step` marks one started, :meth:`prefix` describes the run
    after the current step is done."""

    def __init__(self, total: int) -> None:
        self.total = max(total, 1)
        self.done = 0
        self.t0 = time.perf_counter()

    def step(self) -> None:
        self.done += 1

    def prefix(self) -> str:
        spent = time.perf_counter() - self.t0
        left = self.total - self.done
        eta = f", ~{_dur(spent / self.done * left)} left" if self.done and left else ""
        return f"[{self.done}/{self.total}, {_dur(spent)}{eta}] "


def fmt_us(us: float) -> str:
    """A duration given in µs, in at most 9 characters: ``  12.3us``, ``4.56ms``, ``14.09s``."""
    if us != us:
        return "nan"
    if us < 1e4:
        return f"{us:.1f}us"
    if us < 1e6:
        return f"{us / 1e3:.2f}ms"
    return f"{us / 1e6:.2f}s"
