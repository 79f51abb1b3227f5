"""The helper that runs the compile tests' child processes (``tests/subprocs.py``)."""

from __future__ import annotations

import os
import time

from subprocs import failure_report, run_python


def test_a_childs_workers_end_with_it(tmp_path):
    """A grandchild (as a compile worker would be) still running when the child exits is killed."""
    pid_file = tmp_path / "pid"
    code = ("import subprocess, sys\n"
            f"p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
            f"open({str(pid_file)!r}, 'w').write(str(p.pid))\nprint('BAD  one build', flush=True)\nsys.exit(3)\n")
    rc, out = run_python(["-c", code], dict(os.environ))
    assert rc == 3 and "BAD  one build" in out
    pid = int(pid_file.read_text())
    for _ in range(100):  # killed with SIGKILL; its parent is gone, so init reaps it
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        with open(f"/proc/{pid}/stat") as f:
            if f.read().split(") ")[1].startswith("Z"):
                break
        time.sleep(0.05)
    else:
        raise AssertionError(f"worker {pid} outlived its test")


def test_failure_report_shows_the_cause_first():
    log = "\n".join([f"ok   build {i}" for i in range(5000)] + ["BAD  sm90 pre n=6  shared 73728B"]
                    + [f"ok   build {i}" for i in range(5000, 9000)] + ["builds: 9001, failed: 1"])
    report = failure_report(log)
    assert report.index("BAD  sm90 pre n=6") < report.index("builds: 9001, failed: 1")
    assert len(report) < 4000
