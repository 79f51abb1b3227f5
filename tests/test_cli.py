"""``python -m mhc`` (the README's main job) and its subcommands."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

ROOT = str(pathlib.Path(__file__).resolve().parent.parent)


def _mhc(*args, env_extra=None):
    env = {**os.environ, "PYTHONPATH": ROOT, **(env_extra or {})}
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, "-m", "mhc", *args], env=env, capture_output=True, text=True,
                          timeout=600)


def test_main_job_reports_backends_and_agrees_with_reference():
    out = _mhc("--H", "256", "--T", "8", "--reps", "2")
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout
    assert "torch     serves pre, post, head, fused_post_pre" in text
    rows = [line for line in text.splitlines() if line.startswith("torch ")]
    assert len(rows) == 4 and all(" ok " in r for r in rows) and "FAIL" not in text
    for name in ("triton", "tilelang", "aiter"):
        assert f"  {name}" in text


def test_info_explains_each_backend_that_cannot_serve():
    out = _mhc("info")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    for line in lines:
        if "cannot serve" in line:
            i = lines.index(line)
            assert lines[i + 1].startswith("      "), f"no reason after {line!r}"


def test_check_fails_loudly_when_a_backend_disagrees(tmp_path):
    plugin = tmp_path / "wrongmhc.py"
    plugin.write_text(
        "import torch\nfrom mhc import reference\nfrom mhc.registry import Backend, Capabilities\n"
        "class W:\n"
        "    pre = staticmethod(reference.pre)\n    head = staticmethod(reference.head)\n"
        "    fused_post_pre = staticmethod(reference.fused_post_pre)\n"
        "    @staticmethod\n    def post(x, r, p, c):\n        return reference.post(x, r, p, c) * 1.5\n"
        "BACKEND = Backend('wrong', None, Capabilities(frozenset({'cpu'}), frozenset({torch.bfloat16})), load=W)\n")
    dist = tmp_path / "wrongmhc-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: wrongmhc\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[mhc.backends]\nwrong = wrongmhc:BACKEND\n")
    env = {"PYTHONPATH": f"{tmp_path}:{ROOT}"}
    # --device cpu: the plug-in serves CPU tensors only, and a GPU machine's default device is cuda.
    out = _mhc("check", "--backend", "wrong", "--device", "cpu", "--H", "64", "--T", "4", "--reps", "1",
               env_extra=env)
    assert out.returncode == 1
    assert "DISAGREES WITH THE REFERENCE" in out.stdout and "wrong.post" in out.stdout


def test_unknown_aot_backend_is_an_argument_error():
    out = _mhc("aot", "--backend", "nosuch", "--arch", "sm90")
    assert out.returncode == 2 and "invalid choice" in out.stderr


# --- user errors: one line, exit status 2 (issues 16 and 17) ----------------------------------------

import pytest  # noqa: E402
import torch  # noqa: E402

from mhc.__main__ import main  # noqa: E402

_NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")


@pytest.mark.parametrize("argv, words", [
    (["check", "--H", "0"], "argument --H: must be in [1, 65536]"),    # was ZeroDivisionError
    (["check", "--T", "-1"], "argument --T: must be in [1, 1048576]"),  # was RuntimeError
    (["check", "--n", "0"], "argument --n: must be in [1, 8]"),        # exited 0, every cell n/a
    (["--n", "9"], "argument --n: must be in [1, 8]"),                 # the main job, no subcommand
    (["info", "--H", "-3"], "argument --H: must be in [1, 65536]"),
    (["check", "--reps", "0"], "argument --reps: must be in [1, 10000]"),
    (["check", "--seed", "-1"], f"argument --seed: must be in [0, {2**63 - 1}]"),
    # issue 28: sizes and counts too large were tracebacks (or, --reps, a run that never ends)
    (["check", "--T", str(10**12)], "argument --T: must be in [1, 1048576] (tokens), got 1000000000000"),
    (["check", "--T", str(10**30)], "argument --T: must be in [1, 1048576] (tokens), got 1000000000"),
    (["check", "--H", str(10**9)], "argument --H: must be in [1, 65536] (the hidden size), got 1000000000"),
    (["info", "--H", str(10**9)], "argument --H: must be in [1, 65536]"),
    # (--backend nope: a later error, so that a build without the bound fails at once instead of running)
    (["check", "--reps", str(10**12), "--backend", "nope"], "argument --reps: must be in [1, 10000]"),
    (["check", "--seed", str(2**63)], "argument --seed: must be in [0, "),
    (["check", "--T", "4096", "--H", "65536", "--backend", "nope"], "check allows 268435456 (2**28)"),
    (["check", "--T", "1e3"], "argument --T: '1e3' is not an integer (tokens, in [1, 1048576])"),
    (["check", "--backend", "nope"], "--backend 'nope' is not a backend; known: "),  # was ValueError
    (["check", "--backend", "bogus"], "--backend 'bogus' is not a backend"),
    (["check", "--device", "meta"], "--device meta: meta tensors hold no values"),  # NotImplementedError
    (["check", "--device", "foo"], "--device 'foo' is not a torch device"),
    pytest.param(["check", "--device", "cuda"], "--device cuda: no GPU is visible", marks=_NO_GPU),  # assert
    (["aot", "--backend", "triton", "--arch", "sm1"], "--arch sm1: triton builds for sm90, gfx942, gfx950"),
    (["aot", "--backend", "triton", "--arch", "sm80"], "--arch sm80: triton builds for"),
    (["aot", "--backend", "triton", "--arch", ","], "--arch names no architecture"),
])
def test_argument_errors_are_one_line_and_exit_2(capsys, argv, words):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("python -m mhc") and ": error: " in last and words in last, err
    assert "Traceback" not in err


@pytest.mark.parametrize("cmd", ["info", "check"])
def test_a_malformed_mhc_backend_is_an_argument_error(capsys, monkeypatch, cmd):
    monkeypatch.setenv("MHC_BACKEND", "pre:triton,pre:torch")
    with pytest.raises(SystemExit) as e:
        main([cmd])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 2 and "MHC_BACKEND='pre:triton,pre:torch': pre is given twice" in last


def test_tilelang_arch_errors_are_argument_errors(capsys):
    with pytest.raises(SystemExit) as e:
        main(["aot", "--backend", "tilelang", "--arch", "sm1"])
    assert e.value.code == 2 and "unrecognised arch 'sm1'" in capsys.readouterr().err


def test_subcommands_and_problem_options_have_help(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    top = capsys.readouterr().out
    for name, words in (("info", "versions"), ("check", "each backend"), ("aot", "compile")):
        assert re.search(rf"^ +{name} +{words}", top, re.M), top
    with pytest.raises(SystemExit):
        main(["check", "--help"])
    options = " ".join(capsys.readouterr().out.split("options:", 1)[1].split())
    for opt, default in (("--n N", "4"), ("--H H", "512"), ("--T T", "64"), ("--reps REPS", "200"),
                         ("--seed SEED", "0")):
        described = options.split(opt + " ", 1)[1].split(" --", 1)[0]  # the text up to the next option
        assert f"(default: {default})" in described and len(described) > len("(default: 0)") + 5, (opt, described)


def test_check_cells_name_the_output_their_error_is_for(capsys):
    """Regression (issue 17): one number per cell under two tolerances, so "1.7e-03 ok" read as
    over the 1e-3 mix tolerance."""
    assert main(["check", "--backend", "torch", "--device", "cpu", "--H", "32", "--T", "3", "--reps", "1"]) == 0
    out = capsys.readouterr().out
    assert "tolerance 0.01 for layer_input, new_residual and out, 0.001 for post_mix and comb_mix" in out
    rows = [line for line in out.splitlines() if line.startswith("torch ")]
    assert [r.split()[1] for r in rows] == ["pre", "post", "head", "fused_post_pre"]
    names = ("post_mix=", "comb_mix=", "layer_input=", "out=", "new_residual=")
    for row in rows:
        _, _, result, cell, kernel, eager = row.split()
        assert result == "ok" and cell.startswith(names), row
        # two labelled columns: kernel (graph replay; none on a CPU) and eager µs per call
        assert kernel == "—" and eager.endswith(("us", "ms")), row
    assert "kernel µs" in out and "eager µs" in out


def test_check_with_nothing_to_check_fails(capsys):
    """A backend that cannot serve anything here is not a pass."""
    rc = main(["check", "--backend", "aiter", "--device", "cpu", "--H", "32", "--T", "3", "--reps", "1"])
    assert rc == 1 and "NOTHING CHECKED: aiter cannot serve" in capsys.readouterr().out


# --- issue 27: usage names the program as invoked; errors print the usage they concern -------------


def _run(args, stdout=subprocess.PIPE):
    """``python *args`` with this checkout first on the path; stdout piped unless given."""
    env = {**os.environ, "PYTHONPATH": ROOT}
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, *args], env=env, stdout=stdout, stderr=subprocess.PIPE, text=True,
                          timeout=600)


def test_usage_names_the_program_as_invoked(tmp_path):
    script = tmp_path / "mhc"  # what the installed console script runs: main() with sys.argv[0] = .../mhc
    script.write_text("import sys\nfrom mhc.__main__ import main\nsys.exit(main())\n")
    for argv0, prog in (([str(script)], "mhc"), (["-m", "mhc"], "python -m mhc")):
        out = _run([*argv0, "check", "--n", "0"])
        assert out.returncode == 2, out.stderr
        assert out.stderr.startswith(f"usage: {prog} check [-h]"), out.stderr
        assert out.stderr.strip().splitlines()[-1].startswith(f"{prog} check: error: argument --n"), out.stderr
    out = _run([str(script), "--help"])
    assert out.returncode == 0 and out.stdout.startswith("usage: mhc [-h]"), out.stdout


def test_an_unknown_subcommand_is_an_invalid_choice(capsys):
    with pytest.raises(SystemExit) as e:
        main(["chek"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "invalid choice: 'chek'" in err, err


@pytest.mark.parametrize("argv, usage, extra", [
    (["check", "--bogus"], "usage: python -m mhc check [-h] [--n N]", "--bogus"),
    (["info", "--reps", "3"], "usage: python -m mhc info [-h] [--n N]", "--reps 3"),  # check's option
    (["aot", "--backend", "triton", "--arch", "sm90", "--bogus"], "usage: python -m mhc aot [-h] --backend",
     "--bogus"),
    (["--bogus"], "usage: python -m mhc [-h] [--n N]", "--bogus"),  # the main job: info, then check
])
def test_a_bad_flag_prints_the_usage_of_its_subcommand(capsys, argv, usage, extra):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(usage), err
    assert err.strip().splitlines()[-1].endswith(f"error: unrecognized arguments: {extra}"), err
    assert ("--reps" in err.split("error:")[0]) == (argv[0] in ("check", "--bogus")), err  # the options it takes


@pytest.mark.parametrize("argv", [["--help"], ["info", "--help"], ["check", "--help"], ["aot", "--help"],
                                  ["--T", "3", "--help"]])
def test_help_has_no_rest_markup(capsys, argv):
    with pytest.raises(SystemExit) as e:
        main(argv)
    text = capsys.readouterr().out
    assert e.value.code == 0 and text.startswith("usage: python -m mhc")
    assert "``" not in text and not re.search(r":[a-z]+:`", text), text


def test_info_names_another_distribution_that_installs_mhc(tmp_path):
    """PyPI has three other distributions with a top-level module ``mhc`` (mhc, mhc-pytorch,
    mhc-cuda): installed beside this one, they overwrite each other's files."""
    dist = tmp_path / "mhc_pytorch-0.3.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: mhc-pytorch\nVersion: 0.3\n")
    (dist / "top_level.txt").write_text("mhc\n")
    out = _mhc("info", env_extra={"PYTHONPATH": f"{tmp_path}:{ROOT}"})
    assert out.returncode == 0, out.stderr
    clash = [line for line in out.stdout.splitlines() if line.startswith("NAME CLASH")]
    assert len(clash) == 1 and "mhc-pytorch 0.3 also installs a top-level module mhc" in clash[0], out.stdout
    assert "pip uninstall mhc-pytorch" in clash[0]
    assert "NAME CLASH" not in _mhc("info").stdout


# --- issue 28: output errors as a Unix tool's ---------------------------------------------------------

_SMALL_CHECK = ["check", "--backend", "torch", "--device", "cpu", "--H", "32", "--T", "3", "--reps", "1"]


@pytest.mark.parametrize("args", [["info"], _SMALL_CHECK, ["--help"]])
def test_a_reader_that_stopped_reading_ends_the_run_quietly(args):
    """python -m mhc check | head -c 10: a BrokenPipeError was a traceback. Here the pipe's read end
    is closed before the first write (head that has already exited), so the case is deterministic."""
    r, w = os.pipe()
    os.close(r)
    try:
        out = _run(["-m", "mhc", *args], stdout=w)
    finally:
        os.close(w)
    assert out.returncode == 141 and out.stderr == "", out.stderr  # 128 + SIGPIPE, as a Unix tool


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
@pytest.mark.parametrize("args", [["info"], _SMALL_CHECK, ["--help"]])
def test_a_full_disk_is_one_line_and_exit_1(args):
    """python -m mhc info > /dev/full was a traceback (OSError: No space left on device)."""
    with open("/dev/full", "w") as full:
        out = _run(["-m", "mhc", *args], stdout=full)
    assert out.returncode == 1, out.stderr
    assert out.stderr == "python -m mhc: error writing the output: No space left on device\n", out.stderr
