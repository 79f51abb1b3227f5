"""The AITER backend: an adapter to AMD's HIP kernels in ``aiter.ops.mhc`` (ROCm only).

Nothing here imports ``aiter`` at module import: detection reads package metadata, and the
kernels are imported by :data:`BACKEND`'s probe and loader, on first use on a ROCm GPU.

Detection (each failure is a readable reason, never an exception):

- the distribution ``amd-aiter`` is installed (its version is read from its metadata). PyPI's
  unrelated ``aiter`` (async iterators, 0.13.x) installs a module named ``aiter`` too; it is
  recognised by its distribution name and refused with an explanation;
- ``aiter.ops.mhc`` imports and has ``mhc_pre`` and ``mhc_post`` (AITER releases on PyPI predate
  mHC);
- ``torch.version.hip`` is set and the tensors are on a GPU (:data:`BACKEND`'s capabilities:
  ``cuda`` device type on the ``rocm`` platform), bf16, n == 4 and H % 256 == 0 (what the
  kernels assert).

The adapter (:class:`AiterAdapter`) maps this package's four ops onto AITER's API, per release:

========================  ===============================================================
``pre``                   ``mhc_pre(residual, fn, hc_scale, hc_base, rms_eps, hc_pre_eps,
                          hc_sinkhorn_eps, hc_post_mult_value, sinkhorn_repeat)``
``post``                  ``mhc_post(out, x, residual, post_layer_mix, comb_res_mix)`` into an
                          ``out`` allocated with :func:`mhc.backends.empty`
``head``                  >= 0.1.14: ``mhc_pre(..., sinkhorn_repeat=0)`` with the compact
                          (n, n*H) ``fn``; older: ``fn``/``hc_base``/``hc_scale`` zero-padded to
                          pre's (2n+n*n) layout, cached per weight in :data:`HEAD_PAD_CACHE`
``fused_post_pre``        ``mhc_fused_post_pre`` where the module has it (>= 0.1.16; its
                          outputs come back reordered), else ``post`` then ``pre``
fused RMSNorm             >= 0.1.15: ``norm_weight`` (as bf16), ``norm_eps`` passed on to
                          ``mhc_pre`` / ``mhc_fused_post_pre`` (``mhc_pre_big_fuse_rmsnorm``)
========================  ===============================================================

Quirks handled here (each is covered by a test in ``tests/test_aiter.py``):

- releases <= 0.1.13 allocate their outputs without a ``device=`` argument, so they are called
  under ``torch.device(residual.device)`` (and, like every release, under
  :func:`mhc.backends.device_guard`);
- T == 0 never reaches AITER (its split-K heuristic divides by zero): the op layer returns
  early, and the adapter also returns empty outputs if it is called directly;
- n != 4 or H % 256 != 0 are reasons (AITER asserts), so ``auto`` moves on to Triton, then
  torch; a direct call raises ``ValueError`` instead of reaching the assertion;
- releases < 0.1.14 have a sum-of-squares race at large T: :data:`BACKEND`'s ``notes()`` says
  so in ``python -m mhc info``, and loading such a release warns once.

The fused RMSNorm (``norm_weight`` of ``pre`` and ``fused_post_pre``) is served from 0.1.15 on,
for H in :data:`NORM_H` (the sizes AITER's ``mhc_pre_big_fuse_rmsnorm`` is instantiated for; the
probe gives the reason otherwise, and for older releases). AITER's kernel (the same from v0.1.15
to v0.1.20.post1) rounds the collapse to bf16 before normalising it (the sum of squares is of
the unrounded fp32 collapse) and rounds the product again: two roundings where mhc's contract has
one: 2.3e-3 relative to the fp64 reference on the tests' stand-in (H = 1280 and 4096), within
the bf16 tolerance (1e-2, ``mhc.checking``). It reads the weight as bf16 whatever the tensor's
dtype (no check), so the adapter rounds an fp32 weight to bf16 (2.9e-3 then, still within it).
Outside the numeric domain its norm factor is ``rsqrt(inf) = 0``, not NaN (as for its mixes).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.metadata as md
import importlib.util
import re
import threading
import warnings
import weakref
from collections.abc import Sequence
from typing import Any

import torch

from mhc import state
from mhc.backends import device_guard, empty
from mhc.registry import CAUGHT, Backend, Capabilities, Problem

__all__ = ["BACKEND", "AiterAdapter", "PaddedHeadWeights", "HEAD_PAD_CACHE", "detect", "DISTRIBUTION",
           "MIN_GOOD_VERSION", "NORM_MIN_VERSION", "NORM_H"]

#: The distribution AMD's AITER installs (module ``aiter``).
DISTRIBUTION = "amd-aiter"
#: PyPI's unrelated async-iterator package, which also installs a module ``aiter``.
_IMPOSTOR = "aiter"
#: First release with a device-aware allocation, no sum-of-squares race, and compact ``head``.
MIN_GOOD_VERSION = (0, 1, 14)
_BUILD_HINT = "build AITER from a tag >= v0.1.14 (see README.md, 'AITER on ROCm')"
N_STREAMS = 4
H_MULTIPLE = 256


def _parse_version(text: str) -> tuple[int, int, int] | None:
    """``"0.1.14"``, ``"0.1.14.post1"``, ``"0.1.16.dev3+g1a2b3c"`` -> (0, 1, 14) etc.; None if
    the string does not start with three numbers."""
    m = re.match(r"\s*v?(\d+)\.(\d+)\.(\d+)", text)
    return (int(m[1]), int(m[2]), int(m[3])) if m else None


def _dist_version(name: str) -> str | None:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None
    except CAUGHT:  # corrupt metadata must not take mhc down
        return None


def _module_findable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except CAUGHT:  # a blocked (sys.modules[name] = None) or broken package
        return False


@dataclasses.dataclass(frozen=True)
class _Install:
    """What detection found. ``reasons`` empty means ``module`` is a usable ``aiter.ops.mhc``."""

    version: str | None
    parsed: tuple[int, int, int] | None
    module: Any
    reasons: tuple[str, ...]


def _impostor_reason() -> str | None:
    """A reason when PyPI's unrelated ``aiter`` is what provides the module ``aiter``."""
    v = _dist_version(_IMPOSTOR)
    if v is None:
        return None
    return (f"the module 'aiter' here comes from PyPI's unrelated package 'aiter' {v} (async "
            f"iterators), not AMD's AITER (distribution {DISTRIBUTION}): `pip uninstall aiter`, then {_BUILD_HINT}")


def _metadata_reasons() -> tuple[str | None, list[str]]:
    """(amd-aiter's version or None, reasons found from metadata alone: imports nothing)."""
    version = _dist_version(DISTRIBUTION)
    impostor = _impostor_reason()
    if version is None:
        if impostor:
            return None, [impostor]
        if _module_findable("aiter"):
            return None, [f"a module 'aiter' is importable but the distribution {DISTRIBUTION} is not installed, "
                          f"so it is not AMD's AITER or its version cannot be read: {_BUILD_HINT}"]
        return None, [f"AMD's AITER is not installed (distribution {DISTRIBUTION}): {_BUILD_HINT}"]
    # Both installed: whichever comes first on sys.path wins the module name; say so if the
    # import below fails.
    return version, ([impostor] if impostor else [])


def detect() -> _Install:
    """Find a usable ``aiter.ops.mhc``; never raises. Imports ``aiter.ops.mhc`` only when the
    metadata says AMD's AITER is installed."""
    version, reasons = _metadata_reasons()
    if version is None:
        return _Install(None, None, None, tuple(reasons))
    try:
        mod = importlib.import_module("aiter.ops.mhc")
    except CAUGHT as e:  # ImportError, or anything a broken install raises at import (sys.exit too)
        why = [f"{DISTRIBUTION} {version} is installed but `import aiter.ops.mhc` failed "
               f"({type(e).__name__}: {e}): it has no mHC kernels or is broken; {_BUILD_HINT}"]
        return _Install(version, _parse_version(version), None, tuple(why + reasons))
    missing = [f for f in ("mhc_pre", "mhc_post") if not callable(getattr(mod, f, None))]
    if missing:
        why = f"{DISTRIBUTION} {version}: aiter.ops.mhc has no {' or '.join(missing)}; {_BUILD_HINT}"
        return _Install(version, _parse_version(version), None, (why,))
    # The mHC module imported, so the impostor (if also installed) is not shadowing it.
    return _Install(version, _parse_version(version), mod, ())


#: First release whose ``mhc_pre`` takes ``norm_weight``/``norm_eps`` (``mhc_fused_post_pre``
#: takes them from its first release, 0.1.16).
NORM_MIN_VERSION = (0, 1, 15)
#: The hidden sizes ``mhc_pre_big_fuse_rmsnorm`` is compiled for (v0.1.15 to v0.1.20.post1); any
#: other H raises inside AITER.
NORM_H = (1280, 2560, 4096, 7168)


def _norm_reasons(p: Problem, found: _Install) -> list[str]:
    if _is_old(found.parsed) or found.parsed < NORM_MIN_VERSION:
        return [f"the fused RMSNorm (norm_weight) needs {DISTRIBUTION} >= 0.1.15, found {found.version}"]
    if p.H not in NORM_H:
        return [f"AITER's fused RMSNorm (mhc_pre_big_fuse_rmsnorm) is built for H in {NORM_H} only, got H={p.H}"]
    return []


def _probe(p: Problem) -> Sequence[str]:
    # Reached only when the capabilities pass (a ROCm GPU, bf16, n == 4, H % 256 == 0).
    found = detect()
    if found.reasons or not p.norm:
        return found.reasons
    return _norm_reasons(p, found)


def _is_old(parsed: tuple[int, int, int] | None) -> bool:
    # An unparseable version gets the cautious treatment of the old releases (device context,
    # padded head): both are correct on every release, only slower.
    return parsed is None or parsed < MIN_GOOD_VERSION


def _notes() -> Sequence[str]:
    """Remarks for ``python -m mhc info``, from metadata only (no import, so they are cheap and
    shown on every platform): the race in old releases, and a shadowing PyPI ``aiter``."""
    version, reasons = _metadata_reasons()
    out = []
    if version is not None and _is_old(_parse_version(version)):
        out.append(f"{DISTRIBUTION} {version} < 0.1.14: its mhc_pre has a sum-of-squares race at large T "
                   f"(a wrong RMS scale, silently); upgrade: {_BUILD_HINT}")
    if version is not None and _parse_version(version) is None:
        out.append(f"{DISTRIBUTION} version {version!r} is not of the form X.Y.Z; treated as < 0.1.14")
    # Say why AITER is unusable even where the platform check hides the probe (CPU, CUDA), but
    # only when something called aiter is present: a plain absence is no news off ROCm.
    if version is None and reasons and (_dist_version(_IMPOSTOR) or _module_findable("aiter")):
        out.extend(reasons)
    elif version is not None and _dist_version(_IMPOSTOR):
        out.extend(reasons)
    return out


# --- the padded head weights for releases < 0.1.14 ------------------------------------------------


@dataclasses.dataclass
class _PadEntry:
    refs: tuple[weakref.ref, ...]
    stamp: tuple[int, ...]
    padded: tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class PaddedHeadWeights:
    """``head``'s compact weights padded to ``pre``'s layout, one entry per weight triple.

    AITER < 0.1.14's ``mhc_pre`` only takes the full layout, so ``head`` runs it with ``fn``
    (n, n*H) zero-padded to (2n+n*n, n*H), ``hc_base`` (n,) to (2n+n*n,) and ``hc_scale`` (1,) to
    (3,) (the zero rows make post/comb finite and unused). Rebuilding them on every call would
    read and write the weight each time, so they are cached here.

    Keyed by the identity of the three tensors, and an entry is used only if each weak
    reference still points at the same live tensor and its ``(_version, data_ptr)`` is what it
    was when the entry was built: an in-place update (``fn.mul_``, ``copy_`` under no_grad) bumps
    ``_version``, and ``fn.data = other`` changes ``data_ptr``, so neither gives a stale answer.
    Entries leave when a weight is freed (weakref callback), and the oldest leave past
    ``maxsize``. Inference tensors have no version counter, so they are padded on every call,
    not cached (correct, merely slower). Thread-safe. ``hits``/``misses`` are for inspection.
    """

    def __init__(self, maxsize: int = 64) -> None:
        self.maxsize = maxsize
        self.hits = 0
        self.misses = 0
        self._lock = threading.Lock()
        self._entries: dict[tuple[int, int, int], _PadEntry] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.hits = self.misses = 0

    @staticmethod
    def _pad(fn: torch.Tensor, hc_scale: torch.Tensor, hc_base: torch.Tensor, n: int):
        n3 = 2 * n + n * n
        fn_full = fn.new_zeros((n3, fn.shape[1]))
        fn_full[:n].copy_(fn)
        scale_full = torch.cat([hc_scale, hc_scale.new_zeros(2)])
        base_full = torch.cat([hc_base, hc_base.new_zeros(n3 - n)])
        return fn_full, scale_full, base_full

    def get(self, fn: torch.Tensor, hc_scale: torch.Tensor, hc_base: torch.Tensor):
        """``(fn (2n+n*n, n*H), hc_scale (3,), hc_base (2n+n*n,))`` on fn's device and dtype,
        for ``fn`` (n, n*H), ``hc_scale`` (1,), ``hc_base`` (n,)."""
        n = fn.shape[0]
        ts = (fn, hc_scale, hc_base)
        if any(t.is_inference() for t in ts):
            return self._pad(fn, hc_scale, hc_base, n)
        key = (id(fn), id(hc_scale), id(hc_base))
        stamp = tuple(t._version for t in ts) + tuple(t.data_ptr() for t in ts)
        entry = self._entries.get(key)
        if (entry is not None and entry.stamp == stamp
                and all(r() is t for r, t in zip(entry.refs, ts))):
            self.hits += 1
            return entry.padded
        padded = self._pad(fn, hc_scale, hc_base, n)

        def forget(_ref, key=key, entries=self._entries):
            # Fires when any of the three tensors is freed, before its id can be reused.
            e = entries.get(key)
            if e is not None and any(r is _ref for r in e.refs):
                entries.pop(key, None)

        with self._lock:
            self.misses += 1
            self._entries.pop(key, None)
            self._entries[key] = _PadEntry(tuple(weakref.ref(t, forget) for t in ts), stamp, padded)
            while len(self._entries) > self.maxsize:
                self._entries.pop(next(iter(self._entries)))
        return padded


#: The one cache of padded head weights (used with AITER < 0.1.14 only).
HEAD_PAD_CACHE = state.register("aiter.head_pad", PaddedHeadWeights(), "ids of (fn, hc_scale, hc_base)")


# --- the adapter --------------------------------------------------------------------------------


@contextlib.contextmanager
def _old_release_scope(device: torch.device):
    # <= 0.1.13 calls torch.empty(...) without device=: make the input's device the default for
    # the duration of the call (a TorchFunctionMode; it costs host time, so newer releases skip it).
    with device_guard(device), device:
        yield


def _check_shape(residual: torch.Tensor) -> None:
    # AITER asserts these; a direct call (bypassing the registry's reasons) gets a clear error.
    n, H = residual.shape[1], residual.shape[2]
    if n != N_STREAMS or H % H_MULTIPLE:
        raise ValueError(f"residual: AITER's mHC kernels need n == {N_STREAMS} and H % {H_MULTIPLE} == 0, "
                         f"got n={n}, H={H}; use another backend (triton, torch)")


class AiterAdapter:
    """This package's backend interface (``mhc/backends/__init__.py``) on top of one
    ``aiter.ops.mhc`` module of release ``version``.

    Every method takes contiguous tensors with the leading dims flattened: ``residual``
    (T, 4, H) bf16, ``x`` (T, H) bf16, ``fn`` (24, 4*H) fp32 (``head``: (4, 4*H)), ``hc_scale``
    (3,) fp32 (``head``: (1,)), ``hc_base`` (24,) fp32 (``head``: (4,)), ``post_mix``
    (T, 4, 1) fp32, ``comb_mix`` (T, 4, 4) fp32, H % 256 == 0. Nothing is mutated except the
    outputs. T == 0 returns empty outputs without calling AITER.
    """

    def __init__(self, module: Any, version: tuple[int, int, int] | None) -> None:
        self.module = module
        self.version = version
        old = _is_old(version)
        self._scope = _old_release_scope if old else device_guard
        self._compact_head = not old
        # Feature test rather than version test: a backport or a fork may have it earlier.
        self._fused = getattr(module, "mhc_fused_post_pre", None)

    def __repr__(self) -> str:
        v = ".".join(map(str, self.version)) if self.version else "unknown"
        return f"AiterAdapter(aiter {v}, compact_head={self._compact_head}, fused={self._fused is not None})"

    @staticmethod
    def _empty_pre(residual: torch.Tensor):
        T, n, H = residual.shape
        dev = residual.device
        return (empty((T, n, 1), torch.float32, dev), empty((T, n, n), torch.float32, dev),
                empty((T, H), residual.dtype, dev))

    @staticmethod
    def _norm(residual, norm) -> dict:
        """AITER's ``norm_weight``/``norm_eps`` keywords from the op layer's trailing ``(norm_weight
        (H,) bf16 or fp32, norm_eps)``, or none: AITER reads the weight as bf16 whatever its dtype."""
        if not norm:
            return {}
        return dict(norm_weight=norm[0].to(residual.dtype), norm_eps=norm[1])

    def pre(self, residual, fn, hc_scale, hc_base, rms_eps, hc_pre_eps, hc_sinkhorn_eps, hc_post_mult_value,
            sinkhorn_repeat, *norm):
        """Returns ``post_mix`` (T, 4, 1) fp32, ``comb_mix`` (T, 4, 4) fp32, ``layer_input`` (T, H) bf16.
        ``norm``: empty, or ``(norm_weight (H,), norm_eps)``, the fused RMSNorm."""
        _check_shape(residual)
        if residual.shape[0] == 0:
            return self._empty_pre(residual)
        with self._scope(residual.device):
            return self.module.mhc_pre(residual, fn, hc_scale, hc_base, rms_eps, hc_pre_eps, hc_sinkhorn_eps,
                                       hc_post_mult_value, sinkhorn_repeat, **self._norm(residual, norm))

    def post(self, x, residual, post_mix, comb_mix):
        """Returns the new residual (T, 4, H) bf16 (a fresh tensor that AITER writes)."""
        _check_shape(residual)
        out = empty(residual.shape, residual.dtype, residual.device)
        if residual.shape[0] == 0:
            return out
        with self._scope(residual.device):
            self.module.mhc_post(out, x, residual, post_mix, comb_mix)
        return out

    def head(self, residual, fn, hc_scale, hc_base, rms_eps, hc_eps):
        """Returns (T, H) bf16. ``hc_eps`` plays ``hc_pre_eps``; post/comb outputs are dropped."""
        _check_shape(residual)
        if residual.shape[0] == 0:
            return empty((0, residual.shape[2]), residual.dtype, residual.device)
        with self._scope(residual.device):
            if self._compact_head:
                # sinkhorn_repeat=0 tells AITER that fn has n rows and only pre is wanted.
                _, _, out = self.module.mhc_pre(residual, fn, hc_scale, hc_base, rms_eps, hc_eps, 1e-6, 1.0, 0)
            else:
                fn_f, scale_f, base_f = HEAD_PAD_CACHE.get(fn, hc_scale, hc_base)
                # One Sinkhorn round (the minimum these releases take) on the zero comb rows.
                _, _, out = self.module.mhc_pre(residual, fn_f, scale_f, base_f, rms_eps, hc_eps, 1e-6, 1.0, 1)
        return out

    def fused_post_pre(self, x, residual, post_mix, comb_mix, fn, hc_scale, hc_base, rms_eps, hc_pre_eps,
                       hc_sinkhorn_eps, hc_post_mult_value, sinkhorn_repeat, *norm):
        """Returns ``(new_residual (T, 4, H) bf16, post_mix (T, 4, 1), comb_mix (T, 4, 4), layer_input (T, H))``.
        ``norm`` as for :meth:`pre`."""
        _check_shape(residual)
        if residual.shape[0] == 0:
            return (empty(residual.shape, residual.dtype, residual.device), *self._empty_pre(residual))
        if self._fused is None:
            new = self.post(x, residual, post_mix, comb_mix)
            return (new, *self.pre(new, fn, hc_scale, hc_base, rms_eps, hc_pre_eps, hc_sinkhorn_eps,
                                   hc_post_mult_value, sinkhorn_repeat, *norm))
        with self._scope(residual.device):
            # AITER returns (post_mix, comb_mix, layer_input, next_residual).
            p, c, li, new = self._fused(x, residual, post_mix, comb_mix, fn, hc_scale, hc_base, rms_eps,
                                        hc_pre_eps, hc_sinkhorn_eps, hc_post_mult_value, sinkhorn_repeat,
                                        **self._norm(residual, norm))
        return new, p, c, li


def _load() -> AiterAdapter:
    found = detect()
    if found.reasons:
        raise ImportError("; ".join(found.reasons))
    if _is_old(found.parsed):
        warnings.warn(f"mhc: {DISTRIBUTION} {found.version} < 0.1.14 has a sum-of-squares race in mhc_pre at "
                      f"large T; upgrade ({_BUILD_HINT})", RuntimeWarning, stacklevel=2)
    return AiterAdapter(found.module, found.parsed)


BACKEND = Backend(
    name="aiter",
    distribution=DISTRIBUTION,
    capabilities=Capabilities(
        device_types=frozenset({"cuda"}),
        platforms=frozenset({"rocm"}),
        dtypes=frozenset({torch.bfloat16}),
        n_values=frozenset({N_STREAMS}),
        h_multiple=H_MULTIPLE,
        # from 0.1.15 and for H in NORM_H: the probe gives the reason otherwise
        norm_ops=frozenset({"pre", "fused_post_pre"}),
    ),
    load=_load,
    probe=_probe,
    notes=_notes,
)
