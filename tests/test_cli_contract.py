"""The command line's contract, command by command: bad input exits non-zero with one line on
stderr that says what to change, no traceback, and nothing written. In-process (`recursify.cli.main`),
so torch is imported once for the whole table."""

from __future__ import annotations

import pytest

from recursify import hub
from recursify.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

CASES = [  # (argv, what the one line must say)
    (["convert", "no-such-model", "--out", "new"], "no-such-model"),
    (["convert", "smollm2-135m", "--out", "existing"], "already exists"),
    (["convert", "smollm2-135m", "--out", "new", "--loops", "7"], "7"),
    (["convert", "smollm2-135m", "--out", "new", "--strategy", "spiral"], "spiral"),
    (["convert", "smollm2-135m", "--out", "new", "--lora-rank", "auto"], "--calibrate"),
    (["compress", "smollm2-135m", "--data", "no-such-text", "--out", "new"], "no-such-text"),
    (["compress", "smollm2-135m", "--data", "text.txt", "--out", "new", "--time-budget", "soon"], "duration"),
    (["compress", "smollm2-135m", "--data", "text.txt", "--out", "new", "--loops", "2", "--max-compute", "1.1"],
     "--max-compute"),
    (["compress", "smollm2-135m", "--data", "text.txt", "--out", "new", "--gradient-checkpointing", "maybe"],
     "--gradient-checkpointing"),
    (["compress", "smollm2-135m", "--data", "text.txt", "--out", "existing"], "already exists"),
    (["train", "--student", "no-such-student", "--teacher", "smollm2-135m", "--data", "text.txt", "--out", "existing"],
     "already exists"),
    (["train", "--student", "s", "--teacher", "t", "--data", "text.txt", "--out", "new", "--dtype", "int4"], "dtype"),
    (["eval", "smollm2-135m", "--tasks", "telepathy"], "telepathy"),
    (["eval", "smollm2-135m", "--tasks", "ppl", "--stride", "0", "--data", "text.txt"], "--stride"),
    (["serve", "no-such-checkpoint"], "no-such-checkpoint"),
    (["serve", "smollm2-135m", "--exit-mode", "psychic"], "psychic"),
    (["exits", "fit", "no-such-checkpoint", "--data", "text.txt"], "no-such-checkpoint"),
    (["exits", "fit", ".", "--data", "text.txt", "--target-agreement", "2"], "--target-agreement"),
    (["generate", "smollm2-135m", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["info", "no-such-checkpoint"], "no-such-checkpoint"),
    (["plot", "no-such-run"], "no-such-run"),
]


@pytest.mark.parametrize("argv,says", CASES, ids=[" ".join(c[0][:2]) + f" #{i}" for i, c in enumerate(CASES)])
def test_bad_input_exits_non_zero_with_one_line_and_writes_nothing(argv, says, tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RECURSIFY_CACHE", str(tmp_path / ".cache"))
    (tmp_path / "existing").mkdir()
    (tmp_path / "existing" / "keep.txt").write_text("x")
    (tmp_path / "text.txt").write_text("Some text to train on. " * 50)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    real_load = hub.load_pretrained
    loads = []
    monkeypatch.setattr(hub, "load_pretrained", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    code = main(argv)
    err = capfd.readouterr().err.strip()
    lines = [line for line in err.splitlines() if line.strip()]
    assert code not in (0, None), (argv, err)
    assert "Traceback" not in err, err
    assert len(lines) == 1 and says in lines[0], (argv, err)
    after = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if ".cache" not in p.parts)
    assert after == before, (argv, set(after) ^ set(before))


def test_bench_serve_refuses_a_negative_request_count(capfd):
    with pytest.raises(SystemExit) as e:
        main(["bench-serve", "--requests", "-1"])
    assert e.value.code == 2
    err = capfd.readouterr().err
    assert "--requests must be a positive integer" in err and "Traceback" not in err


def test_python_dash_m_recursify_exits_non_zero_on_a_failure(tmp_path):
    """The one subprocess case: the exit code reaches the shell."""
    import subprocess
    import sys

    (tmp_path / "existing").mkdir()
    done = subprocess.run([sys.executable, "-m", "recursify", "convert", "smollm2-135m", "--out", str(tmp_path / "existing")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "already exists" in done.stderr and "Traceback" not in done.stderr
