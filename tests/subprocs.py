"""Run a child Python for a test, and end it with the test.

The child runs in a session of its own; when it exits, or when the test is interrupted or fails
while waiting (Ctrl-C, a pytest timeout plug-in), the whole session is killed before the child is
reaped, so compile workers that it started (``ProcessPoolExecutor``) never outlive the test. No
wall-clock limit: a slow machine makes a test slow, never failed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile


def run_python(args: list[str], env: dict[str, str]) -> tuple[int, str]:
    """``python *args`` with ``env``; returns (exit status, stdout and stderr interleaved)."""
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen([sys.executable, *args], env=env, stdout=log, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        try:
            # Wait without reaping, so that the child's id still names its session when it is killed.
            os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.seek(0)
        return proc.returncode, log.read()


def failure_report(out: str, markers: tuple[str, ...] = ("BAD", "FAILED", "Error", "error:"), tail: int = 40) -> str:
    """The lines of ``out`` that carry a marker (every one of them), then its last ``tail`` lines:
    the cause first, however long the log."""
    lines = out.splitlines()
    hits = [line for line in lines if any(m in line for m in markers)]
    return "\n".join(["-- lines that name a failure:", *hits, f"-- last {tail} lines:", *lines[-tail:]])
