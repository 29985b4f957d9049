"""The command line: happy path on a tiny model, and one clear line for every bad input.

In-process: `run` calls `recursify.cli.main` (where errors become one stderr line and an exit
code) and captures the file descriptors, so torch and transformers are imported once for the
file. Only what needs a fresh interpreter runs in a subprocess: `python -m recursify` itself
(`test_python_dash_m_recursify_prints_help`), lm-eval made unimportable before anything is
imported, a command module that fails to import, and the package run from a copy of itself.
"""

from __future__ import annotations

import ast
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest
from tiny_models import byte_tokenizer, save_tiny
from transformers import BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel

from recursify.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


@dataclass
class Result:
    """What a shell sees of one `recursify` run."""

    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def run(capfd, monkeypatch):
    """`run(*args)`: `recursify ARGS` in this process, as `python -m recursify` would run it
    (`sys.exit(main(args))`): its exit code, and its stdout and stderr as file descriptors 1 and 2
    received them. An exception that escapes `main` (only with --debug) is printed with its
    traceback and exits 1, as the interpreter does."""
    monkeypatch.delenv("TRANSFORMERS_VERBOSITY", raising=False)  # the CLI sets it; the test's end restores it

    def run(*args) -> Result:
        with monkeypatch.context() as m:
            # Logging handlers made at import time hold pytest's stream: point them at the captured stderr.
            for name in ("", "transformers"):
                for handler in logging.getLogger(name).handlers:
                    if type(handler) is logging.StreamHandler:
                        m.setattr(handler, "stream", sys.stderr)
            capfd.readouterr()  # start from nothing
            try:
                code = main(list(args))
            except SystemExit as e:
                code = e.code
            except Exception:  # noqa: BLE001 - what the interpreter does with it
                traceback.print_exc()
                code = 1
            if not isinstance(code, int):  # sys.exit("message") or sys.exit(None)
                if code is not None:
                    print(code, file=sys.stderr)
                code = 0 if code is None else 1
            sys.stdout.flush()
            sys.stderr.flush()
            out, err = capfd.readouterr()
        return Result(code, out, err)

    return run


def run_code(code, *args, timeout=240, **kwargs):
    return subprocess.run([sys.executable, "-c", code, *args], check=False, capture_output=True, text=True,
                          timeout=timeout, **kwargs)


COMMANDS = {"compress", "convert", "generate", "info", "eval", "train", "plot", "serve", "bench-serve", "report"}

# The CLI as `recursify` runs it, with lm-eval (the `eval` extra) made unimportable before anything is
# imported: one fresh interpreter runs `main` once per argv of the JSON list in argv[1], each run's
# output between marker lines on stdout and on stderr, its exit code on the marker after it.
WITHOUT_LM_EVAL = """
import json, sys
sys.modules['lm_eval'] = None
from recursify.cli import main
for argv in json.loads(sys.argv[1]):
    for f in (sys.stdout, sys.stderr):
        print('@@run', file=f, flush=True)
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    sys.stderr.flush()
    print('@@exit', code, flush=True)
"""


def run_without_lm_eval(*argvs) -> tuple[str, list[Result]]:
    """The results of `recursify ARGV` for each argv, with lm-eval unimportable; and what was
    printed to stderr before the first run (on importing the CLI)."""
    done = run_code(WITHOUT_LM_EVAL, json.dumps([list(a) for a in argvs]))
    assert done.returncode == 0, done.stderr
    outs = done.stdout.split("@@run\n")[1:]
    prelude, *errs = done.stderr.split("@@run\n")
    assert len(outs) == len(errs) == len(argvs), done.stdout + done.stderr
    results = []
    for out, err in zip(outs, errs):
        out, _, code = out.rpartition("@@exit ")
        results.append(Result(int(code) if code.strip() != "None" else 0, out, err))
    return prelude, results


def listed_commands(help_text):
    return set(re.findall(r"^\W+([a-z][a-z-]*)\s{2,}", help_text, re.MULTILINE))


def assert_clean_error(res, needle):
    assert res.returncode != 0
    lines = [line for line in res.stderr.strip().splitlines() if line.strip()]
    assert "Traceback" not in res.stderr, res.stderr
    assert lines and needle in lines[-1], res.stderr
    assert lines[-1].startswith("error")


def save_bert(path):
    """A tiny masked-LM encoder with its tokenizer: a model every command must refuse."""
    config = BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=40)
    BertForMaskedLM(config).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny("llama", tmp_path_factory.mktemp("src") / "tiny-llama")


def test_convert_then_generate(run, tiny, tmp_path):
    out = tmp_path / "rec"
    res = run("convert", str(tiny), "--loops", "2", "--lora-rank", "4", "--out", str(out))
    assert res.returncode == 0, res.stderr
    assert "compression" in res.stdout and "unique layers" in res.stdout
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    res = run("generate", str(out), "--teacher", str(tiny), "--prompt", "hello", "--max-new-tokens", "4")
    assert res.returncode == 0, res.stderr
    assert "teacher: tiny-llama" in res.stdout and "model: rec" in res.stdout
    res = run("info", str(out))
    assert res.returncode == 0 and "slot of position" in res.stdout


def test_convert_calibrate_records_it_and_refuses_too_little_text(run, tiny, tmp_path, monkeypatch):
    text = tmp_path / "text"
    text.mkdir()
    for i in range(40):
        (text / f"doc{i}.txt").write_text(" ".join(f"word{(i * 7 + j) % 50} and more text" for j in range(30)))
    monkeypatch.setenv("RECURSIFY_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "cal"
    res = run("convert", str(tiny), "--lora-rank", "4", "--calibrate", str(text), "--calib-tokens", "512",
              "--out", str(out))
    assert res.returncode == 0, res.stderr
    recursion = json.loads((out / "config.json").read_text())["recursion"]
    assert recursion["calibration"] == {"tokens": 512, "damp": 0.01}
    res = run("convert", str(tiny), "--lora-rank", "4", "--calibrate", str(text), "--calib-tokens", "512",
              "--curvature", "--sequential", "--out", str(tmp_path / "both"))
    assert res.returncode == 0, res.stderr
    recursion = json.loads((tmp_path / "both" / "config.json").read_text())["recursion"]
    assert recursion["calibration"]["curvature_tokens"] == 512 and recursion["calibration"]["sequential"]
    assert_clean_error(run("convert", str(tiny), "--lora-rank", "4", "--curvature", "--out", str(tmp_path / "o3")),
                       "--curvature needs --calibrate")
    (tmp_path / "tiny.txt").write_text("too short")
    assert_clean_error(run("convert", str(tiny), "--lora-rank", "4", "--calibrate", str(tmp_path / "tiny.txt"),
                           "--out", str(tmp_path / "o2")), "calibration data")
    assert not (tmp_path / "o2").exists()


def test_missing_path(run, tmp_path):
    assert_clean_error(run("convert", str(tmp_path / "nope"), "--out", str(tmp_path / "o")), "model not found")


def test_not_a_causal_lm(run, tmp_path):
    save_bert(tmp_path / "bert")
    assert_clean_error(run("convert", str(tmp_path / "bert"), "--out", str(tmp_path / "o")), "not supported")


def test_unsupported_family(run, tmp_path):
    GPT2LMHeadModel(GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=2)).save_pretrained(tmp_path / "gpt2")
    res = run("convert", str(tmp_path / "gpt2"), "--out", str(tmp_path / "o"))
    assert_clean_error(res, "recursify supports: gemma")
    assert not (tmp_path / "o").exists()


def test_loops_that_do_not_divide(run, tiny, tmp_path):
    assert_clean_error(run("convert", str(tiny), "--loops", "4", "--out", str(tmp_path / "o")), "valid values: 1, 2, 3, 6")


def test_rank_too_large_leaves_no_output(run, tiny, tmp_path):
    res = run("convert", str(tiny), "--loops", "2", "--lora-rank", "1000", "--out", str(tmp_path / "o"))
    assert_clean_error(res, "larger than min(d_in, d_out)")
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_refused(run, tiny, tmp_path):
    (tmp_path / "o").mkdir()
    assert_clean_error(run("convert", str(tiny), "--out", str(tmp_path / "o")), "already exists")


def test_corrupted_checkpoint(run, tiny, tmp_path):
    out = tmp_path / "rec"
    assert run("convert", str(tiny), "--loops", "2", "--out", str(out)).returncode == 0
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    res = run("generate", str(out), "--max-new-tokens", "2")
    assert_clean_error(res, "")
    res = run("--debug", "generate", str(out), "--max-new-tokens", "2")
    assert "Traceback" in res.stderr


def test_python_dash_m_recursify_prints_help():
    """The one `python -m recursify` subprocess here (test_cli_contract has the failing one): the
    help reaches the shell's stdout with exit 0, and it teaches the strategies."""
    res = subprocess.run([sys.executable, "-m", "recursify", "convert", "--help"], check=False, capture_output=True,
                         text=True, timeout=240)
    assert res.returncode == 0, res.stderr
    for word in ("--loops", "cycle", "stepwise", "full"):
        assert word in res.stdout


def test_eval_reports_exits_and_agreement(run, tiny, tmp_path):
    import json

    out = tmp_path / "rec"
    assert run("convert", str(tiny), "--loops", "2", "--lora-rank", "full", "--out", str(out)).returncode == 0
    text = tmp_path / "heldout.txt"
    text.write_text(" ".join(f"word{i % 17} and more text {i}." for i in range(400)))
    res = run("eval", str(out), "--data", str(text), "--teacher", str(tiny), "--seq-len", "32",
              "--max-tokens", "512", "--tasks", "ppl,exits,agreement", "--json", str(tmp_path / "r.json"))
    assert res.returncode == 0, res.stderr
    result = json.loads((tmp_path / "r.json").read_text())
    # Full rank reproduces the teacher: same perplexity, perfect agreement, zero KL.
    assert result["ppl"]["ppl"] == pytest.approx(result["teacher_ppl"]["ppl"], rel=1e-4)
    assert result["agreement"]["top1_agreement"] == 1.0
    assert result["agreement"]["kl"] < 1e-6
    assert set(result["exit_ppl"]) == {"1", "2"}


def test_eval_stride_equal_to_seq_len_scores_disjoint_windows(run, tiny, tmp_path):
    """--stride = --seq-len scores disjoint windows, as compress's summary does: the mean of the
    model's own loss over the 32-token chunks of the held-out tokens."""
    import json
    import math

    import torch

    import recursify as rf
    from recursify.data import DataConfig, build_datasets

    text = tmp_path / "heldout.txt"
    text.write_text(" ".join(f"word{i % 17} and more text {i}." for i in range(400)))
    res = run("eval", str(tiny), "--data", str(text), "--seq-len", "32", "--max-tokens", "256", "--stride", "32",
              "--tasks", "ppl", "--json", str(tmp_path / "r.json"))
    assert res.returncode == 0, res.stderr
    ppl = json.loads((tmp_path / "r.json").read_text())["ppl"]["ppl"]
    model, tok = rf.load_pretrained(str(tiny))
    heldout, _ = build_datasets(DataConfig(sources=[str(text)], seq_len=32, heldout_fraction=0.0, max_tokens=256), tok)
    chunks = torch.as_tensor(heldout.read_tokens(0, 256).astype("int64")).view(-1, 32)
    with torch.no_grad():
        losses = [model(c[None], labels=c[None]).loss.item() for c in chunks]  # 31 predictions each
    assert ppl == pytest.approx(math.exp(sum(losses) / len(losses)), rel=1e-4)
    assert_clean_error(run("eval", str(tiny), "--data", str(text), "--seq-len", "32", "--stride", "33", "--tasks", "ppl"),
                       "--stride must be between 1 and --seq-len (32), got 33")


def test_eval_unknown_task(run, tiny):
    assert_clean_error(run("eval", str(tiny), "--tasks", "mmlu"), "unknown task 'mmlu'")


def test_report_bad_inputs(run, tiny, tmp_path):
    assert_clean_error(run("report", "--budget", "huge", "--out", str(tmp_path / "r")), "unknown budget 'huge'")
    text = tmp_path / "t.txt"
    text.write_text("some text " * 50)
    save_bert(tmp_path / "bert")
    res = run("report", "--model", str(tmp_path / "bert"), "--data", str(text), "--heldout", str(text), "--out", str(tmp_path / "r"))
    assert_clean_error(res, "not a causal language model")
    res = run("report", "--list")
    assert res.returncode == 0 and "truncated-kd" in res.stdout and "rec-cycle-average-r64-kd-exit_aggressive" in res.stdout
    assert all(f"rec-cycle-average-r64-{k} " in res.stdout for k in ("cal", "cal-kd", "cal-local-kd", "alloc", "alloc-kd"))
    assert_clean_error(run("report", "--calib-tokens", "10", "--list"), "calib_tokens=10 is less than one sequence")


def test_eval_bad_inputs(run, tiny, tmp_path):
    from test_train import word_tokenizer

    text = tmp_path / "heldout.txt"
    text.write_text("\n\n".join(f"paragraph {i}: " + " ".join(f"word{(i * j) % 31}" for j in range(60)) for i in range(20)))
    # a teacher whose tokenizer maps text to other ids: KL and agreement would be meaningless
    other = tmp_path / "other-teacher"
    save_tiny("llama", other)
    word_tokenizer(97).save_pretrained(other)
    res = run("eval", str(tiny), "--data", str(text), "--teacher", str(other), "--tasks", "agreement", "--seq-len", "32")
    assert_clean_error(res, "tokenizer differs")
    # held-out text that is also the training text: a warning, the numbers are still produced
    res = run("eval", str(tiny), "--data", str(text), "--train-data", str(text), "--tasks", "ppl", "--seq-len", "32",
              "--max-tokens", "256")
    assert res.returncode == 0, res.stderr
    assert "also occur in the training data" in res.stdout + res.stderr
    save_bert(tmp_path / "bert")
    assert_clean_error(run("eval", str(tmp_path / "bert"), "--data", str(text), "--tasks", "ppl"), "not a causal language model")


def test_missing_optional_dependency_is_one_line(tiny, tmp_path):
    """Without lm-eval every command is still listed; those that need it name the extra, in one line."""
    prelude, (res, eval_res, report_res) = run_without_lm_eval(
        ["--help"], ["eval", str(tiny), "--tasks", "paper"], ["report", "--out", str(tmp_path / "r")])
    assert not prelude.strip(), prelude  # importing the CLI prints nothing: each run's stderr is all of it
    assert res.returncode == 0, res.stderr
    assert COMMANDS <= listed_commands(res.stdout), res.stdout
    res = eval_res
    assert_clean_error(res, "recursify eval --tasks paper needs lm-eval: pip install 'recursify[eval]'")
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    res = report_res
    assert_clean_error(res, "recursify report needs lm-eval: pip install 'recursify[eval]'")
    assert not (tmp_path / "r").exists()


def test_broken_command_module_is_not_swallowed():
    """A command module that fails to import is a loud error, never a command missing from --help."""
    code = """
import sys

class Broken:
    def find_spec(self, name, path=None, target=None):
        if name.startswith("recursify.cli") and name not in ("recursify.cli", "recursify.cli.app"):
            raise ImportError(f"broken on purpose: {name}", name=name)

sys.meta_path.insert(0, Broken())
from recursify.cli import main
sys.exit(main(sys.argv[1:]))
"""
    res = run_code(code, "--help")
    assert res.returncode != 0
    assert "broken on purpose" in res.stderr, res.stdout + res.stderr


def test_bench_serve_runs_from_an_installed_package(tmp_path):
    """bench-serve needs only the installed package: no source checkout, no benchmarks/ folder."""
    import recursify

    site = tmp_path / "site"
    shutil.copytree(Path(recursify.__file__).parent, site / "recursify", ignore=shutil.ignore_patterns("__pycache__"))
    code = "import sys, recursify.bench.serve as m; print(m.__file__); from recursify.cli import main; sys.exit(main(sys.argv[1:]))"
    res = run_code(code, "bench-serve", "--help", cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(site)})
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[0].startswith(str(site / "recursify")), res.stdout
    assert "usage: recursify bench-serve" in res.stdout and "--requests" in res.stdout


def test_cli_package_has_no_import_cycle():
    """app.py imports no command module; command modules import app.py, never the package itself."""
    import recursify.cli

    package = Path(recursify.cli.__file__).parent
    deps = {}
    for path in package.glob("*.py"):
        if path.stem in ("__init__", "__main__"):
            continue
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                imported.add(node.module or "")  # "": `from . import x`, i.e. the package's __init__
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("recursify.cli"):
                imported.add(node.module.removeprefix("recursify.cli").lstrip("."))
            elif isinstance(node, ast.Import):
                imported |= {a.name.removeprefix("recursify.cli").lstrip(".") for a in node.names
                             if a.name.startswith("recursify.cli")}
        deps[path.stem] = imported
    assert deps["app"] == set(), deps
    assert all("" not in d for d in deps.values()), deps
    done: set[str] = set()

    def visit(module, stack):
        assert module not in stack, f"import cycle: {' -> '.join([*stack, module])}"
        if module not in done:
            for dep in deps.get(module, ()):
                visit(dep, [*stack, module])
            done.add(module)

    for module in deps:
        visit(module, [])
