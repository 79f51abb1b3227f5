"""Run a Hugging Face transformers DeepSeek-V4 model's mHC through the mhc ops.

::

    model = DeepseekV4ForCausalLM.from_pretrained(...)
    handle = mhc.integrations.transformers.apply(model)   # mHC now runs on mhc.pre/post/head/...
    handle.remove()                                       # or mhc.integrations.transformers.undo(model)

What :func:`apply` replaces (instance attributes ``forward``; the classes are not touched):

- every ``DeepseekV4DecoderLayer.forward``: the attention site's ``attn_hc`` and the
  ``input_layernorm`` after it become :func:`mhc.pre` with ``norm_weight``; the attention site's
  post, the FFN site's ``ffn_hc`` and the ``post_attention_layernorm`` after it become one
  :func:`mhc.fused_post_pre` with ``norm_weight``; the FFN site's post becomes :func:`mhc.post`.
  The sublayer norms (``DeepseekV4RMSNorm``) are not called: their ``weight`` and
  ``variance_epsilon`` are read on every call and passed as ``norm_weight``/``norm_eps``. The FFN site's post
  and the next layer's pre are *not* fused: ``DeepseekV4Model.forward`` hands only the residual
  from one layer to the next (and records it as that layer's hidden state, and gradient
  checkpointing cuts there), so fusing across that boundary would mean replacing the model's own
  forward with a copy of it, or passing pre's outputs between layers on the side. Neither is
  clean; the cost is one extra read of the residual per layer.
- ``DeepseekV4Model.hc_head.forward``: :func:`mhc.head`.

The math mapped (transformers 5.17.0, ``modeling_deepseek_v4.py``), per hyper-connection module
``hc`` (``attn_hc``/``ffn_hc``):

- ``rms_eps = hc.input_norm.eps`` (``config.rms_norm_eps``): the model RMS-normalises the
  flattened streams before ``F.linear(fn)``; mhc scales the GEMM's result by the same per-token
  factor (exact in real arithmetic, fp32 rounding apart).
- ``hc_pre_eps = hc_sinkhorn_eps = hc.hc_eps``; ``hc_post_mult_value = 2.0`` (the source's
  ``2 * torch.sigmoid``); ``sinkhorn_repeat = hc.hc_sinkhorn_iters`` (same Sinkhorn: softmax
  over the last dim + eps, divide by column sums, then ``iters - 1`` row/column rounds; the model's
  ``iters <= 0`` runs the same as 1, so it maps to 1).
- post: the model computes ``post.to(dtype) * out + comb.to(dtype).T @ streams`` with
  ``comb[..., i, j]`` from source stream ``i`` to destination ``j``, which is mhc's convention.
  The model rounds ``post``, ``comb`` and every product and sum to the model dtype; mhc computes in
  fp32 and rounds once. In fp32 the results agree to rounding; in bf16 mhc's is the more
  accurate of the two, and they differ by a few bf16 ulps per site (the tests' table states the
  logits' tolerance).
- head: ``rms_eps = hc_head.input_norm.eps``, ``hc_eps = hc_head.eps``.
- the sublayer norm: the model rounds the collapse to the model dtype, normalises it in fp32,
  rounds the result, and multiplies it by its weight in the model dtype (a third rounding in
  bf16); mhc normalises the unrounded fp32 collapse and multiplies by the weight in fp32 before
  its one rounding (``mhc.reference.pre``). In fp32 the two agree to rounding.
- ``fn``, ``base``, ``scale`` are read from the modules on every call (no copies: an optimiser step
  or ``load_state_dict`` is seen) and cast to fp32 when stored in another dtype, as the model's
  ``self.fn.float()`` and type promotion do; gradients flow back through the cast.

Refusals (:class:`UnsupportedModelError`, never a silent fallback to the model's own code): a
model that is not a ``DeepseekV4ForCausalLM``/``DeepseekV4Model``; a transformers whose
``DeepseekV4DecoderLayer``, ``DeepseekV4HyperConnection``, ``DeepseekV4HyperHead``,
``DeepseekV4UnweightedRMSNorm`` or ``DeepseekV4RMSNorm`` ``forward`` differs in source from the one mapped above (whatever
its version string); a module whose ``forward`` was replaced on the instance or whose class
overrides it; forward or backward hooks on the modules the patched code bypasses (``attn_hc``,
``ffn_hc`` and the ``input_norm`` modules and the sublayer norms, whose hooks would silently stop
running), at :func:`apply` and, for hooks registered later, on every patched call; a model
already patched. Hooks on the decoder layers and ``hc_head`` themselves run as before.

A patched model pickles (``pickle``, ``torch.save`` of the whole model, ``copy.deepcopy``): the
instance forwards are ``functools.partial`` objects of this module's functions, so loading it
needs mhc installed. ``save_pretrained`` writes the weights and config only, which plain
transformers loads.
Backend selection is mhc's (``MHC_BACKEND``, :func:`mhc.use_backend`, the registry): an op
that cannot be served raises :class:`mhc.BackendError` from inside the model's forward.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import textwrap

import torch

import mhc
from mhc.validation import MAX_SINKHORN_REPEAT, mix_dtype

__all__ = ["apply", "undo", "cache_tensors", "Handle", "UnsupportedModelError", "TESTED_VERSION"]

#: The transformers release whose DeepSeek-V4 code is mapped and tested (the ``transformers`` extra).
TESTED_VERSION = "5.17.0"

#: sha256 of each mapped ``forward``'s dedented source in transformers 5.17.0. A release whose
#: source differs is refused even if its version string matches, and accepted if it does not.
_SOURCE_SHA256 = {
    "DeepseekV4DecoderLayer": "096ea78342e5dd25fdbdab3c5dabf2e1083453c78a6dd2347c866653b2ddd88a",
    "DeepseekV4HyperConnection": "6b8e4235372258c8a02408734098b38e807c8a0530fccd8f70d211ff24720425",
    "DeepseekV4HyperHead": "6529deb6189b5a514e694a2c2c3033245035c0b252d1c3140fcd451bcd83f0bd",
    "DeepseekV4UnweightedRMSNorm": "60c6c36f6aceb4749e726893f18b3e81a7d7034e2815745f99321f4db967ff9c",
    "DeepseekV4RMSNorm": "d676bfe9af0e524dad25c11faa7c7c4c625df3d426848208d100949dd659b0a0",
}

#: The source multiplies post's sigmoid by this literal (``2 * torch.sigmoid``), pinned by the hash.
_POST_MULT = 2.0


class UnsupportedModelError(TypeError):
    """The model, or the transformers code it runs, is not the DeepSeek-V4 mHC code that
    :func:`apply` maps onto the mhc ops."""


def _modeling():
    try:
        import transformers
        from transformers.models.deepseek_v4 import modeling_deepseek_v4 as m
    except ImportError as e:
        raise UnsupportedModelError(
            f"mhc.integrations.transformers needs transformers with DeepSeek-V4 "
            f"(pip install 'mhc-kernels[transformers]', transformers=={TESTED_VERSION}): {e}") from e
    return transformers.__version__, m


def _source_sha256(fn) -> str | None:
    try:
        src = inspect.getsource(fn)
    except (OSError, TypeError):
        return None
    return hashlib.sha256(textwrap.dedent(src).encode()).hexdigest()


def _check_module(module: torch.nn.Module, name: str, cls, version: str, hooks_bypassed: bool) -> None:
    """Refuse ``module`` unless it is a ``cls`` running ``cls``'s mapped ``forward``."""
    if not isinstance(module, cls):
        raise UnsupportedModelError(f"{name} is a {type(module).__qualname__}, not a {cls.__name__}")
    if "forward" in module.__dict__:
        raise UnsupportedModelError(
            f"{name}.forward was replaced on the instance (by mhc.integrations.transformers.apply, "
            f"or something else): undo that first")
    got = _source_sha256(type(module).forward)
    want = _SOURCE_SHA256[cls.__name__]
    if got != want:
        where = (cls.__name__ if type(module) is cls else f"{type(module).__qualname__} (a subclass of {cls.__name__})")
        raise UnsupportedModelError(
            f"{where}.forward in transformers {version} is not the mHC code mhc maps onto its ops "
            f"(source sha256 {got and got[:12]}, expected {want[:12]} from transformers {TESTED_VERSION}); "
            f"refusing rather than changing the model's output")
    if hooks_bypassed:
        _refuse_hooks(name, module)


def _refuse_hooks(name: str, module: torch.nn.Module) -> None:
    """Raise if ``module``, which the patched code computes without calling, has hooks: they would
    silently not run. Checked by :func:`apply` and again on every patched call, as hooks
    registered after :func:`apply` would be skipped just the same."""
    if module._forward_hooks or module._forward_pre_hooks or module._backward_hooks or module._backward_pre_hooks:
        raise UnsupportedModelError(
            f"{name} has forward or backward hooks; the model patched by mhc.integrations.transformers.apply "
            f"computes {name}'s result without calling it, so they would not run: remove them, or undo the "
            f"patch (mhc.integrations.transformers.undo) to run the model's own code")


#: The submodules that each patched forward computes without calling (its own attribute paths).
_LAYER_BYPASSED = ("attn_hc", "attn_hc.input_norm", "ffn_hc", "ffn_hc.input_norm", "input_layernorm",
                   "post_attention_layernorm")
_HEAD_BYPASSED = ("input_norm",)


def _refuse_bypassed_hooks(module: torch.nn.Module, paths) -> None:
    for path in paths:
        _refuse_hooks(f"{type(module).__name__}.{path}", module.get_submodule(path))


def _check_hc(hc, name: str, m, version: str) -> None:
    _check_module(hc, name, m.DeepseekV4HyperConnection, version, hooks_bypassed=True)
    _check_module(hc.input_norm, f"{name}.input_norm", m.DeepseekV4UnweightedRMSNorm, version, hooks_bypassed=True)
    iters = hc.hc_sinkhorn_iters
    if not isinstance(iters, int) or isinstance(iters, bool) or iters > MAX_SINKHORN_REPEAT:
        raise UnsupportedModelError(
            f"{name}.hc_sinkhorn_iters = {iters!r}: mhc's Sinkhorn takes an int number of iterations, "
            f"at most {MAX_SINKHORN_REPEAT}")


def _mix_params(module, names, residual):
    dt = mix_dtype(residual.dtype)
    return [getattr(module, p).to(dt) for p in names]


def _pre_scalars(hc) -> tuple:
    """pre's scalars for a ``DeepseekV4HyperConnection`` (read per call, as the model does)."""
    return (hc.input_norm.eps, hc.hc_eps, hc.hc_eps, _POST_MULT, max(1, hc.hc_sinkhorn_iters))


def _norm(norm, residual) -> tuple:
    """``(norm_weight, norm_eps)`` of a ``DeepseekV4RMSNorm`` for the mhc ops: its own weight
    (read per call, so gradients reach it) where the ops take its dtype (the residual's, or the
    mix dtype), else cast to the residual's dtype, as the model's product promotes."""
    w = norm.weight
    if w.dtype != residual.dtype and w.dtype != mix_dtype(residual.dtype):
        w = w.to(residual.dtype)
    return w, norm.variance_epsilon


def _layer_forward(self, hidden_states, input_ids=None, **kwargs):
    """``DeepseekV4DecoderLayer.forward`` on the mhc ops (bound to the layer by :func:`apply`):
    the sublayer norms are fused into ``pre``/``fused_post_pre`` (``norm_weight``)."""
    _refuse_bypassed_hooks(self, _LAYER_BYPASSED)
    a, f = self.attn_hc, self.ffn_hc
    post_mix, comb_mix, normed = mhc.pre(hidden_states, *_mix_params(a, ("fn", "scale", "base"), hidden_states),
                                         *_pre_scalars(a), *_norm(self.input_layernorm, hidden_states))
    attn_output, _ = self.self_attn(normed, **kwargs)
    hidden_states, post_mix, comb_mix, normed = mhc.fused_post_pre(
        attn_output, hidden_states, post_mix, comb_mix,
        *_mix_params(f, ("fn", "scale", "base"), hidden_states), *_pre_scalars(f),
        *_norm(self.post_attention_layernorm, hidden_states))
    mlp_output = self.mlp(normed, input_ids=input_ids)
    return mhc.post(mlp_output, hidden_states, post_mix, comb_mix)


def _head_forward(self, x):
    """``DeepseekV4HyperHead.forward`` on :func:`mhc.head` (bound to the head by :func:`apply`)."""
    _refuse_bypassed_hooks(self, _HEAD_BYPASSED)
    return mhc.head(x, *_mix_params(self, ("hc_fn", "hc_scale", "hc_base"), x), self.input_norm.eps, self.eps)


_OURS = (_layer_forward, _head_forward)


class Handle:
    """Returned by :func:`apply`; :meth:`remove` undoes it (same as :func:`undo`)."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def remove(self) -> None:
        undo(self.model)

    def __enter__(self) -> Handle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def _base_model(model, m):
    if isinstance(model, m.DeepseekV4ForCausalLM):
        return model.model, "model"
    if isinstance(model, m.DeepseekV4Model):
        return model, ""
    raise UnsupportedModelError(
        f"mhc.integrations.transformers.apply supports DeepseekV4ForCausalLM and DeepseekV4Model, "
        f"got {type(model).__qualname__}")


def _bind(forward, module: torch.nn.Module) -> functools.partial:
    """``forward`` bound to ``module`` as its instance ``forward``. A ``functools.partial`` of a
    module-level function pickles by the function's name and the module object, so a patched
    model survives ``pickle``, ``torch.save``/``torch.load`` and ``copy.deepcopy`` (a bound method
    pickles as ``getattr(module, forward.__name__)``, which fails on load)."""
    return functools.partial(forward, module)


def _patched(module) -> bool:
    fwd = module.__dict__.get("forward")
    return isinstance(fwd, functools.partial) and fwd.func in _OURS


def apply(model: torch.nn.Module) -> Handle:
    """Make ``model`` (a ``DeepseekV4ForCausalLM`` or ``DeepseekV4Model``) run its mHC through
    :func:`mhc.pre`, :func:`mhc.fused_post_pre`, :func:`mhc.post` and :func:`mhc.head`.

    Mutates ``model``'s decoder layers and ``hc_head`` (their instance ``forward``); parameters
    and buffers are untouched. Checks everything before changing anything: on
    :class:`UnsupportedModelError` the model is left as it was. Returns a :class:`Handle` whose
    ``remove()`` restores the model's own forwards (outputs bit for bit as before).
    """
    version, m = _modeling()
    base, prefix = _base_model(model, m)
    if any(_patched(mod) for mod in model.modules()):
        raise UnsupportedModelError("mhc.integrations.transformers.apply: this model is already patched; "
                                    "undo(model) first")
    p = f"{prefix}." if prefix else ""
    for i, layer in enumerate(base.layers):
        name = f"{p}layers.{i}"
        _check_module(layer, name, m.DeepseekV4DecoderLayer, version, hooks_bypassed=False)
        _check_hc(layer.attn_hc, f"{name}.attn_hc", m, version)
        _check_hc(layer.ffn_hc, f"{name}.ffn_hc", m, version)
        for norm in ("input_layernorm", "post_attention_layernorm"):  # fused into pre: never called
            _check_module(getattr(layer, norm), f"{name}.{norm}", m.DeepseekV4RMSNorm, version, hooks_bypassed=True)
    _check_module(base.hc_head, f"{p}hc_head", m.DeepseekV4HyperHead, version, hooks_bypassed=False)
    _check_module(base.hc_head.input_norm, f"{p}hc_head.input_norm", m.DeepseekV4UnweightedRMSNorm, version,
                  hooks_bypassed=True)
    for layer in base.layers:
        layer.forward = _bind(_layer_forward, layer)
    base.hc_head.forward = _bind(_head_forward, base.hc_head)
    return Handle(model)


def undo(model: torch.nn.Module) -> None:
    """Restore the forwards :func:`apply` replaced in ``model`` (a no-op on an unpatched model)."""
    for mod in model.modules():
        if _patched(mod):
            del mod.__dict__["forward"]


def cache_tensors(cache) -> list[torch.Tensor]:
    """Every tensor a transformers cache (``DynamicCache`` and the like: ``cache.layers``, each
    layer's attributes, nested dicts) holds now. A CUDA graph captured on a cache reads them on
    every replay, and the capture itself swaps them out of the cache (the step appends to it), so
    whoever replays must keep this list alive: freed, their memory would go to other tensors
    (docs/transformers.md, "CUDA graphs")."""
    def walk(v):
        if isinstance(v, torch.Tensor):
            return [v]
        if isinstance(v, dict):
            return [t for x in v.values() for t in walk(x)]
        return []

    return [t for layer in cache.layers for t in walk(vars(layer))]
