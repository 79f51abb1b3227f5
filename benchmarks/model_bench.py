"""A DeepSeek-V4-shaped transformers model with and without ``mhc.integrations.transformers.apply``.

On a GPU (the H200 run of issue 15): hidden 4096, hc_mult 4, 4 layers, DeepSeek-V4's attention
shapes, 8 small routed experts (2 per token, 512 wide) and a vocab of 8192, random weights, bf16.
It measures, for the unpatched model and the patched one in the same run:

- a decode step (one token per sequence after a 256-token prompt) at batch 1 and 32, eagerly
  (a real decode loop: the cache grows by one token a step) and replayed from a CUDA graph
  (``torch.cuda.graph`` around one step on a copy of the prompt's cache; the replay recomputes that
  step, so its time is the step's at that context length);
- a prefill of 4096 tokens (batch 1, eager);
- the mHC share of the eager decode step and of the prefill, from the torch profiler: the device
  time of the ``mhc::*`` ops (patched) or of the modules they replace (``attn_hc``, ``ffn_hc``,
  ``hc_head``, ``input_layernorm``, ``post_attention_layernorm``; unpatched: a lower bound, the
  post step inline in ``DeepseekV4DecoderLayer.forward`` has no module to time) over the device
  time of every kernel.

Writes ``model_bench.json`` and ``model_bench.md`` under ``--out`` (default ``$OUT``, else
``benchmarks/results``) and prints the table last. ``--device cpu --tiny`` is a smoke run (a tiny
config, a few steps, no CUDA graphs) that proves the script works where there is no GPU.

    python benchmarks/model_bench.py                       # the H200 run, about 2-4 minutes
    python benchmarks/model_bench.py --device cpu --tiny   # smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import sys
import time

import torch

_NEEDS = ("transformers==5.17.0 and its dependencies (huggingface_hub, tokenizers, safetensors, regex, tqdm, "
          "typer, pyyaml, numpy, packaging, ...): pip install 'mhc-kernels[transformers]'")

#: mhc ops as the profiler names them (the patched model's mHC).
MHC_OPS = ("mhc::pre", "mhc::fused_post_pre", "mhc::post", "mhc::head")
#: The unpatched model's modules whose work the mhc ops take over (record_function labels).
SITE = "mhc_site"


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


def build_model(cfg, device, dtype, seed=0):
    """Random weights (mHC's ``base``/``scale`` too, which the init sets to 0 and 1), ``dtype``,
    the HC modules in fp32 as ``from_pretrained`` keeps them; experts as batched matmuls (no
    data-dependent loop over the experts hit, which a CUDA graph could not capture)."""
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
    model = model.to(dtype)
    for mod in model.modules():
        if isinstance(mod, hc):
            mod.float()
    if hasattr(model, "set_experts_implementation"):
        try:
            model.set_experts_implementation("batched_mm")
        except Exception as e:  # older or newer transformers: keep the default, say so
            print(f"note: experts implementation left at its default ({type(e).__name__}: {e})", file=sys.stderr)
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


def decode_graph(model, timer, cache, tok, iters):
    """One decode step captured in a CUDA graph (on a copy of the prompt's cache) and replayed."""
    cache = copy.deepcopy(cache)
    static_tok = tok.clone()
    with torch.no_grad():
        warm = copy.deepcopy(cache)
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):  # warm up outside the graph (lazy inits, autotuning, first launches)
            for _ in range(2):
                model(input_ids=static_tok, past_key_values=copy.deepcopy(warm), use_cache=True)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = model(input_ids=static_tok, past_key_values=cache, use_cache=True)
        logits = out.logits
    graph.replay()
    timer.sync()
    return timer.run(graph.replay, iters), logits


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


def _dev_time(e, self_only=False):
    for attr in (("self_device_time_total", "self_cuda_time_total") if self_only
                 else ("device_time_total", "cuda_time_total")):
        v = getattr(e, attr, None)
        if v is not None:
            return v
    return 0.0


def mhc_share(model, fn, device, patched: bool, steps: int = 3):
    """(mHC time, total time, share) in µs for ``steps`` calls of ``fn`` under the profiler:
    device time on a GPU (kernels), CPU time on CPU."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    labels = MHC_OPS if patched else (SITE,)
    ctx = contextlib.nullcontext() if patched else site_labels(model)
    with ctx, torch.no_grad():
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
    events = prof.key_averages()
    if device.type == "cuda":
        ours = sum(_dev_time(e) for e in events if e.key in labels)
        total = sum(_dev_time(e, self_only=True) for e in events)
    else:
        ours = sum(e.cpu_time_total for e in events if e.key in labels)
        total = wall
    return ours / steps, total / steps, (ours / total if total else float("nan"))


def run(args) -> dict:
    version, _, _ = _transformers()
    import mhc
    from mhc.integrations import transformers as mt

    device = torch.device(args.device)
    dtype = torch.bfloat16
    cfg = config(args.tiny)
    model = build_model(cfg, device, dtype)
    timer = Timer(device)
    iters = 3 if args.tiny else args.iters
    prompt = 16 if args.tiny else 256
    pre_tokens = 64 if args.tiny else 4096
    batches = (1, 4) if args.tiny else (1, 32)
    graphs = device.type == "cuda" and not args.no_graphs
    g = torch.Generator().manual_seed(0)
    rows, notes = [], []

    def ids(b, t):
        return torch.randint(0, cfg.vocab_size, (b, t), generator=g).to(device)

    caches = {b: prefill(model, ids(b, prompt)) for b in batches}  # one prompt per batch, shared by both runs
    prefill_ids = ids(1, pre_tokens)
    for variant in ("unpatched", "mhc"):
        handle = mt.apply(model) if variant == "mhc" else None
        try:
            for b in batches:
                cache, tok = caches[b]
                t = decode_eager(model, timer, cache, tok, iters)
                step_fn = _step_fn(model, cache, tok)
                share = mhc_share(model, step_fn, device, variant == "mhc")
                rows.append(dict(variant=variant, phase="decode", batch=b, tokens=b, mode="eager", seconds=t,
                                 mhc_us=share[0], profiled_us=share[1], mhc_share=share[2]))
                if graphs:
                    try:
                        tg, _ = decode_graph(model, timer, cache, tok, iters * 4)
                        rows.append(dict(variant=variant, phase="decode", batch=b, tokens=b, mode="cuda_graph",
                                         seconds=tg))
                    except Exception as e:  # reported, not hidden: the table says the capture failed
                        notes.append(f"{variant} batch {b}: CUDA graph capture failed: {type(e).__name__}: "
                                     f"{str(e).splitlines()[0] if str(e) else ''}")
                        torch.cuda.synchronize()
            fn = _prefill_fn(model, prefill_ids)
            t = timer.run(fn, max(2, iters // 10), warmup=1)
            share = mhc_share(model, fn, device, variant == "mhc", steps=1)
            rows.append(dict(variant=variant, phase="prefill", batch=1, tokens=pre_tokens, mode="eager", seconds=t,
                             mhc_us=share[0], profiled_us=share[1], mhc_share=share[2]))
        finally:
            if handle is not None:
                handle.remove()
    # the patched model's logits against the unpatched model's, on the prefill (a sanity line)
    check_ids = prefill_ids[:, :256]
    with torch.no_grad():
        ref = model(input_ids=check_ids).logits.float()
        with mt.apply(model):
            out = model(input_ids=check_ids).logits.float()
    rel = ((out - ref).norm() / ref.norm()).item()
    backends = {op: mhc.explain(op, *_explain_args(cfg, device, dtype, op)).chosen
                for op in ("pre", "fused_post_pre", "post", "head")}
    return dict(
        when=time.strftime("%Y-%m-%d %H:%M:%S %Z"), device=_device_name(device), torch=torch.__version__,
        transformers=version, python=platform.python_version(), tiny=args.tiny, iters=iters,
        config=dict(hidden_size=cfg.hidden_size, hc_mult=cfg.hc_mult, layers=cfg.num_hidden_layers,
                    n_routed_experts=cfg.n_routed_experts, experts_per_token=cfg.num_experts_per_tok,
                    moe_intermediate_size=cfg.moe_intermediate_size, vocab_size=cfg.vocab_size, dtype="bf16",
                    prompt_tokens=prompt),
        backends_at_decode=backends, logits_rel_error_vs_unpatched=rel, logits_check_tokens=check_ids.shape[1],
        rows=rows, notes=notes)


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
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)

    return fn


def _explain_args(cfg, device, dtype, op):
    """Tensors of the decode-step shapes (T = 1) for ``mhc.explain``: which backend serves."""
    n, H = cfg.hc_mult, cfg.hidden_size
    r = torch.zeros(1, n, H, dtype=dtype, device=device)
    m = 2 * n + n * n
    f32 = dict(dtype=torch.float32, device=device)
    if op == "post":
        return (torch.zeros(1, H, dtype=dtype, device=device), r, torch.zeros(1, n, 1, **f32),
                torch.zeros(1, n, n, **f32))
    if op == "head":
        return (r, torch.zeros(n, n * H, **f32), torch.zeros(1, **f32), torch.zeros(n, **f32))
    w = (torch.zeros(m, n * H, **f32), torch.zeros(3, **f32), torch.zeros(m, **f32))
    nw = torch.ones(H, dtype=dtype, device=device)
    scalars = (1e-6, 1e-6, 1e-6, 2.0, 20, nw)
    if op == "pre":
        return (r, *w, *scalars)
    return (torch.zeros(1, H, dtype=dtype, device=device), r, torch.zeros(1, n, 1, **f32),
            torch.zeros(1, n, n, **f32), *w, *scalars)


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
        return f"{r['mhc_share'] * 100:.1f} % ({r['mhc_us']:.0f} µs)" if r and "mhc_share" in r else "–"

    for (phase, b, t, mode), v in by.items():
        u, m = v.get("unpatched"), v.get("mhc")
        sp = f"{u['seconds'] / m['seconds']:.2f}×" if u and m else "–"
        lines.append(f"| {phase} | {b} | {t} | {mode} | {ms(u)} | {ms(m)} | {sp} | {share(u)} | {share(m)} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="the tests' tiny config, a few steps (a smoke run)")
    ap.add_argument("--iters", type=int, default=50, help="decode steps timed per case (graphs: 4x)")
    ap.add_argument("--no-graphs", action="store_true", help="skip the CUDA-graph cases")
    ap.add_argument("--out", default=os.environ.get("OUT") or os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args(argv)
    if args.device.startswith("cpu") and not args.tiny:
        ap.error("the full-size model is for a GPU; on CPU pass --tiny")
    t0 = time.time()
    res = run(args)
    res["wall_seconds"] = time.time() - t0
    md = table(res)
    os.makedirs(args.out, exist_ok=True)
    stem = "model_bench_tiny" if args.tiny else "model_bench"
    with open(os.path.join(args.out, stem + ".json"), "w") as f:
        json.dump(res, f, indent=1)
    head = (f"DeepSeek-V4-shaped model (transformers {res['transformers']}): hidden {res['config']['hidden_size']}, "
            f"hc_mult {res['config']['hc_mult']}, {res['config']['layers']} layers, "
            f"{res['config']['n_routed_experts']} experts ({res['config']['experts_per_token']} per token, "
            f"{res['config']['moe_intermediate_size']} wide), vocab {res['config']['vocab_size']}, bf16, random "
            f"weights; {res['device']}, torch {res['torch']}, {res['when']}. Decode after a "
            f"{res['config']['prompt_tokens']}-token prompt. mhc backends at decode: {res['backends_at_decode']}. "
            f"Patched logits vs unpatched ({res['logits_check_tokens']}-token prefill): relative error "
            f"{res['logits_rel_error_vs_unpatched']:.2e}.")
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
