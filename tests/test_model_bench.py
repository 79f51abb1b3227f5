"""``benchmarks/model_bench.py``'s training step on CPU: the tests' tiny DeepSeek-V4 config, mhc's
torch backend for every forward and backward op. The step must train (finite losses, parameters
changed, mHC's among them: the gradients reach them through mhc's backward), both models must
start from the same weights, and the profiler's mHC share of the step must count the backward
of the mHC sites (the autograd nodes their forward ops created)."""

from __future__ import annotations

import importlib.util
import json
import math
import pathlib
import sys

import pytest
import torch

pytest.importorskip("transformers.models.deepseek_v4.modeling_deepseek_v4",
                    reason="transformers with DeepSeek-V4 not installed (pip install -e '.[transformers]')")

import mhc  # noqa: E402
from mhc import registry  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "model_bench.py"
#: Every forward and backward op on mhc's torch backend (a bare name covers forward ops only).
TORCH_EVERYWHERE = {op: "torch" for op in (*registry.OPS, *registry.BACKWARD_OPS)}


def _load():
    spec = importlib.util.spec_from_file_location("mhc_benchmarks_model_bench", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


mb = _load()


def test_training_step_trains_both_models_from_the_same_weights(tmp_path):
    with mhc.use_backend(**TORCH_EVERYWHERE):
        mb.main(["--device", "cpu", "--tiny", "--phases", "train", "--train-steps", "1", "--out", str(tmp_path)])
    res = json.loads((tmp_path / "model_bench_tiny.json").read_text())
    rows = [r for r in res["rows"] if r["phase"] == "train"]
    assert [r["variant"] for r in rows] == ["unpatched", "mhc"]
    assert res["phases"] == ["train"] and not any(r["phase"] != "train" for r in res["rows"])
    assert set(res["backends_at_train"].values()) == {"torch"}
    for r in rows:
        assert len(r["losses"]) == 3 and all(math.isfinite(v) for v in r["losses"])  # 2 warm-up + 1 timed
        assert r["seconds"] > 0 and r["tokens"] == 64
        assert r["params_changed"] > 0
        assert r["hc_params"] > 0 and r["hc_params_changed"] == r["hc_params"], r
        assert r["mhc_us"] > 0 and 0 < r["mhc_share"]
    # The parameters were restored between the models: their first losses (same weights, same
    # tokens) differ only by the two mHC implementations' roundings.
    first = [r["losses"][0] for r in rows]
    assert abs(first[0] - first[1]) <= 1e-2 * abs(first[0]), first
    # and the losses fall over the steps (a step of AdamW on the same sequence)
    assert all(r["losses"][-1] < r["losses"][0] for r in rows)
    md = (tmp_path / "model_bench_tiny.md").read_text()
    assert "| train | 1 | 64 | eager |" in md and "Training step:" in md
    assert not [n for n in res["notes"] if "failed" in n or "out of memory" in n], res["notes"]


def _profiled_step(model, ids):
    from torch.profiler import ProfilerActivity, profile

    model.train()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    model.zero_grad(set_to_none=True)
    return prof.events()


def test_backward_nodes_are_those_the_mhc_sites_created():
    """Patched: exactly one backward node per mhc op call of the forward (per layer pre,
    fused_post_pre and post; then head). Unpatched: the nodes of the hyper-connection modules'
    own ops, many more than that."""
    from mhc.integrations import transformers as mt

    cfg = mb.config(True)
    model = mb.build_model(cfg, torch.device("cpu"), torch.bfloat16, "grouped_mm")
    ids = torch.randint(0, cfg.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0))
    with mhc.use_backend(**TORCH_EVERYWHERE), mt.apply(model):
        events = _profiled_step(model, ids)
    nodes = mb._backward_nodes(events, mb.MHC_OPS)
    calls = sum(e.name in mb.MHC_OPS for e in events)
    assert calls == 3 * cfg.num_hidden_layers + 1
    assert len(nodes) == calls and len({(e.fwd_thread, e.sequence_nr) for e in nodes}) == calls
    with mb.site_labels(model):
        events = _profiled_step(model, ids)
    nodes = mb._backward_nodes(events, (mb.SITE,))
    assert len(nodes) > 3 * calls
    assert all(e.name.startswith(mb.EVAL) for e in nodes)
