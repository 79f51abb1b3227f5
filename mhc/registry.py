"""Backend registry: one record per backend, selection per call, reasons instead of booleans.

A backend is a :class:`Backend` record: its name, the distribution it needs, its
:class:`Capabilities` (data: devices, dtypes, n and H limits), a ``probe`` that returns the
environment-specific reasons it cannot serve a :class:`Problem`, and a ``load`` that imports the
kernels on first use. Nothing optional is imported when this module is: the built-in records live
in modules that import their libraries only inside ``load``.

Selection, strongest first: the ``backend=`` argument of a call; :func:`use_backend`
(context-local, nests); the ``MHC_BACKEND`` environment variable; ``auto``. Each may name one
backend for every op (``triton``) or per op (``pre:aiter,post:triton``; ops left out fall through
to the next level). An explicit choice that cannot serve raises :class:`BackendError` listing why;
``auto`` walks :func:`auto_order` and records why it skipped each backend. Decisions are cached in
:data:`_STATE` keyed by everything they depend on, so the per-call cost is a dict lookup.

Backward ops (:data:`BACKWARD_OPS`, called by ``mhc.autograd``) are selected the same way, with
two differences: a backend serves one only if its ``Capabilities.ops`` lists it (the default
lists the forward ops only, so a backend without backward kernels gives that as its reason and
``auto`` moves on, ending at torch), and a bare backend name (``MHC_BACKEND=triton``,
``use_backend("triton")``) covers the backward ops that backend lists and no other: for those it
lists not, a backward op follows an entry that names it (``pre_backward:torch``), else ``auto``.
So asking for Triton trains on Triton's backward kernels, a forward backend without backward
kernels still trains, and an explicit backward choice that cannot serve raises as any explicit
choice does.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import importlib
import os
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch

from mhc import state
from mhc.plans import t_bucket

__all__ = [
    "OPS",
    "BACKWARD_OPS",
    "Problem",
    "Capabilities",
    "Backend",
    "BackendError",
    "Explanation",
    "register",
    "backend_names",
    "get",
    "select",
    "explain_problem",
    "use_backend",
    "parse_spec",
    "platform_of",
    "auto_order",
]

OPS = ("pre", "post", "head", "fused_post_pre")
#: The backward ops (``torch.ops.mhc.<name>``, defined in ``mhc.autograd``).
BACKWARD_OPS = ("pre_backward", "post_backward", "head_backward", "fused_post_pre_backward")
_ALL_OPS = OPS + BACKWARD_OPS
_BACKWARD = frozenset(BACKWARD_OPS)  # set membership: current_choice runs on every call
ENV_VAR = "MHC_BACKEND"
ENTRY_POINT_GROUP = "mhc.backends"

# Built-in records, imported on first registry use. Each module imports only torch at import time.
_BUILTIN = {
    "aiter": "mhc.backends.aiter",
    "tilelang": "mhc.backends.tilelang",
    "triton": "mhc.backends.triton",
    "torch": "mhc.backends.torch",
}


#: What an optional import, a backend record, a plug-in's ``load()`` or ``probe()`` may raise
#: that is turned into a reason: everything but KeyboardInterrupt. SystemExit included: a package
#: that calls ``sys.exit()`` at import must not end ``python -m mhc info`` or a caller's process.
CAUGHT = (Exception, SystemExit)


class BackendError(RuntimeError):
    """No backend can serve a call: the one asked for cannot, or (auto) none can."""


@dataclasses.dataclass(frozen=True)
class Problem:
    """What a backend needs to know to say whether it can serve one call.

    ``op`` one of :data:`OPS` or :data:`BACKWARD_OPS` (``mhc.autograd`` selects the backward
    kernels through the same registry); ``device`` of the residual; ``dtype`` of the residual; ``n``
    streams; ``H`` hidden size; ``T`` tokens (leading dims flattened). ``create_graph``: a
    backward op whose result must itself be differentiable (``create_graph=True``, double
    backward). ``norm``: the call fuses the sublayer's RMSNorm (``norm_weight`` given to
    ``pre``/``fused_post_pre``, or to ``pre_backward``).
    """

    op: str
    device: torch.device
    dtype: torch.dtype
    n: int
    H: int
    T: int
    create_graph: bool = False
    norm: bool = False

    def describe(self) -> str:
        dt = str(self.dtype).replace("torch.", "")
        graph = ", create_graph=True" if self.create_graph else ""
        norm = ", norm_weight" if self.norm else ""
        return f"{self.op}(T={self.T}, n={self.n}, H={self.H}, {dt}, {self.device}{graph}{norm})"


@dataclasses.dataclass(frozen=True)
class Capabilities:
    """What a backend supports, as data. :meth:`reasons` turns a mismatch into readable reasons.

    ``device_types``: torch device types (``"cuda"`` covers ROCm too; ``platforms`` narrows).
    ``platforms``: subset of {"cuda", "rocm", "cpu", "other"} (see :func:`platform_of`).
    ``dtypes``: residual dtypes. ``n_values``: supported stream counts. ``h_multiple``: H must be
    a multiple of it. ``ops``: ops served; the default is the forward ops, so a backend serves a
    backward op (:data:`BACKWARD_OPS`) only if it lists it explicitly. ``double_backward``: its
    backward ops record autograd history (they are built from differentiable torch ops), so they
    serve ``create_graph=True`` calls; kernels that do not would give a silently wrong (None)
    second-order gradient, so they are refused there. ``norm_ops``: the ops it serves with the
    fused RMSNorm (``norm_weight``); none by default, so a backend that has not implemented it
    gives that as its reason and ``auto`` moves on.
    """

    device_types: frozenset[str]
    dtypes: frozenset[torch.dtype]
    platforms: frozenset[str] = frozenset({"cuda", "rocm", "cpu", "other"})
    n_values: frozenset[int] = frozenset(range(1, 9))
    h_multiple: int = 1
    ops: frozenset[str] = frozenset(OPS)
    double_backward: bool = False
    norm_ops: frozenset[str] = frozenset()

    def reasons(self, p: Problem) -> list[str]:
        out = []
        if p.op not in self.ops:
            out.append(f"does not implement {p.op}")
        elif p.norm and p.op not in self.norm_ops:
            out.append(f"does not fuse the RMSNorm (norm_weight) into {p.op}")
        elif p.create_graph and not self.double_backward:
            out.append(f"its {p.op} is not differentiable: no double backward (create_graph=True); "
                       "the torch backend's is")
        if p.device.type not in self.device_types:
            out.append(f"does not run on {p.device.type} tensors (needs {'/'.join(sorted(self.device_types))})")
        elif platform_of(p.device) not in self.platforms:
            out.append(f"does not run on {platform_of(p.device)} (needs {'/'.join(sorted(self.platforms))})")
        if p.dtype not in self.dtypes:
            names = ", ".join(sorted(str(d).replace("torch.", "") for d in self.dtypes))
            out.append(f"residual dtype {str(p.dtype).replace('torch.', '')} unsupported (supports {names})")
        if p.n not in self.n_values:
            out.append(f"n={p.n} unsupported (supports n in {sorted(self.n_values)})")
        if p.H % self.h_multiple:
            out.append(f"H={p.H} is not a multiple of {self.h_multiple}")
        return out


def _no_reasons(p: Problem) -> Sequence[str]:
    return ()


@dataclasses.dataclass(frozen=True)
class Backend:
    """One backend.

    ``load()`` returns an object (usually a module) with callables ``pre``, ``post``, ``head`` and
    ``fused_post_pre`` taking flattened, validated, contiguous tensors with T >= 1 (see
    ``mhc/backends/__init__.py`` for the exact signatures). ``probe(problem)`` returns the reasons
    it cannot serve beyond what ``capabilities`` says (library missing, no compiler, ...).
    ``notes()`` returns remarks for ``python -m mhc``'s report that are not reasons (e.g. a
    known bug in the installed version). ``distribution``: the installed distribution it needs,
    whose version ``python -m mhc info`` reports (None: nothing beyond torch).
    """

    name: str
    distribution: str | None
    capabilities: Capabilities
    load: Callable[[], Any]
    probe: Callable[[Problem], Sequence[str]] = _no_reasons
    notes: Callable[[], Sequence[str]] = lambda: ()


@dataclasses.dataclass
class Explanation:
    """Which backend would serve a call and why each other would not. ``choice``: the selection
    in force (a name or "auto"); ``chosen``: the backend that serves, or None (the call raises
    BackendError); ``auto_choice``: what auto would choose, where ``choice`` is a name."""

    problem: Problem
    choice: str
    chosen: str | None
    reasons: dict[str, list[str]]
    auto_choice: str | None = None

    def __str__(self) -> str:
        if self.chosen:
            head = f"served by {self.chosen!r}"
        elif self.choice == "auto":
            head = "no backend can serve it"
        else:  # an explicit choice does not fall back: say so, or "no backend" reads as false
            head = (f"{self.choice!r} cannot serve it, and an explicit choice does not fall back (the call raises "
                    "BackendError)" + (f"; auto would choose {self.auto_choice!r}" if self.auto_choice else ""))
        lines = [f"{self.problem.describe()} with backend={self.choice!r}: {head}"]
        for name, why in self.reasons.items():
            mark = "->" if name == self.chosen else (" x" if name == self.choice else "  ")
            lines.append(f" {mark} {name}: " + ("can serve" if not why else "; ".join(why)))
        return "\n".join(lines)


class _State:
    """All mutable registry state, in one place."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.records: dict[str, Backend] | None = None  # filled on first use
        self.broken: dict[str, str] = {}  # name -> why its record could not be loaded
        self.loaded: dict[str, Any] = {}  # name -> load() result
        self.load_errors: dict[str, str] = {}
        self.decisions: dict[tuple, tuple[str, Callable] | BackendError] = {}
        self.env_cache: tuple[str | None, Mapping[str, str]] = (None, {})  # MHC_BACKEND as read

    def clear_decisions(self) -> None:
        """Forget every decision (they are remade on the next call)."""
        with self.lock:
            self.decisions.clear()

    def clear_env(self) -> None:
        self.env_cache = (None, {})


_STATE = _State()
state.register("registry.decisions", _STATE.decisions, "op, choice, device, dtype, n, H, T bucket, create_graph, norm",
               _STATE.clear_decisions)
state.register("registry.env", _STATE, "the raw value of MHC_BACKEND", _STATE.clear_env)
_CONTEXT: contextvars.ContextVar[Mapping[str, str]] = contextvars.ContextVar("mhc_backend", default={})


def _records() -> dict[str, Backend]:
    recs = _STATE.records
    if recs is not None:
        return recs
    with _STATE.lock:
        if _STATE.records is None:
            recs = {}
            for name, mod in _BUILTIN.items():
                try:
                    recs[name] = importlib.import_module(mod).BACKEND
                except CAUGHT as e:  # a broken built-in must not break the others
                    _STATE.broken[name] = f"its record failed to import: {type(e).__name__}: {e}"
            for ep in _entry_points():
                try:
                    rec = ep.load()
                    if not isinstance(rec, Backend):
                        raise TypeError(f"entry point {ep.value!r} is a {type(rec).__name__}, not mhc.registry.Backend")
                    if rec.name in recs:
                        raise ValueError(f"name {rec.name!r} is already taken")
                    recs[rec.name] = rec
                except CAUGHT as e:
                    _STATE.broken[ep.name] = f"entry point {ep.value!r} failed: {type(e).__name__}: {e}"
            _STATE.records = recs
    return _STATE.records


def _entry_points():
    from importlib.metadata import entry_points

    try:
        return list(entry_points(group=ENTRY_POINT_GROUP))
    except CAUGHT:  # a corrupt metadata dir must not break mhc
        return []


def register(backend: Backend, *, replace: bool = False) -> None:
    """Add a backend record at run time (third-party packages use the ``mhc.backends`` entry
    point group instead). Raises ``ValueError`` if the name is taken and ``replace`` is false."""
    if not isinstance(backend, Backend):
        raise TypeError(f"backend must be an mhc.registry.Backend, got {type(backend).__name__}")
    recs = _records()
    with _STATE.lock:
        if backend.name in recs and not replace:
            raise ValueError(f"a backend named {backend.name!r} is already registered")
        if backend.name in ("auto",) or not backend.name.isidentifier():
            raise ValueError(f"invalid backend name {backend.name!r}: use an identifier other than 'auto'")
        recs[backend.name] = backend
        _STATE.loaded.pop(backend.name, None)
        _STATE.load_errors.pop(backend.name, None)
        _STATE.decisions.clear()


def unregister(name: str) -> None:
    """Remove a backend added with :func:`register` (used by tests)."""
    recs = _records()
    with _STATE.lock:
        recs.pop(name, None)
        _STATE.loaded.pop(name, None)
        _STATE.load_errors.pop(name, None)
        _STATE.decisions.clear()


def backend_names() -> list[str]:
    """Every known backend name, including ones whose record is broken."""
    return list(_records()) + [n for n in _STATE.broken if n not in _STATE.records]


def get(name: str) -> Backend:
    """The record called ``name``. Unknown names raise ``ValueError`` listing the known ones."""
    recs = _records()
    if name not in recs:
        if name in _STATE.broken:
            raise BackendError(f"backend {name!r} is unavailable: {_STATE.broken[name]}")
        raise ValueError(f"unknown mhc backend {name!r}; known backends: {', '.join(backend_names())}, or 'auto'")
    return recs[name]


def platform_of(device: torch.device) -> str:
    """``"rocm"``, ``"cuda"``, ``"cpu"`` or ``"other"`` for a tensor device."""
    if device.type == "cuda":
        return "rocm" if torch.version.hip else "cuda"
    return "cpu" if device.type == "cpu" else "other"


def auto_order(platform: str, op: str, T: int) -> tuple[str, ...]:
    """The order ``auto`` tries backends in; the first that can serve wins.

    ROCm: AITER's HIP kernels, then Triton, then torch. CPU and others: torch (the Triton
    interpreter serves CPU tensors only when asked for by name: it is a test tool).
    CUDA: the winners of the H200 grid, benchmarks/results/grid-h200.csv (warm µs, CUDA-graph
    replays; H = 4096 / 7168; T in 1, 8, 64, 512, 4096, 16384; every implementation in one run
    per H; the table is grid-h200.md):

    - ``post``: TileLang, at or under Triton at every T (the two are within 1-2 % at T >= 4096,
      both at 0.99-1.02x the floor; TileLang ahead by 0.1-0.4 µs at T <= 64 and 6-11 % at T = 512).
    - ``head`` with 64 < T < 2048: TileLang (T = 512: 15.3 vs 20.3 µs at H = 4096,
      28.8 vs 32.6 at H = 7168; Triton's figures with the two-pass GEMM's 16 columns,
      head-cols-h200.log and the H = 7168 grid).
    - everything else: Triton (e.g. pre 7.1 vs 20.0 µs at T = 1, 91.2 vs 144.3 at T = 4096,
      594.1 vs 1016.1 at T = 16384, H = 7168; head 136.8 vs 210.8 at T = 4096, H = 7168;
      fused_post_pre 37.2 vs 39.9 at T = 512 and 1079.0 vs 1842.4 at T = 16384, H = 7168, the one
      near-tie being fused_post_pre at T = 64, H = 7168: 24.1 vs 23.9).
    - Backward ops: TileLang has none (its reason), so Triton serves them, then torch.

    Third-party backends come after the built-ins unless named explicitly.
    """
    if platform == "rocm":
        return ("aiter", "triton", "torch")
    if platform == "cuda":
        if op == "post" or (op == "head" and 64 < T < 2048):  # bounds of mhc.plans.T_BOUNDS
            return ("tilelang", "triton", "torch")
        return ("triton", "tilelang", "torch")
    return ("torch",)


def parse_spec(spec: str | None, source: str = ENV_VAR) -> dict[str, str]:
    """Parse a selection string into ``{op or "*": name}``.

    ``"triton"`` -> ``{"*": "triton"}``; ``"pre:aiter,post:triton"`` ->
    ``{"pre": "aiter", "post": "triton"}``; ``"auto"`` or empty -> ``{}``. A bare name and
    per-op items may be mixed (the bare name covers the ops not listed). Raises ``ValueError``
    naming ``source`` for malformed strings or unknown ops.
    """
    out: dict[str, str] = {}
    if spec is None:
        return out
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        if ":" in item:
            op, _, name = (s.strip() for s in item.partition(":"))
            if op not in _ALL_OPS:
                raise ValueError(f"{source}={spec!r}: unknown op {op!r} (ops: {', '.join(_ALL_OPS)})")
        else:
            op, name = "*", item
        if not name or ":" in name:
            raise ValueError(f"{source}={spec!r}: malformed item {item!r}; use NAME or OP:NAME")
        if op in out:
            raise ValueError(f"{source}={spec!r}: {'the default' if op == '*' else op} is given twice")
        out[op] = name
    return out


def _env_choice(op: str) -> str:
    # Parsed once per value of MHC_BACKEND (a change between calls is seen by the next call).
    raw = os.environ.get(ENV_VAR)
    cached_raw, parsed = _STATE.env_cache
    if raw != cached_raw:
        parsed = parse_spec(raw)
        _STATE.env_cache = (raw, parsed)
    if op in _BACKWARD:
        return parsed.get(op) or _bare_backward(parsed.get("*"), op) or "auto"
    return parsed.get(op) or parsed.get("*") or "auto"


def _bare_backward(name: str | None, op: str) -> str | None:
    """``name`` if that bare backend name covers backward ``op`` (its record lists it), else None."""
    if name is None or name == "auto":
        return None
    rec = _records().get(name)
    return name if rec is not None and op in rec.capabilities.ops else None


def current_choice(op: str) -> str:
    """The backend name (or ``"auto"``) that selection resolves to for ``op`` with no
    ``backend=`` argument: the innermost :func:`use_backend`, else ``MHC_BACKEND``, else auto."""
    ctx = _CONTEXT.get()
    if ctx:
        c = (ctx.get(op) or _bare_backward(ctx.get("*"), op)) if op in _BACKWARD else (ctx.get(op) or ctx.get("*"))
        if c:
            return c
    return _env_choice(op)


@contextlib.contextmanager
def use_backend(spec: str | None = None, **per_op: str) -> Iterator[None]:
    """Select backends inside a ``with`` block (context-local: threads and asyncio tasks keep
    their own). ``use_backend("triton")``, ``use_backend("pre:aiter,post:triton")`` or
    ``use_backend(pre="aiter")``. Nested blocks override the outer one op by op; ops a block
    does not name keep the outer choice. ``"auto"`` is a valid name."""
    for op in per_op:
        if op not in _ALL_OPS:
            raise ValueError(f"use_backend: unknown op {op!r} (ops: {', '.join(_ALL_OPS)})")
    new = dict(parse_spec(spec, source="use_backend"))
    new.update(per_op)
    for name in new.values():
        if name != "auto":
            get(name)  # unknown names fail here, at the with statement, not at the first call
    merged = dict(_CONTEXT.get())
    if "*" in new:  # a new default replaces the outer per-op choices too
        merged = {}
    merged.update(new)
    token = _CONTEXT.set(merged)
    try:
        yield
    finally:
        _CONTEXT.reset(token)


def _load(name: str) -> Any | None:
    if name in _STATE.loaded:
        return _STATE.loaded[name]
    if name in _STATE.load_errors:
        return None
    with _STATE.lock:
        try:
            _STATE.loaded[name] = _records()[name].load()
        except CAUGHT as e:
            _STATE.load_errors[name] = f"failed to load: {type(e).__name__}: {e}"
            return None
    return _STATE.loaded[name]


def reasons_for(name: str, p: Problem) -> list[str]:
    """Why backend ``name`` cannot serve ``p`` (empty: it can). Loads the backend if the static
    checks pass, so that a broken install shows up as a reason."""
    if name in _STATE.broken and name not in _records():
        return [_STATE.broken[name]]
    rec = get(name)
    why = rec.capabilities.reasons(p)
    if why:
        return why
    try:
        why = list(rec.probe(p))
    except CAUGHT as e:  # a probe must never take the caller down
        why = [f"probe raised {type(e).__name__}: {e}"]
    if why:
        return why
    loaded = _load(name)
    if loaded is None:
        return [_STATE.load_errors[name]]
    if not callable(getattr(loaded, p.op, None)):  # a plug-in whose load() lacks the op
        return [f"its load() returned {type(loaded).__name__} {getattr(loaded, '__name__', '')!s}".rstrip()
                + f" with no callable {p.op!r}"]
    return []


def _decide(op: str, choice: str, p: Problem) -> tuple[str, Callable] | BackendError:
    if choice != "auto":
        why = reasons_for(choice, p)
        if why:
            return BackendError(f"mhc backend {choice!r} cannot serve {p.describe()}: " + "; ".join(why))
        return choice, getattr(_STATE.loaded[choice], op)
    skipped = []
    known = _records()
    for name in auto_order(platform_of(p.device), op, p.T):
        if name not in known:
            skipped.append(f"{name}: " + _STATE.broken.get(name, "not registered"))
            continue
        why = reasons_for(name, p)
        if not why:
            return name, getattr(_STATE.loaded[name], op)
        skipped.append(f"{name}: " + "; ".join(why))
    return BackendError(f"no mhc backend can serve {p.describe()} (auto): " + " | ".join(skipped))


def select(op: str, device: torch.device, dtype: torch.dtype, n: int, H: int, T: int,
           backend: str | None = None, create_graph: bool = False, norm: bool = False) -> Callable:
    """The callable that serves one call (hot path: one dict lookup once warm).

    ``create_graph``: a backward op whose outputs must be differentiable; ``norm``: the call
    passes ``norm_weight`` (see :class:`Problem`).
    Raises :class:`BackendError` if the chosen backend (or, for auto, every backend) cannot
    serve, and ``ValueError`` for unknown names or a malformed ``MHC_BACKEND``.
    """
    choice = current_choice(op) if backend is None else backend  # "" is a (bad) name, not auto
    key = (op, choice, device, dtype, n, H, t_bucket(T), create_graph, norm)
    hit = _STATE.decisions.get(key)
    if hit is None:
        if choice != "auto":
            get(choice)  # raises ValueError for an unknown name; not cached, so it is always raised
        hit = _decide(op, choice, Problem(op, device, dtype, n, H, T, create_graph, norm))
        _STATE.decisions[key] = hit
    if isinstance(hit, BackendError):
        raise BackendError(str(hit))
    return hit[1]


def explain_problem(p: Problem, backend: str | None = None) -> Explanation:
    """Which backend serves ``p`` under the current selection, and every backend's reasons."""
    choice = current_choice(p.op) if backend is None else backend
    reasons = {}
    for name in backend_names():
        if name in _STATE.broken:
            reasons[name] = [_STATE.broken[name]]
        else:
            reasons[name] = reasons_for(name, p)
    auto_choice = None
    if choice != "auto":
        get(choice)
        auto = _decide(p.op, "auto", p)
        auto_choice = None if isinstance(auto, BackendError) else auto[0]
    hit = _decide(p.op, choice, p)
    chosen = None if isinstance(hit, BackendError) else hit[0]
    return Explanation(p, choice, chosen, reasons, auto_choice)
