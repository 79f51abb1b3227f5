"""A DeepSeek-V4-shaped transformers model with and without ``mhc.integrations.transformers.apply``.

On a GPU (the H200 run of issue 15): hidden 4096, hc_mult 4, 4 layers, DeepSeek-V4's attention
shapes, 8 small routed experts (2 per token, 512 wide) and a vocab of 8192, random weights (the
hash-routed layers' token-to-expert table too), bf16, the experts as ``grouped_mm``
(transformers' default; ``--experts``). It measures, for the unpatched model and the patched one
in the same run:

- a decode step (one token per sequence after a 256-token prompt) at batch 1 and 32, eagerly
  (a real decode loop: the cache grows by one token a step, the model builds its own mask) and
  replayed from a CUDA graph (``torch.cuda.graph`` around one step on a copy of the prompt's
  cache; the replay recomputes that step, so its time is the step's at that context length);
- a prefill of 4096 tokens (batch 1, eager);
- a training step (``--phases train``): one sequence of 4096 tokens (batch 1), forward with
  ``labels`` (the model's causal-LM loss), ``loss.backward()`` and a ``torch.optim.AdamW`` step
  (its defaults: foreach on a GPU; lr ``--train-lr``), eager, no activation checkpointing; the
  median of ``--train-steps`` steps after two warm-up steps, the peak of
  ``torch.cuda.max_memory_allocated`` over them (reset before each model's steps: the weights,
  gradients, AdamW's state and the activations; the decode prompts' caches are freed first), the
  losses, and how many parameters the steps changed (mHC's ``fn``/``base``/``scale`` too: the
  gradients reach them through mhc's backward). Both models start from the same weights: the
  parameters are copied to the host before the first model's steps and restored after each;
- the mHC share of the eager decode step, of the prefill and of the training step, from the torch
  profiler: the device time of the kernels under the ``mhc::*`` ops (patched) or under the modules
  they replace (``attn_hc``, ``ffn_hc``, ``hc_head``, ``input_layernorm``,
  ``post_attention_layernorm``; unpatched: a lower bound, the post step inline in
  ``DeepseekV4DecoderLayer.forward`` has no module to time) over the device time of every kernel,
  copy and memset. In the training step the backward counts too: the autograd nodes that those
  forward ops created (matched by the profiler's sequence numbers), and the optimizer step counts
  in the total only.

How the step is captured, the same for both models: transformers 5.17's mask builder copies a
host scalar to the GPU on every forward (``masking_utils.eager_mask``), which a capture refuses,
so the step's mask is built outside the graph with transformers' own
``create_sliding_window_causal_mask`` and passed in as a 4D ``attention_mask`` (transformers
uses a 4D mask as given); the cache's tensors the capture read are kept alive for the replays.
Each replay is checked against an eager call of the same step (bit for bit), and the prebuilt
mask against the model's own (the step's logits bit for bit), also on CPU. What else a capture
refuses in this model, and why this avoids it: tests/test_integration_transformers.py.

Writes ``model_bench.json`` and ``model_bench.md`` under ``--out`` (default ``$OUT``, else
``benchmarks/results``) and prints the table last. ``--device cpu --tiny`` is a smoke run (a tiny
config, a few steps, no CUDA graphs) that proves the script works where there is no GPU.

    python benchmarks/model_bench.py                       # the H200 run (decode, prefill, train)
    python benchmarks/model_bench.py --phases train        # the training step alone
    python benchmarks/model_bench.py --device cpu --tiny   # smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import math
import platform
import statistics
import sys
import time

import torch

_NEEDS = ("transformers==5.17.0 and its dependencies (huggingface_hub, tokenizers, safetensors, regex, tqdm, "
          "typer, pyyaml, numpy, packaging, ...): pip install 'mhc-kernels[transformers]'")

#: mhc ops as the profiler names them (the patched model's mHC).
MHC_OPS = ("mhc::pre", "mhc::fused_post_pre", "mhc::post", "mhc::head")
#: The unpatched model's modules whose work the mhc ops take over (record_function labels).
SITE = "mhc_site"
#: The profiler's name prefix of an autograd node's evaluation in the backward.
EVAL = "autograd::engine::evaluate_function: "
PHASES = ("decode", "prefill", "train")


def _transformers():
    try:
        import transformers
        from transformers import DeepseekV4Config, DeepseekV4ForCausalLM
    except ImportError as e:
        sys.exit(f"model_bench.py needs {_NEEDS}; import failed: {e}")
    return transformers.__version__, DeepseekV4Config, DeepseekV4ForCausalLM


def config(tiny: bool):
    _, Config, _ = _transformers()
    if tiny:  # the tests' tiny model (tests/test_integration_transformers.py)
        kw = dict(vocab_size=512, hidden_size=256, moe_intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=1, head_dim=64, q_lora_rank=64, num_experts_per_tok=2,
                  n_routed_experts=4, n_shared_experts=1, o_groups=2, o_lora_rank=64, index_n_heads=2,
                  index_head_dim=32, index_topk=8, sliding_window=16, max_position_embeddings=512)
    else:  # DeepSeek-V4's hidden size and attention shapes (the config's defaults), few small experts
        kw = dict(vocab_size=8192, hidden_size=4096, num_hidden_layers=4, n_routed_experts=8, num_experts_per_tok=2,
                  moe_intermediate_size=512, n_shared_experts=1, max_position_embeddings=8192)
    cfg = Config(num_nextn_predict_layers=0, hc_mult=4, **kw)
    if len(getattr(cfg, "layer_types", None) or ()) > cfg.num_hidden_layers:
        cfg.layer_types = cfg.layer_types[:cfg.num_hidden_layers]
    return cfg


def build_model(cfg, device, dtype, experts: str, seed=0):
    """Random weights (mHC's ``base``/``scale`` too, which the init sets to 0 and 1, and the hash
    routers' ``tid2eid``, which it sets to 0: every token to expert 0), ``dtype``, the HC modules
    in fp32 as ``from_pretrained`` keeps them; the experts run as ``experts``."""
    _, _, Model = _transformers()
    from transformers.models.deepseek_v4 import modeling_deepseek_v4 as M

    torch.manual_seed(seed)
    with torch.device(device):
        model = Model(cfg).eval()
    g = torch.Generator().manual_seed(seed + 1)
    hc = (M.DeepseekV4HyperConnection, M.DeepseekV4HyperHead)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, hc):
                for p in mod.parameters():
                    if p.dim() == 1:
                        p.copy_(torch.randn(p.shape, generator=g).to(p.device))
            if isinstance(mod, M.DeepseekV4RMSNorm):  # norm weights not all ones
                mod.weight.copy_((1 + 0.1 * torch.randn(mod.weight.shape, generator=g)).to(mod.weight.device))
            if isinstance(mod, M.DeepseekV4HashRouter):  # distinct random experts per token id
                ranks = torch.rand(mod.tid2eid.shape[0], mod.num_experts, generator=g).argsort(-1)
                mod.tid2eid.copy_(ranks[:, :mod.top_k].to(mod.tid2eid.device))
    model = model.to(dtype)
    for mod in model.modules():
        if isinstance(mod, hc):
            mod.float()
    model.set_experts_implementation(experts)
    return model


class Timer:
    """Per-call seconds of a callable: CUDA events on a GPU, perf_counter on CPU."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def run(self, fn, iters: int, warmup: int = 2) -> float:
        for _ in range(warmup):
            fn()
        self.sync()
        if self.cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for _ in range(iters):
                fn()
            b.record()
            b.synchronize()
            return a.elapsed_time(b) / 1e3 / iters
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - t0) / iters

    def median(self, fn, iters: int, warmup: int = 2) -> float:
        """The median seconds of ``iters`` calls timed one by one (synchronised after each), after
        ``warmup`` calls: for calls long enough that one sync per call costs nothing."""
        for _ in range(warmup):
            fn()
        self.sync()
        times = []
        for _ in range(iters):
            if self.cuda:
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                b.synchronize()
                times.append(a.elapsed_time(b) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        return statistics.median(times)


def prefill(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
    return out.past_key_values, out.logits[:, -1:].argmax(-1)


def decode_eager(model, timer, cache, tok, iters):
    """A decode loop: ``iters`` steps (after warmup), the cache growing one token a step."""
    state = {"cache": copy.deepcopy(cache), "tok": tok.clone()}

    def step():
        out = model(input_ids=state["tok"], past_key_values=state["cache"], use_cache=True)
        state["tok"] = out.logits[:, -1:].argmax(-1)

    with torch.no_grad():
        return timer.run(step, iters)


def graph_mask(model, tok, cache):
    """The 4D mask the model builds inside its forward for one decode step of ``tok`` on
    ``cache``, built here, outside a CUDA graph, with transformers' own function."""
    from transformers.masking_utils import create_sliding_window_causal_mask

    with torch.no_grad():
        return create_sliding_window_causal_mask(config=model.config, inputs_embeds=model.get_input_embeddings()(tok),
                                                 attention_mask=None, past_key_values=cache)


def mask_matches_own(model, cache, tok) -> bool:
    """The step with the prebuilt mask gives the model's own step's logits bit for bit."""
    mask = graph_mask(model, tok, cache)
    with torch.no_grad():
        own = model(input_ids=tok, past_key_values=copy.deepcopy(cache), use_cache=True).logits
        got = model(input_ids=tok, attention_mask=mask, past_key_values=copy.deepcopy(cache), use_cache=True).logits
    return bool(torch.equal(own, got))


def decode_graph(model, timer, cache, tok, iters):
    """One decode step captured in a CUDA graph (on a copy of the prompt's cache, the mask built
    outside) and replayed: ``(seconds per replay, replay equals an eager call of the step)``."""
    mask = graph_mask(model, tok, cache)
    static_tok = tok.clone()
    copies = [copy.deepcopy(cache) for _ in range(3)]  # two warm-up steps, then the captured one
    from mhc.integrations.transformers import cache_tensors

    keep = cache_tensors(copies[-1])

    def step():
        return model(input_ids=static_tok, attention_mask=mask, past_key_values=copies.pop(0), use_cache=True).logits

    with torch.no_grad():
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):  # warm up outside the graph (lazy inits, autotuning, first launches)
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = step()
        graph.replay()
        timer.sync()
        eager = model(input_ids=static_tok, attention_mask=mask, past_key_values=copy.deepcopy(cache),
                      use_cache=True).logits
        same = bool(torch.equal(logits, eager))
        seconds = timer.run(graph.replay, iters)
    del graph, keep
    return seconds, same


@contextlib.contextmanager
def site_labels(model):
    """record_function ranges around the unpatched model's mHC modules (removed on exit; hooks on
    those modules make ``apply`` refuse, rightly)."""
    from transformers.models.deepseek_v4 import modeling_deepseek_v4 as M

    handles, open_ranges = [], {}
    for name, mod in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(mod, M.DeepseekV4HyperHead) or leaf in ("attn_hc", "ffn_hc", "input_layernorm",
                                                              "post_attention_layernorm"):
            def pre(m, args, _n=name):
                rf = torch.profiler.record_function(SITE)
                rf.__enter__()
                open_ranges[_n] = rf

            def post(m, args, out, _n=name):
                open_ranges.pop(_n).__exit__(None, None, None)

            handles += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _backward_nodes(events, labels) -> list:
    """The backward's autograd-node evaluations (top-level ``autograd::engine::evaluate_function``
    events) of the nodes that forward ops at mHC sites created: a node's event carries the
    sequence number and thread of the forward op that created it. A forward op is at a site if it
    is one of ``labels``, lies under one, or directly holds one (an ``autograd.Function`` whose
    forward calls an ``mhc::*`` op is that op's parent)."""

    def under(e, pred) -> bool:
        p = e.cpu_parent
        while p is not None:
            if pred(p):
                return True
            p = p.cpu_parent
        return False

    def in_backward(e) -> bool:
        return under(e, lambda p: p.name.startswith(EVAL))

    created = set()
    for e in events:
        if e.sequence_nr < 0 or e.name.startswith(EVAL) or in_backward(e):
            continue
        if e.name in labels or any(c.name in labels for c in e.cpu_children) or under(e, lambda p: p.name in labels):
            created.add((e.thread, e.sequence_nr))
    return [e for e in events if e.name.startswith(EVAL) and (e.fwd_thread, e.sequence_nr) in created
            and not in_backward(e)]


def mhc_share(model, fn, device, patched: bool, steps: int = 3, grad: bool = False):
    """(mHC time, total time, share) in µs per call of ``fn`` under the profiler. On a GPU: the
    device time of the kernels (and copies, memsets) launched under the outermost ``mhc::*`` ops
    (patched) or ``mhc_site`` ranges (unpatched), over the device time of every kernel, copy and
    memset (as torch's own table totals it: device events, not the ops that launched them, and no
    user-annotation ranges). On CPU: their CPU time over the wall time. ``grad``: ``fn`` runs with
    autograd on (a training step) and the backward of those sites counts too
    (:func:`_backward_nodes`); else under ``torch.no_grad()``."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    labels = MHC_OPS if patched else (SITE,)
    ctx = contextlib.nullcontext() if patched else site_labels(model)
    with ctx, (torch.enable_grad() if grad else torch.no_grad()):
        fn()  # warm
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with profile(activities=acts) as prof:
            for _ in range(steps):
                fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) * 1e6
    events = prof.events()

    def outermost(e):
        p = e.cpu_parent
        while p is not None:
            if p.name in labels:
                return False
            p = p.cpu_parent
        return True

    sites = [e for e in events if e.device_type == DeviceType.CPU and e.name in labels and outermost(e)]
    if grad:
        sites += _backward_nodes(events, labels)
    if device.type == "cuda":
        ours = sum(e.device_time_total for e in sites)
        total = sum(e.self_device_time_total for e in events
                    if e.device_type != DeviceType.CPU and not getattr(e, "is_user_annotation", False))
    else:
        ours = sum(e.cpu_time_total for e in sites)
        total = wall
    return ours / steps, total / steps, (ours / total if total else float("nan"))


def _snapshot(model) -> dict[str, torch.Tensor]:
    """Every parameter, copied to the host (not to the device: the training step's peak memory is
    measured without it)."""
    return {name: p.detach().to("cpu", copy=True) for name, p in model.named_parameters()}


def _restore(model, snap: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(snap[name])


def _is_hc(name: str) -> bool:
    """A parameter of an mHC module (``attn_hc``, ``ffn_hc``, ``hc_head``): fn, base, scale."""
    return any(part in ("attn_hc", "ffn_hc", "hc_head") for part in name.split("."))


def train_step(model, ids, device, timer, steps: int, lr: float, before: dict[str, torch.Tensor],
               warmup: int = 2):
    """Time ``steps`` training steps on ``ids`` (1, T) after ``warmup``: forward with ``labels``,
    ``loss.backward()``, ``AdamW.step()``, ``zero_grad``. ``before``: the parameters before the
    first step (:func:`_snapshot`). Returns ``(row fields, the step as a callable for the
    profiler)``; the fields: median seconds, peak allocated bytes (GPU; else None), every loss so
    far, and how many parameters (and of them, mHC's) differ from ``before``."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []

    def step():
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())  # no host sync inside the timed step

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    seconds = timer.median(step, steps, warmup)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    changed = [name for name, p in model.named_parameters() if not torch.equal(p.detach().cpu(), before[name])]
    fields = dict(seconds=seconds, peak_bytes=peak, losses=[float(v) for v in losses],
                  params_changed=len(changed), params=len(before),
                  hc_params_changed=sum(_is_hc(n) for n in changed), hc_params=sum(_is_hc(n) for n in before))
    return fields, step


def run(args) -> dict:
    version, _, _ = _transformers()
    import mhc
    from mhc.integrations import transformers as mt

    device = torch.device(args.device)
    dtype = torch.bfloat16
    cfg = config(args.tiny)
    model = build_model(cfg, device, dtype, args.experts)
    timer = Timer(device)
    iters = 3 if args.tiny else args.iters
    prompt = 16 if args.tiny else 256
    pre_tokens = 64 if args.tiny else 4096
    train_tokens = args.train_tokens or (64 if args.tiny else 4096)
    train_steps = args.train_steps or (2 if args.tiny else 5)
    batches = (1, 4) if args.tiny else (1, 32)
    graphs = device.type == "cuda" and not args.no_graphs
    phases = args.phases
    g = torch.Generator().manual_seed(0)
    rows, notes, checks = [], [], []

    def ids(b, t):
        return torch.randint(0, cfg.vocab_size, (b, t), generator=g).to(device)

    def share(fn, variant, what, steps=3, grad=False):
        try:
            us, total, frac = mhc_share(model, fn, device, variant == "mhc", steps=steps, grad=grad)
            return dict(mhc_us=us, profiled_us=total, mhc_share=frac)
        except Exception as e:  # reported, not hidden; the timing rows stand without it
            notes.append(f"{variant} {what}: profiler failed: {type(e).__name__}: {_first_line(e)}")
            return {}

    caches = {}
    if "decode" in phases:
        with experts(model, "grouped_mm"):  # one prompt per batch, shared by both runs
            caches = {b: prefill(model, ids(b, prompt)) for b in batches}
    prefill_ids = ids(1, pre_tokens)
    train_ids = ids(1, train_tokens)
    for variant in ("unpatched", "mhc"):
        handle = mt.apply(model) if variant == "mhc" else None
        try:
            for b in batches if "decode" in phases else ():
                cache, tok = caches[b]
                t = decode_eager(model, timer, cache, tok, iters)
                rows.append(dict(variant=variant, phase="decode", batch=b, tokens=b, mode="eager", seconds=t,
                                 **share(_step_fn(model, cache, tok), variant, f"decode batch {b}")))
                check = dict(variant=variant, batch=b, prebuilt_mask_equals_own=mask_matches_own(model, cache, tok))
                if graphs:
                    try:
                        tg, same = decode_graph(model, timer, cache, tok, iters * 4)
                        rows.append(dict(variant=variant, phase="decode", batch=b, tokens=b, mode="cuda_graph",
                                         seconds=tg))
                        check["replay_equals_eager"] = same
                    except Exception as e:  # reported, not hidden: the table says the capture failed
                        notes.append(f"{variant} batch {b}: CUDA graph capture failed: {type(e).__name__}: "
                                     f"{_first_line(e)}")
                        torch.cuda.synchronize()
                checks.append(check)
            if "prefill" in phases:
                fn = _prefill_fn(model, prefill_ids)
                t = timer.run(fn, max(2, iters // 10), warmup=1)
                rows.append(dict(variant=variant, phase="prefill", batch=1, tokens=pre_tokens, mode="eager",
                                 seconds=t, **share(fn, variant, "prefill", steps=1)))
        finally:
            if handle is not None:
                handle.remove()
    if "train" in phases:
        caches.clear()  # the decode prompts' caches are no part of a training step's memory
        before = _snapshot(model)
        for variant in ("unpatched", "mhc"):
            handle = mt.apply(model) if variant == "mhc" else None
            step = None
            try:
                with experts(model, args.train_experts):
                    fields, step = train_step(model, train_ids, device, timer, train_steps, args.train_lr, before)
                    fields.update(share(step, variant, "train", steps=1, grad=True))
                rows.append(dict(variant=variant, phase="train", batch=1, tokens=train_tokens, mode="eager", **fields))
                if not all(math.isfinite(v) for v in fields["losses"]):
                    notes.append(f"check failed: {variant} train: a loss is not finite: {fields['losses']}")
            except Exception as e:  # reported, not hidden: the decode and prefill rows stand
                what = "out of memory" if isinstance(e, torch.OutOfMemoryError) else "failed"
                notes.append(f"{variant} train ({train_tokens} tokens, experts {args.train_experts}): {what}: "
                             f"{type(e).__name__}: {_first_line(e)}")
            finally:
                del step  # the optimizer's state and the gradients go with the step's closure
                model.zero_grad(set_to_none=True)
                model.eval()
                if handle is not None:
                    handle.remove()
                _restore(model, before)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    # the patched model's logits against the unpatched model's, on the prefill (a sanity line)
    check_ids = prefill_ids[:, :256]
    with torch.no_grad(), experts(model, "grouped_mm"):
        ref = model(input_ids=check_ids).logits.float()
        with mt.apply(model):
            out = model(input_ids=check_ids).logits.float()
    rel = ((out - ref).norm() / ref.norm()).item()
    backends = {op: mhc.explain(op, *_explain_args(cfg, device, dtype, op)).chosen
                for op in ("pre", "fused_post_pre", "post", "head")}
    train_backends = _train_backends(cfg, device, dtype, train_tokens) if "train" in phases else None
    failed = [c for c in checks if not all(v for k, v in c.items() if k not in ("variant", "batch"))]
    notes += [f"check failed: {c}" for c in failed]
    return dict(
        when=time.strftime("%Y-%m-%d %H:%M:%S %Z"), device=_device_name(device), torch=torch.__version__,
        transformers=version, python=platform.python_version(), tiny=args.tiny, iters=iters,
        config=dict(hidden_size=cfg.hidden_size, hc_mult=cfg.hc_mult, layers=cfg.num_hidden_layers,
                    n_routed_experts=cfg.n_routed_experts, experts_per_token=cfg.num_experts_per_tok,
                    moe_intermediate_size=cfg.moe_intermediate_size, vocab_size=cfg.vocab_size, dtype="bf16",
                    prompt_tokens=prompt, experts_implementation=args.experts),
        phases=list(phases), backends_at_decode=backends, backends_at_train=train_backends,
        train=dict(tokens=train_tokens, steps=train_steps, warmup=2, lr=args.train_lr, experts=args.train_experts,
                   optimizer="torch.optim.AdamW (defaults)") if "train" in phases else None,
        logits_rel_error_vs_unpatched=rel, logits_check_tokens=check_ids.shape[1],
        rows=rows, checks=checks, notes=notes)


def _first_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else ""


def _step_fn(model, cache, tok):
    """Decode steps on a copy of ``cache`` that grows one token a call (no copy inside the
    profiled region)."""
    state = {"cache": copy.deepcopy(cache), "tok": tok.clone()}

    def fn():
        out = model(input_ids=state["tok"], past_key_values=state["cache"], use_cache=True)
        state["tok"] = out.logits[:, -1:].argmax(-1)

    return fn


def _prefill_fn(model, ids):
    def fn():
        with torch.no_grad(), experts(model, "grouped_mm"):
            model(input_ids=ids, use_cache=False)

    return fn


@contextlib.contextmanager
def experts(model, impl: str):
    """The MoE experts run as ``impl`` inside the block: prefills take ``grouped_mm`` whatever
    ``--experts`` says, as ``batched_mm`` gathers every token's expert weights, 64 GiB for the
    32 x 256-token prompt (the H200 run ran out of memory there,
    benchmarks/results/model-bench-h200-oom.log)."""
    old = model.config._experts_implementation
    model.set_experts_implementation(impl)
    try:
        yield
    finally:
        model.set_experts_implementation(old)


def _explain_args(cfg, device, dtype, op, T: int = 1):
    """Tensors of ``T`` tokens (the decode step's 1 by default) for ``mhc.explain``: which backend
    serves."""
    n, H = cfg.hc_mult, cfg.hidden_size
    r = torch.zeros(T, n, H, dtype=dtype, device=device)
    m = 2 * n + n * n
    f32 = dict(dtype=torch.float32, device=device)
    if op == "post":
        return (torch.zeros(T, H, dtype=dtype, device=device), r, torch.zeros(T, n, 1, **f32),
                torch.zeros(T, n, n, **f32))
    if op == "head":
        return (r, torch.zeros(n, n * H, **f32), torch.zeros(1, **f32), torch.zeros(n, **f32))
    w = (torch.zeros(m, n * H, **f32), torch.zeros(3, **f32), torch.zeros(m, **f32))
    nw = torch.ones(H, dtype=dtype, device=device)
    scalars = (1e-6, 1e-6, 1e-6, 2.0, 20, nw)
    if op == "pre":
        return (r, *w, *scalars)
    return (torch.zeros(T, H, dtype=dtype, device=device), r, torch.zeros(T, n, 1, **f32),
            torch.zeros(T, n, n, **f32), *w, *scalars)


def _train_backends(cfg, device, dtype, T: int) -> dict[str, str | None]:
    """Which backend serves each forward op and each backward op at the training step's ``T``
    (the patched model passes its sublayer norm's weight to pre and fused_post_pre, so
    ``pre_backward`` is asked with the norm)."""
    import mhc
    from mhc import registry

    n, H = cfg.hc_mult, cfg.hidden_size
    out = {op: mhc.explain(op, *_explain_args(cfg, device, dtype, op, T)).chosen
           for op in ("pre", "fused_post_pre", "post", "head")}
    for op in registry.BACKWARD_OPS:
        p = registry.Problem(op, device, dtype, n, H, T, norm=op == "pre_backward")
        out[op] = registry.explain_problem(p).chosen
    return out


def _device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def table(res) -> str:
    """Markdown: per phase/batch/mode, unpatched vs mhc step time, speedup, mHC share."""
    by = {}
    for r in res["rows"]:
        by.setdefault((r["phase"], r["batch"], r["tokens"], r["mode"]), {})[r["variant"]] = r
    lines = ["| phase | batch | tokens | mode | unpatched | mhc | speedup | mHC share unpatched | mHC share mhc |",
             "|---|---:|---:|---|---:|---:|---:|---:|---:|"]

    def ms(r):
        return f"{r['seconds'] * 1e3:.3f} ms" if r else "–"

    def share(r):
        if not r or r.get("mhc_share") is None:
            return "–"
        return f"{r['mhc_share'] * 100:.1f} % ({r['mhc_us']:.0f} µs)"

    for (phase, b, t, mode), v in by.items():
        u, m = v.get("unpatched"), v.get("mhc")
        sp = f"{u['seconds'] / m['seconds']:.2f}×" if u and m else "–"
        lines.append(f"| {phase} | {b} | {t} | {mode} | {ms(u)} | {ms(m)} | {sp} | {share(u)} | {share(m)} |")
    return "\n".join(lines)


def train_table(res) -> str:
    """Markdown: the training step per model: median step time, peak allocated memory, the losses
    of the first step (a warm-up) and of the last timed one, and the parameters the steps changed
    (of them mHC's). Empty without a training row."""
    rows = [r for r in res["rows"] if r["phase"] == "train"]
    if not rows:
        return ""
    lines = ["| model | step (median) | peak memory | loss, first → last step | parameters changed (mHC's) |",
             "|---|---:|---:|---|---:|"]
    for r in rows:
        peak = f"{r['peak_bytes'] / 2**30:.1f} GiB" if r.get("peak_bytes") is not None else "–"
        lines.append(f"| {r['variant']} | {r['seconds'] * 1e3:.1f} ms | {peak} | {r['losses'][0]:.4f} → "
                     f"{r['losses'][-1]:.4f} | {r['params_changed']} of {r['params']} ({r['hc_params_changed']} of "
                     f"{r['hc_params']}) |")
    return "\n".join(lines)


def _checks_line(checks) -> str:
    """One sentence on the decode steps' checks (the failures are also in the notes)."""
    if not checks:
        return ""
    masks = [c["prebuilt_mask_equals_own"] for c in checks]
    replays = [c["replay_equals_eager"] for c in checks if "replay_equals_eager" in c]
    line = (f"The step with the mask built outside the graph equals the model's own step bit for bit in "
            f"{sum(masks)} of {len(masks)} cases")
    if replays:
        line += (f"; the CUDA-graph replay equals an eager call of the step bit for bit in {sum(replays)} of "
                 f"{len(replays)}")
    return line + "."


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="the tests' tiny config, a few steps (a smoke run)")
    ap.add_argument("--iters", type=int, default=50, help="decode steps timed per case (graphs: 4x)")
    ap.add_argument("--no-graphs", action="store_true", help="skip the CUDA-graph cases")
    ap.add_argument("--experts", default="grouped_mm", choices=("grouped_mm", "batched_mm"),
                    help="the experts implementation for decode (prefills take grouped_mm): transformers' default "
                         "grouped_mm, or batched_mm (gathers each token's expert weights); both capture in a graph, "
                         "the 'eager' loop over the experts hit does not")
    ap.add_argument("--phases", type=lambda v: [x.strip() for x in v.split(",") if x.strip()], default=list(PHASES),
                    help=f"comma list of {', '.join(PHASES)} (default: all)")
    ap.add_argument("--train-tokens", type=int, default=None,
                    help="tokens of the training sequence (default 4096; tiny 64)")
    ap.add_argument("--train-steps", type=int, default=None,
                    help="training steps timed, after 2 warm-up (default 5; tiny 2)")
    ap.add_argument("--train-lr", type=float, default=1e-4, help="AdamW's learning rate (default 1e-4)")
    ap.add_argument("--train-experts", default="grouped_mm", choices=("grouped_mm", "eager"),
                    help="the experts implementation of the training step (default grouped_mm; eager loops over the "
                         "experts hit; batched_mm is not offered: it would gather every token's expert weights)")
    ap.add_argument("--out", default=os.environ.get("OUT") or os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args(argv)
    if args.device.startswith("cpu") and not args.tiny:
        ap.error("the full-size model is for a GPU; on CPU pass --tiny")
    unknown = [ph for ph in args.phases if ph not in PHASES]
    if unknown or not args.phases:
        ap.error(f"--phases: {', '.join(unknown) or 'none given'}; choose from {', '.join(PHASES)}")
    t0 = time.time()
    res = run(args)
    res["wall_seconds"] = time.time() - t0
    md = table(res)
    if train_table(res):
        md += "\n\nTraining step:\n\n" + train_table(res)
    os.makedirs(args.out, exist_ok=True)
    stem = "model_bench_tiny" if args.tiny else "model_bench"
    with open(os.path.join(args.out, stem + ".json"), "w") as f:
        json.dump(res, f, indent=1)
    head = (f"DeepSeek-V4-shaped model (transformers {res['transformers']}): hidden {res['config']['hidden_size']}, "
            f"hc_mult {res['config']['hc_mult']}, {res['config']['layers']} layers, "
            f"{res['config']['n_routed_experts']} experts ({res['config']['experts_per_token']} per token, "
            f"{res['config']['moe_intermediate_size']} wide, {res['config']['experts_implementation']}), vocab "
            f"{res['config']['vocab_size']}, bf16, random weights; {res['device']}, torch {res['torch']}, "
            f"{res['when']}. "
            + (f"Decode after a {res['config']['prompt_tokens']}-token prompt. " if "decode" in res["phases"] else "")
            + f"mhc backends at decode: {res['backends_at_decode']}. "
            + (f"Training: one {res['train']['tokens']}-token sequence, forward + loss.backward() + AdamW step "
               f"(lr {res['train']['lr']:g}), experts {res['train']['experts']}, median of {res['train']['steps']} "
               f"steps after {res['train']['warmup']} warm-up; mhc backends at the training step: "
               f"{res['backends_at_train']}. " if res["train"] else "")
            + f"Patched logits vs unpatched ({res['logits_check_tokens']}-token prefill): "
            f"relative error {res['logits_rel_error_vs_unpatched']:.2e}. {_checks_line(res['checks'])}")
    notes = "".join(f"\n- {n}" for n in res["notes"])
    with open(os.path.join(args.out, stem + ".md"), "w") as f:
        f.write(head + "\n\n" + md + "\n" + (f"\nNotes:{notes}\n" if notes else ""))
    print(head)
    if notes:
        print("notes:" + notes)
    print(f"wrote {os.path.join(args.out, stem)}.{{json,md}} in {res['wall_seconds']:.0f} s\n")
    print(md)


if __name__ == "__main__":
    main()
