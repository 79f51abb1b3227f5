"""The README as a package index shows it (issue 27): its examples run as written, its first screen
has the usage, it links to nothing relative, and the LICENSE it names exists."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", README, re.S | re.M)


def _run(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)


def test_the_usage_example_runs_as_written():
    """The first example: mhc.pre, torch.ops.mhc.pre, a backend for a call and for a scope."""
    code = _python_blocks()[0]
    for call in ("mhc.pre(", "torch.ops.mhc.pre(", "backend=", "mhc.use_backend("):
        assert call in code, call
    out = _run(code)
    assert out.returncode == 0, out.stderr


def test_the_transformers_example_runs_with_its_imports():
    """It once omitted ``import mhc.integrations.transformers``, which ``import mhc`` does not do."""
    pytest.importorskip("transformers.models.deepseek_v4.modeling_deepseek_v4")
    (code,) = [b for b in _python_blocks() if "integrations.transformers.apply" in b]
    assert "import mhc.integrations.transformers" in code
    # from_pretrained(...) gets a tiny random model; the rest runs as written, in a fresh process.
    prelude = ("import transformers\n"
               "cfg = transformers.DeepseekV4Config(vocab_size=64, hidden_size=256, moe_intermediate_size=64, "
               "num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=1, head_dim=64, q_lora_rank=64, "
               "num_experts_per_tok=2, n_routed_experts=4, n_shared_experts=1, o_groups=2, o_lora_rank=64, "
               "index_n_heads=2, index_head_dim=32, index_topk=8, sliding_window=16, num_nextn_predict_layers=0, "
               "hc_mult=4, max_position_embeddings=64)\n"
               "transformers.DeepseekV4ForCausalLM.from_pretrained = classmethod(lambda cls, *a, **k: cls(cfg))\n")
    check = ("\nassert isinstance(handle, mhc.integrations.transformers.Handle)"
             "\nassert not any(mhc.integrations.transformers._patched(m) for m in model.modules())\n")
    out = _run(prelude + code + check)
    assert out.returncode == 0, out.stderr


def test_the_first_screen_has_what_install_and_usage():
    lines = README.splitlines()
    first = "\n".join(lines[:60])
    assert "mHC" in lines[0] and "## Install" in first and "pip install mhc-kernels" in first
    assert "mhc.pre(" in first and "## Usage" in first


def test_no_relative_links():
    """A package index shows the README without the repository: a relative link breaks there."""
    links = re.findall(r"\]\(([^)]*)\)", README)
    assert [u for u in links if not u.startswith("https://")] == [], links


def test_install_section_names_the_other_distributions_of_module_mhc():
    install = README.split("## Install", 1)[1].split("\n## ", 1)[0]
    for dist in ("`mhc`", "`mhc-pytorch`", "`mhc-cuda`"):
        assert dist in install, dist
    assert "python -m mhc info" in install


def test_the_two_commands_are_there_as_ci_runs_them():
    """.ci/run runs the README's two commands (the main job, the fast suite) as written here."""
    assert ('python3 -m venv .venv && . .venv/bin/activate && pip install "torch==2.13.0" && '
            'pip install -e ".[triton,tilelang,test,transformers]" && python -m mhc\n') in README
    assert "\npython -m pytest -q\n" in README


def test_license_is_the_mit_license_pyproject_declares():
    assert 'license = { text = "MIT" }' in (ROOT / "pyproject.toml").read_text()
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License\n") and "Copyright (c) 2026 the mhc authors" in text
