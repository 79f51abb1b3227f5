"""mhc.integrations.transformers on a tiny random DeepSeek-V4 (CPU).

The model's mHC parameters are drawn at random (its init sets ``base`` to zero and ``scale`` to
one), so every mix matters. Logits are compared as a relative Frobenius error against the
unpatched model's; the tolerances, and why, are in ``TOL``.
"""

from __future__ import annotations

import copy
import importlib.util
import sys
import time

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

pytest.importorskip("transformers.models.deepseek_v4.modeling_deepseek_v4",
                    reason="transformers with DeepSeek-V4 not installed (pip install -e '.[transformers]')")

import mhc  # noqa: E402
from mhc import registry  # noqa: E402
from mhc.integrations import transformers as mt  # noqa: E402
from recorders import Recorder  # noqa: E402
from transformers import DeepseekV4Config, DeepseekV4ForCausalLM  # noqa: E402
from transformers.models.deepseek_v4 import modeling_deepseek_v4 as M  # noqa: E402

#: Relative Frobenius error of the patched model's logits against the unpatched model's.
#: fp32: both compute the mixes and the post step in fp32 and differ only in rounding order
#: (RMS factor after the GEMM, fp32 products in another order): measured 6e-7 to 8e-7 (seeds 0-2).
#: bf16: the model rounds post, comb and every product and sum of the post step to bf16, and its
#: sublayer norm sees the bf16-rounded collapse and rounds twice more (the normalised row, the
#: product with its bf16 weight); mhc computes both in fp32 and rounds once (the norm is fused
#: into pre, ``norm_weight``), so the residuals differ by a few bf16 ulps per site; measured
#: 1.11e-2 to 1.25e-2 (seeds 0-2; 7.9e-3 to 9.5e-3 before the norm was fused). That is the size of
#: the model's own bf16 error: against the fp32 run of the same bf16 weights the model's logits
#: are 9.6e-3 off and the patched model's 8.5e-3 (``test_bf16_not_less_accurate``). The capture
#: tests' model (CAPTURE_CONFIG at hidden 1024, 3 layers: more roundings on the way) measured
#: 1.6e-2 to 1.8e-2 (seeds 0-3, the forward of 2 x 40 tokens; its decode step 1.3e-2 to 1.7e-2).
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
#: Gradients (fp32): relative Frobenius error per parameter against the unpatched model's;
#: measured at most 4.6e-6.
GRAD_TOL = 1e-4

HC_MODULES = (M.DeepseekV4HyperConnection, M.DeepseekV4HyperHead)


def _config(**kw) -> DeepseekV4Config:
    args = dict(vocab_size=512, hidden_size=256, moe_intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=1, head_dim=64, q_lora_rank=64, num_experts_per_tok=2,
                n_routed_experts=4, n_shared_experts=1, o_groups=2, o_lora_rank=64, index_n_heads=2,
                index_head_dim=32, index_topk=8, sliding_window=16, num_nextn_predict_layers=0, hc_mult=4,
                max_position_embeddings=256)
    args.update(kw)
    return DeepseekV4Config(**args)


def _randomise_hc(model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, HC_MODULES):
                for p in mod.parameters():
                    if p.dim() == 1:  # base, scale (hc_base, hc_scale); fn keeps its normal init
                        p.copy_(torch.randn(p.shape, generator=g))


def _model(dtype=torch.float32, seed: int = 0, **cfg) -> DeepseekV4ForCausalLM:
    torch.manual_seed(seed)
    m = DeepseekV4ForCausalLM(_config(**cfg)).eval()
    _randomise_hc(m, seed + 1)
    m = m.to(dtype)
    for mod in m.modules():  # as from_pretrained(dtype=...) does (_keep_in_fp32_modules_strict)
        if isinstance(mod, HC_MODULES):
            mod.float()
    return m


def _ids(batch=2, seq=24, seed=0):
    return torch.randint(0, 512, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_logits_match(dtype):
    model, ids = _model(dtype), _ids()
    ref = _logits(model, ids)
    with mt.apply(model):
        out = _logits(model, ids)
    assert _rel(out, ref) < TOL[dtype]
    assert not torch.equal(out, ref)  # the patched code did run


def test_bf16_not_less_accurate():
    """Against the fp32 model, mhc's bf16 logits are no further off than the model's own bf16."""
    ids = _ids()
    exact = _logits(_model(torch.bfloat16).float(), ids)  # the bf16 weights, run in fp32
    model = _model(torch.bfloat16)
    own = _rel(_logits(model, ids), exact)
    with mt.apply(model):
        ours = _rel(_logits(model, ids), exact)
    assert ours < 1.1 * own, (ours, own)


def test_generate_same_tokens():
    model, ids = _model(), _ids(batch=1, seq=8)
    want = model.generate(ids, max_new_tokens=8, do_sample=False)
    with mt.apply(model):
        got = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(got, want)


def _grads(model, ids):
    model.zero_grad(set_to_none=True)
    model(ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()
            if p.grad is not None and (n.endswith((".fn", ".base", ".scale", "layernorm.weight")) or "hc_head" in n
                                       or "embed_tokens" in n)}


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "gradient_checkpointing"])
def test_gradients_match(checkpointing):
    model, ids = _model().train(), _ids()
    want = _grads(model, ids)
    if checkpointing:
        model.gradient_checkpointing_enable()
    with mt.apply(model):
        got = _grads(model, ids)
    assert set(got) == set(want)
    # fn/base/scale of attn_hc and ffn_hc and the two fused norms' weights per layer, hc_head, embeddings
    assert len(want) == 2 * (2 * 3 + 2) + 3 + 1
    for name in want:
        assert _rel(got[name], want[name]) < GRAD_TOL, name


def test_undo_restores_bit_for_bit():
    model, ids = _model(torch.bfloat16), _ids()
    ref = _logits(model, ids)
    handle = mt.apply(model)
    assert not torch.equal(_logits(model, ids), ref)
    handle.remove()
    assert torch.equal(_logits(model, ids), ref)
    mt.apply(model)
    mt.undo(model)
    assert torch.equal(_logits(model, ids), ref)
    assert not any("forward" in mod.__dict__ for mod in model.modules())


def _patched_vs_own(model, ids):
    """Logits of the patched model and of the same model undone, on the same parameters."""
    out = _logits(model, ids)
    mt.undo(model)
    own = _logits(model, ids)
    mt.apply(model)
    return out, own


def test_optimizer_step_and_load_state_dict_are_seen():
    model, ids = _model().train(), _ids()
    mt.apply(model)
    before = _logits(model, ids)
    hc_params = [p for n, p in model.named_parameters() if n.endswith((".fn", ".base", ".scale")) or "hc_head" in n]
    opt = torch.optim.SGD(hc_params, lr=1.0)
    model(ids, labels=ids).loss.backward()
    opt.step()
    out, own = _patched_vs_own(model, ids)
    assert _rel(out, before) > 1e-3  # the step changed the patched model's output ...
    assert _rel(out, own) < TOL[torch.float32]  # ... exactly as it changed the model's own
    other = _model(seed=7)
    model.load_state_dict(other.state_dict())
    out, own = _patched_vs_own(model, ids)
    assert _rel(out, _logits(other, ids)) < TOL[torch.float32]
    assert _rel(out, own) < TOL[torch.float32]
    mt.undo(model)


def _no_instance_forwards(model):
    return not any("forward" in mod.__dict__ for mod in model.modules())


def test_refuses_other_models():
    with pytest.raises(mt.UnsupportedModelError, match="DeepseekV4ForCausalLM and DeepseekV4Model"):
        mt.apply(torch.nn.Linear(4, 4))


def test_refuses_changed_source(monkeypatch):
    model = _model()

    def forward(self, hidden_streams):  # a different mHC (say, another Sinkhorn)
        raise AssertionError("not called")

    monkeypatch.setattr(M.DeepseekV4HyperConnection, "forward", forward)
    with pytest.raises(mt.UnsupportedModelError, match=r"DeepseekV4HyperConnection\.forward in transformers .* "
                                                        r"is not the mHC code"):
        mt.apply(model)
    assert _no_instance_forwards(model)  # nothing was changed


def test_refuses_subclass_overriding_forward():
    class Layer(M.DeepseekV4DecoderLayer):
        def forward(self, hidden_states, input_ids=None, **kwargs):
            return hidden_states

    model = _model()
    model.model.layers[1] = Layer(model.config, 1)
    with pytest.raises(mt.UnsupportedModelError, match="subclass of DeepseekV4DecoderLayer"):
        mt.apply(model)
    assert _no_instance_forwards(model)


def test_refuses_instance_forward_hooks_and_double_apply():
    model = _model()
    model.model.layers[0].ffn_hc.forward = lambda x: x
    with pytest.raises(mt.UnsupportedModelError, match=r"layers\.0\.ffn_hc\.forward was replaced"):
        mt.apply(model)
    del model.model.layers[0].ffn_hc.forward
    h = model.model.layers[1].attn_hc.register_forward_hook(lambda *a: None)
    with pytest.raises(mt.UnsupportedModelError, match=r"layers\.1\.attn_hc has forward or backward hooks"):
        mt.apply(model)
    h.remove()
    h = model.model.layers[0].post_attention_layernorm.register_forward_pre_hook(lambda *a: None)
    with pytest.raises(mt.UnsupportedModelError, match=r"layers\.0\.post_attention_layernorm has forward or backward hooks"):
        mt.apply(model)  # the norm is fused into fused_post_pre: its hooks would stop running
    h.remove()
    assert _no_instance_forwards(model)
    mt.apply(model.model)  # the bare DeepseekV4Model is accepted too
    with pytest.raises(mt.UnsupportedModelError, match="already patched"):
        mt.apply(model)
    mt.undo(model)
    assert _no_instance_forwards(model)


@pytest.mark.parametrize("path", ["layers.0.attn_hc", "layers.1.ffn_hc.input_norm", "layers.0.input_layernorm",
                                  "layers.1.post_attention_layernorm", "hc_head.input_norm"])
@pytest.mark.parametrize("kind", ["forward", "forward_pre", "full_backward"])
def test_hooks_registered_after_apply_are_refused_not_skipped(path, kind):
    """A hook on a module the patched code computes without calling would never run: the patched
    forward raises instead, and runs again once the hook is removed. Hooks on the patched
    modules themselves (the decoder layers, hc_head) run."""
    model, ids = _model(), _ids(batch=1, seq=8)
    mt.apply(model)
    seen = []
    model.model.layers[1].register_forward_hook(lambda *a: seen.append("layer"))
    model.model.hc_head.register_forward_pre_hook(lambda *a: seen.append("head"))
    h = getattr(model.model.get_submodule(path), f"register_{kind}_hook")(lambda *a: None)
    with pytest.raises(mt.UnsupportedModelError, match=path.split(".")[-1] + " has forward or backward hooks"):
        _logits(model, ids)
    h.remove()
    seen.clear()
    _logits(model, ids)
    assert seen == ["layer", "head"]
    mt.undo(model)


def _copies(model, tmp_path):
    """The model through pickle, torch.save/torch.load (the whole object) and copy.deepcopy."""
    import pickle

    yield "pickle", pickle.loads(pickle.dumps(model))
    torch.save(model, tmp_path / "model.pt")
    yield "torch.save", torch.load(tmp_path / "model.pt", weights_only=False)
    yield "deepcopy", copy.deepcopy(model)


def test_patched_model_pickles_saves_and_deepcopies(tmp_path):
    """... and save_pretrained writes weights and config that plain transformers loads."""
    model, ids = _model(), _ids(batch=1, seq=8)
    own = _logits(model, ids)
    mt.apply(model)
    want = _logits(model, ids)
    for how, twin in _copies(model, tmp_path):
        layer = twin.model.layers[0]
        assert mt._patched(layer) and layer.forward.args[0] is layer, how  # bound to the copy, not the original
        assert mt._patched(twin.model.hc_head), how
        assert torch.equal(_logits(twin, ids), want), how
        mt.undo(twin)
        assert torch.equal(_logits(twin, ids), own), how
    assert torch.equal(_logits(model, ids), want)  # the original is still patched
    model.save_pretrained(tmp_path / "pretrained")
    loaded = DeepseekV4ForCausalLM.from_pretrained(tmp_path / "pretrained").eval()
    assert _no_instance_forwards(loaded)
    assert torch.equal(_logits(loaded, ids), own)
    mt.undo(model)


def test_without_transformers(monkeypatch):
    """The module imports without transformers; apply says what is missing."""
    import mhc.integrations

    monkeypatch.setitem(sys.modules, "transformers", None)
    monkeypatch.delitem(sys.modules, "mhc.integrations.transformers")
    monkeypatch.setattr(mhc.integrations, "transformers", None)
    fresh = importlib.import_module("mhc.integrations.transformers")
    with pytest.raises(fresh.UnsupportedModelError, match=r"needs transformers"):
        fresh.apply(torch.nn.Linear(4, 4))


def test_ops_go_through_the_registry():
    """use_backend is respected: every mHC site runs on the chosen backend, fused where stated,
    and a backend that cannot serve raises instead of falling back."""
    rec = Recorder()
    caps = registry.Capabilities(frozenset({"cpu"}), frozenset({torch.float32}),
                                 norm_ops=frozenset({"pre", "fused_post_pre"}))
    registry.register(registry.Backend("recorder", None, caps, load=lambda: rec))
    try:
        model, ids = _model(), _ids()
        ref = _logits(model, ids)
        mt.apply(model)
        with mhc.use_backend("recorder"):
            out = _logits(model, ids)
        assert rec.calls == ["pre", "fused_post_pre", "post"] * 2 + ["head"]
        assert _rel(out, ref) < TOL[torch.float32]
        with mhc.use_backend("aiter"), pytest.raises(mhc.BackendError):
            _logits(model, ids)
    finally:
        registry.unregister("recorder")


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_triton_forward():
    """The Triton backend (the interpreter on CPU, see conftest.py) serves the bf16 model's forward
    (Triton serves bf16 and fp16 residuals only)."""
    model, ids = _model(torch.bfloat16), _ids(batch=1, seq=8)
    ref = _logits(model, ids)
    mt.apply(model)
    t0 = time.perf_counter()
    with mhc.use_backend("triton"):
        out = _logits(model, ids)
    assert time.perf_counter() - t0 < 60
    assert _rel(out, ref) < TOL[torch.bfloat16]


# --- CUDA-graph capture: what a capture refuses, found on CPU ------------------------------------
#
# The GPU suite captures the model (tests/test_gpu.py::test_transformers_cuda_graph_capture_with_apply).
# Here, with no GPU, a dispatch mode records every op of one forward that a capture would refuse.
# What transformers 5.17 does in a DeepSeek-V4 forward that a capture refuses (found this way):
# - masking_utils.py:604 (eager_mask, every forward that builds its mask):
#   ``torch.tensor(0.0, device=mask.device)``, a copy from host memory to the GPU;
# - masking_utils.py:755 (find_packed_sequence_indices, a forward without a cache):
#   ``(packed_sequence_mask[:, -1] == 0).all()`` in an ``if``, a read of a GPU value on the host;
# - the "eager" experts (DeepseekV4Experts.forward, modeling_deepseek_v4.py:1002-1010): ``nonzero``,
#   ``torch.where(mask)`` and a Python loop over the experts hit; transformers' default,
#   ``grouped_mm`` (sort, histc, cumsum, grouped_mm), and ``batched_mm`` have none;
# - a cache's first update (cache_utils.py:125-126, 229: ``torch.tensor([], device=...)`` and
#   ``_sliding_window_tensor.to(device)``), so a prefill into a new cache is not captured: the GPU
#   test and benchmarks/model_bench.py capture a forward without a cache and a decode step on a
#   cache filled before the capture.
# A 4D mask passed as ``attention_mask`` is used as given (masking_utils._preprocess_mask_arguments),
# so building it with transformers' own function outside the graph (``_graph_mask``) removes the
# first two; the rotary embedding, the attention, the compressors and indexer, both routers, the
# cache's update on decode and mhc's ops then show nothing. What a CPU run cannot show, read in
# the sources instead: on CUDA, ``F.one_hot`` skips the host check it makes on CPU; ``histc`` of
# ints with min < max launches without a sync; ``grouped_mm`` of bf16 on sm90/sm100 takes its
# "no d2h sync" path (fp32, or another GPU, takes a fallback that copies the offsets to the host).

#: Every attention kind (sliding only, CSA with its indexer, HCA) and both routers; HCA windows of
#: 16 tokens (the default 128 would need long inputs to close one); the indexer's top-k as wide as
#: the CSA entries of CAPTURE_SEQ tokens (see _capture_routing for why).
CAPTURE_CONFIG = dict(num_hidden_layers=3, mlp_layer_types=["hash_moe", "moe", "moe"],
                      layer_types=["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"],
                      compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 16},
                      index_topk=16)
#: Tokens per sequence in the capture tests: past the sliding window (16), two HCA windows, ten CSA
#: windows.
CAPTURE_SEQ = 40


def _capture_routing(model, seed: int) -> None:
    """Routing for the capture tests. Hash-routed layers: distinct random experts per token id (the
    init leaves ``tid2eid`` at zero: every token to expert 0, twice). Top-k routers: a score bias
    of 10 per expert rank, so every token takes the same two experts. The patched model's bf16
    hidden states differ from the model's own by a few ulps (TOL), and where two experts' scores
    (or two CSA entries' indexer scores) nearly tie, that flips the choice for a token: measured,
    one token of 80 then differs by 45 % and the logits by 4-8e-2 instead of 1.6-1.8e-2. That is
    the model's discontinuity, not an error of mhc's, so the tests take the ties away (the
    indexer's: CAPTURE_CONFIG's index_topk keeps every entry)."""
    g = torch.Generator().manual_seed(seed)
    for mod in model.modules():
        if isinstance(mod, M.DeepseekV4HashRouter):
            ranks = torch.rand(mod.tid2eid.shape[0], mod.num_experts, generator=g).argsort(-1)
            mod.tid2eid.copy_(ranks[:, :mod.top_k].to(mod.tid2eid.device))
        if isinstance(mod, M.DeepseekV4TopKRouter):
            bias = 10.0 * torch.arange(mod.num_experts, dtype=mod.e_score_correction_bias.dtype)
            mod.e_score_correction_bias.copy_(bias.to(mod.e_score_correction_bias.device))


def _graph_mask(model, ids, cache=None):
    """The attention mask the model builds inside its forward for ``ids`` (and ``cache``), built
    here with transformers' own function so that it can be built outside a CUDA graph and passed
    in as ``attention_mask`` (see above). It depends on the shapes and the cache's length only."""
    from transformers.masking_utils import create_sliding_window_causal_mask

    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids)
        return create_sliding_window_causal_mask(config=model.config, inputs_embeds=embeds, attention_mask=None,
                                                 past_key_values=cache)


_A = torch.ops.aten
_REFUSED = {_A._local_scalar_dense.default: "reads a device value on the host (.item, bool, tolist)",
            _A.nonzero.default: "nonzero (data-dependent shape)", _A.masked_select.default: "masked_select",
            _A.lift_fresh.default: "a tensor from host data (a host-to-device copy)",
            _A.lift_fresh_copy.default: "a tensor from host data (a host-to-device copy)",
            _A.bincount.default: "bincount", _A.repeat_interleave.Tensor: "repeat_interleave by a tensor",
            _A._unique2.default: "unique", _A.unique_dim.default: "unique",
            _A.unique_consecutive.default: "unique"}


class _CaptureProbe(TorchDispatchMode):
    """Records ``(what, file:line)`` of every op a CUDA-graph capture would refuse."""

    def __init__(self):
        super().__init__()
        self.found = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        why = _REFUSED.get(func)
        if func in (_A.index.Tensor, _A.index_put.default, _A.index_put_.default) and any(
                i is not None and i.dtype == torch.bool for i in args[1]):
            why = "indexing by a boolean mask"
        if why:
            import traceback

            frame = next(f for f in reversed(traceback.extract_stack()) if "/torch/" not in f.filename
                         and not f.filename.endswith("test_integration_transformers.py"))
            self.found.append((why, f"{frame.filename.rsplit('site-packages/', 1)[-1]}:{frame.lineno}"))
        return func(*args, **(kwargs or {}))


def _probe(fn):
    """``(fn()'s logits, what a capture would refuse in it)``."""
    probe = _CaptureProbe()
    with torch.no_grad(), probe:
        out = fn().logits
    return out, probe.found


@pytest.mark.parametrize("experts", ["grouped_mm", "batched_mm", "eager"])
def test_graph_inputs_leave_nothing_a_capture_refuses(experts):
    """With the mask built outside (``_graph_mask``), a forward without a cache and a decode step
    on a filled cache hold nothing a CUDA-graph capture refuses, unpatched and patched, for the
    experts implementations that dispatch on the device; and the logits are bit for bit those of
    the model building its own mask. The probe's own checks: without the mask it finds
    masking_utils' copy and host read, and the "eager" experts' ``nonzero``."""
    model = _model(torch.bfloat16, **CAPTURE_CONFIG)
    _capture_routing(model, 2)
    model.set_experts_implementation(experts)
    ids = _ids(batch=2, seq=CAPTURE_SEQ)
    mask = _graph_mask(model, ids)
    with torch.no_grad():
        prompt = model(ids, use_cache=True)
    cache, tok = prompt.past_key_values, prompt.logits[:, -1:].argmax(-1)
    step_mask = _graph_mask(model, tok, cache)
    for patched in (False, True):
        handle = mt.apply(model) if patched else None
        try:
            own, found_own = _probe(lambda: model(ids, use_cache=False))
            in_masking = [why for why, w in found_own if "masking_utils.py" in w]
            assert any("host-to-device" in why for why in in_masking), found_own
            assert any("on the host" in why for why in in_masking), found_own
            got, found = _probe(lambda: model(ids, attention_mask=mask, use_cache=False))
            c1, c2 = copy.deepcopy(cache), copy.deepcopy(cache)
            step_own, _ = _probe(lambda: model(tok, past_key_values=c1, use_cache=True))
            step, found_step = _probe(lambda: model(tok, attention_mask=step_mask, past_key_values=c2, use_cache=True))
        finally:
            if handle is not None:
                handle.remove()
        assert torch.equal(got, own) and torch.equal(step, step_own)
        if experts == "eager":
            assert any(why.startswith("nonzero") and "modeling_deepseek_v4.py" in w for why, w in found), found
            assert any(why.startswith("nonzero") for why, _ in found_step), found_step
        else:
            assert found == [] and found_step == [], (found, found_step)


def test_cache_tensors_lists_what_a_decode_step_swaps_out():
    """``mt.cache_tensors``: every tensor the cache holds, among them the key/value tensors that a
    decode step replaces (what a replayer of a graph captured on the cache must keep alive)."""
    model = _model(torch.float32)
    with torch.no_grad():
        prompt = model(_ids(batch=1, seq=6), use_cache=True)
    cache = prompt.past_key_values
    held = mt.cache_tensors(cache)
    assert held and all(isinstance(t, torch.Tensor) for t in held)
    before = {id(t) for t in held}
    with torch.no_grad():
        model(prompt.logits[:, -1:].argmax(-1), past_key_values=cache, use_cache=True)
    after = {id(t) for t in mt.cache_tensors(cache)}
    assert before - after, "the step replaced none of the cache's tensors: nothing to keep alive"
