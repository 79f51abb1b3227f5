"""A test backend shared by the test files: the reference math on CPU tensors, recording the ops
it ran (importable from the tests, as ``subprocs`` is)."""

from __future__ import annotations

from mhc import reference, registry


class Recorder:
    """A backend's loaded object: ``rec.<op>(*args)`` runs ``mhc.reference.<op>`` and appends the
    op's name to ``rec.calls``; ops outside ``registry.OPS`` are absent (AttributeError)."""

    def __init__(self):
        self.calls = []

    def __getattr__(self, op):
        if op not in registry.OPS:
            raise AttributeError(op)

        def run(*a):
            self.calls.append(op)
            return getattr(reference, op)(*a)

        return run
